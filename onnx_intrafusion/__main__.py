"""``python -m onnx_intrafusion``: see :mod:`onnx_intrafusion.cli`."""

import sys

from .cli import main

sys.exit(main())

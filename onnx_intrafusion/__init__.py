"""onnx_intrafusion: structured pruning of exported ONNX models with Intra-Fusion.

Public API: :func:`prune` and :class:`PruneResult`.
"""

from .pipeline import PruneResult, prune

__all__ = ["prune", "PruneResult"]
__version__ = "0.1.0"

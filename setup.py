"""Build of the optional compiled L1 kernel (``onnx_intrafusion/_l1.c``); everything else is in pyproject.toml.

The extension is optional: where no C compiler is available the install still
succeeds and the package computes its transport costs with numba (if
installed) or SciPy (see ``onnx_intrafusion.plans``).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: Let the compiler reorder the float64 sums so the feature axis is vectorised.  Compile
#: flags only: -ffast-math at link time would change the floating-point mode of the whole
#: process (flush-to-zero), which these flags do not.
UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = UNIX_FLAGS + list(ext.extra_compile_args or [])
        super().build_extensions()


setup(ext_modules=[Extension("onnx_intrafusion._l1", ["onnx_intrafusion/_l1.c"], optional=True)],
      cmdclass={"build_ext": BuildExt})

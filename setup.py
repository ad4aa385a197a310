"""Everything is in setup.cfg except the package list and the one C file.

`packages = find:` there cannot also name the data packages that setup.cfg's package_dir maps
onto the top-level prompts/ and export/. The C file is a shared library, not a Python module
(backend.py loads it with ctypes); it is optional, so an install without a C compiler still works,
with few-row matmuls left on OpenBLAS's slower sgemm path."""
import sys

from setuptools import Extension, find_packages, setup

DATA_PACKAGES = ["mlx_refusal.data.prompts", "mlx_refusal.data.export"]

# Only MLX's Linux CPU build resolves cblas_sgemm through OpenBLAS; macOS uses Accelerate/Metal.
# -O3: the kernel's tile loops are written over small fixed counts and must be unrolled into registers.
GEMV_FORWARD = [Extension("mlx_refusal._gemv_forward", ["mlx_refusal/_gemv_forward.c"],
                          extra_compile_args=["-O3", "-pthread"], extra_link_args=["-pthread"],
                          optional=True)] if sys.platform.startswith("linux") else []

setup(packages=find_packages(include=["mlx_refusal", "mlx_refusal.*"]) + DATA_PACKAGES,
      ext_modules=GEMV_FORWARD)

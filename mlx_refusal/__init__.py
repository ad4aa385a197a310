"""mlx-refusal: find, ablate and steer the refusal direction of chat LLMs in MLX.

Importing the package loads a fast BLAS on Linux before `mlx.core` (see backend.py),
so import `mlx_refusal` before anything that imports `mlx`.
"""
from .backend import load_fast_blas as _load_fast_blas

_load_fast_blas()

__version__ = "0.1.0"

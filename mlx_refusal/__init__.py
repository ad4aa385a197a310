"""mlx-refusal: find, ablate and steer the refusal direction of chat LLMs in MLX.

Importing the package loads a fast BLAS on Linux before `mlx.core` (see backend.py) and defers
mlx_lm's package __init__ (see mlx_lm_package.py), so import `mlx_refusal` before anything that
imports `mlx` or `mlx_lm`.
"""
from .backend import load_fast_blas as _load_fast_blas
from .mlx_lm_package import register as _register_mlx_lm

_load_fast_blas()
_register_mlx_lm()  # before anything imports mlx_lm: its package __init__ costs 1.2 s (mlx_lm_package.py)

__version__ = "0.1.0"

# The Python API (api.py), imported on first use so that `import mlx_refusal` stays cheap.
__all__ = ["load", "compute_directions", "steer", "ablate", "project", "evaluate", "export_onnx",
           "Model", "Directions", "Edit"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_refusal' has no attribute {name!r}")

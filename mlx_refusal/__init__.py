"""mlx-refusal: find, ablate and steer the refusal direction of chat LLMs in MLX.

Importing the package loads a fast BLAS on Linux before `mlx.core` (see backend.py),
so import `mlx_refusal` before anything that imports `mlx`.
"""
from .backend import load_fast_blas as _load_fast_blas

_load_fast_blas()

__version__ = "0.1.0"

# The Python API (api.py), imported on first use so that `import mlx_refusal` stays cheap.
__all__ = ["load", "compute_directions", "steer", "ablate", "project", "evaluate", "export_onnx",
           "Model", "Directions", "Edit"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_refusal' has no attribute {name!r}")

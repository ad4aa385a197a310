"""Device and compute dtype, and a fast BLAS for MLX's Linux CPU build.

The `mlx[cpu]` wheel ships a slow reference BLAS (a 1024^3 sgemm takes ~0.4-0.9 s).
MLX resolves `cblas_sgemm` dynamically, so an OpenBLAS loaded with RTLD_GLOBAL *before*
`mlx.core` is imported wins the symbol lookup and makes the same product ~50-100x faster.
This module must therefore stay importable without importing `mlx.core` first.
"""
from __future__ import annotations

import ctypes
import os
import sys
import glob

ENV_BLAS_PATH = "MLX_REFUSAL_BLAS"  # path to a BLAS shared library to load instead of searching
ENV_NO_BLAS = "MLX_REFUSAL_NO_BLAS"  # set to 1 to keep MLX's bundled BLAS

# Usual places for a multithreaded OpenBLAS on Debian/Ubuntu, Fedora/RHEL and Arch.
_BLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/libopenblas.so",
    "/usr/local/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so",
]

_loaded_blas: str | None = None
_blas_message: str | None = None


def _find_blas() -> str | None:
    explicit = os.environ.get(ENV_BLAS_PATH)
    if explicit:
        return explicit
    for path in _BLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in ("/usr/lib*/**/libopenblas*.so*",):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


def load_fast_blas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU matmuls use it. Returns the path, or None.

    Only acts on Linux, only before `mlx.core` is imported, and only once.
    """
    global _loaded_blas, _blas_message
    if _loaded_blas is not None or _blas_message is not None:
        return _loaded_blas
    if not sys.platform.startswith("linux"):
        _blas_message = "not needed (MLX uses Accelerate/Metal on macOS)"
        return None
    if os.environ.get(ENV_NO_BLAS, "") not in ("", "0"):
        _blas_message = f"disabled by {ENV_NO_BLAS}"
        return None
    if "mlx.core" in sys.modules:
        _blas_message = "mlx.core was imported before mlx_refusal; import mlx_refusal first"
        _warn(f"fast BLAS not loaded: {_blas_message}")
        return None
    path = _find_blas()
    if path is None:
        _blas_message = "no OpenBLAS found"
        _warn(
            "no OpenBLAS found, MLX CPU matmuls will be ~100x slower; fix: "
            f"`sudo apt-get install libopenblas0-pthread` (or set {ENV_BLAS_PATH}=/path/to/libopenblas.so)"
        )
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _blas_message = f"could not load {path}: {exc}"
        _warn(f"fast BLAS not loaded: {_blas_message}; fix: set {ENV_BLAS_PATH} to a working libopenblas")
        return None
    _loaded_blas = path
    return path


def _warn(line: str) -> None:
    print(f"mlx-refusal: warning: {line}", file=sys.stderr)


def blas_status() -> str:
    """One phrase for `info`: which BLAS MLX's CPU matmuls use."""
    if _loaded_blas:
        return f"OpenBLAS ({_loaded_blas})"
    return f"bundled reference BLAS ({_blas_message})" if _blas_message else "unknown"


def fast_blas_active() -> bool:
    return _loaded_blas is not None or sys.platform == "darwin"


def device_name() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        if sys.platform == "darwin":
            return "Metal GPU"
        return "CUDA GPU"
    return "CPU"


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.cpu


def compute_dtype(stored_dtype=None):
    """float32 on the CPU (half-precision CPU matmuls never reach BLAS); the stored dtype on a GPU."""
    import mlx.core as mx

    if on_cpu() or stored_dtype is None:
        return mx.float32
    return stored_dtype

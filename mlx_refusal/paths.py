"""Where mlx-refusal keeps its caches: $MLX_REFUSAL_CACHE, else ~/.cache/mlx-refusal."""
from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "MLX_REFUSAL_CACHE"


def cache_dir(*parts: str) -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlx-refusal")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

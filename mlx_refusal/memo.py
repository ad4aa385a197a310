"""On-disk results keyed by the content that determines them.

Generations, calibration trials and layer scores are pure functions of the weights, the
intervention, the prompts and the settings. `key` hashes a JSON description of all of those;
`recall` returns what a previous run stored under it, `remember` stores a new result (JSON);
`recall_array` / `remember_array` do the same for one float32 array (.npy). A damaged or
unreadable entry is treated as missing and recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .atomic import write_text_atomic
from .paths import cache_dir


def key(**content) -> str:
    """sha256 of `content` as canonical JSON (sorted keys); values must be JSON-serialisable."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def recall(kind: str, digest: str):
    """The value stored under `digest` in the `kind` folder of the cache, or None."""
    path = cache_dir(kind) / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remember(kind: str, digest: str, value) -> None:
    write_text_atomic(cache_dir(kind) / f"{digest}.json", json.dumps(value))


def recall_array(kind: str, digest: str) -> np.ndarray | None:
    """The array stored under `digest` in the `kind` folder of the cache, or None."""
    try:
        with open(cache_dir(kind) / f"{digest}.npy", "rb") as f:
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def remember_array(kind: str, digest: str, value: np.ndarray) -> None:
    from .atomic import atomic_file

    with atomic_file(cache_dir(kind) / f"{digest}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(value, np.float32), allow_pickle=False)

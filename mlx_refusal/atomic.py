"""Atomic folder writes: build beside the target, then rename into place.

An interrupted or failed write leaves no half-written model or bundle behind: the target is
either the old folder or the complete new one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import UserError


def check_replaceable(target: Path, force: bool, is_ours: Callable[[Path], bool] | None = None,
                      kind: str = "a folder this tool wrote") -> None:
    """Refuse an existing target unless `force`, and even then only a folder `is_ours` accepts
    (or an empty one), so --force never deletes an unrelated folder."""
    target = Path(target)
    if not target.exists():
        return
    if not force:
        raise UserError(f"{target} already exists; pass --force to replace it or choose another --out")
    if not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; choose another --out")
    if is_ours is not None and any(target.iterdir()) and not is_ours(target):
        raise UserError(f"refusing to replace {target}: it is not {kind}; choose another --out")


@contextmanager
def atomic_directory(target, force: bool = False, is_ours: Callable[[Path], bool] | None = None,
                     kind: str = "a folder this tool wrote"):
    """Yield a fresh temporary folder beside `target`; when the block succeeds it replaces
    `target` by rename (an existing one is swapped out first and deleted after)."""
    target = Path(target).absolute()
    check_replaceable(target, force, is_ours, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it and a rename, so a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

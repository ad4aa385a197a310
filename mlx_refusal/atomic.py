"""Durable atomic writes: build beside the target, fsync, rename into place, fsync the parent.

An interrupted or failed write leaves no half-written model or bundle behind: the target is
either the old folder or the complete new one, also after a power cut (every file and folder is
fsynced before the rename, and the parent folder after it, so the rename cannot reach the disk
before the data it points at).

Temporary names carry the writer's pid (`.NAME.<pid>.<random>.tmp`), so a later write to the same
target can tell a folder left by a killed run (pid gone) from one a concurrent run is still
writing, and removes only the former. Outputs get the permissions the umask gives (tempfile's
0700/0600 would make a saved model unreadable to a web server or another user).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

# Test hook: a file that each write appends its phase to ("begin", "complete", "swap", "done"),
# pausing briefly after each, so a test can SIGKILL a run inside the save window.
ENV_TEST_HOOK = "MLX_REFUSAL_TEST_HOOK"
_HOOK_PAUSE_S = 0.3

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
Note = Callable[[str], None]


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


def check_writable_parent(target: Path) -> None:
    """The nearest existing folder above `target` must be writable (checked before slow work)."""
    parent = Path(target).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is not a folder, so {target} cannot be written there; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent} is not writable, so {target} cannot be written there; choose another --out")


# ---------------------------------------------------------------------------------------------
# space


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _gb(n: float) -> str:
    return f"{n / 1e9:.2g} GB" if n >= 1e7 else f"{n / 1e9:.4f} GB"


def no_space_error(target: Path, needed: int | None, writing: bool = False) -> UserError:
    """The one-line error for a disk too full for `target`; `writing`: a write failed (which a
    file-size limit also causes), rather than the free-space check."""
    target = Path(target).absolute()
    mount = _mount_point(target.parent)
    free = shutil.disk_usage(mount).free
    need = f"needed ~{_gb(needed)}" if needed else "needed more"
    limit = ", or a file-size limit was reached" if writing else ""
    return UserError(f"no space left on {mount} for {target} ({need}, {_gb(free)} free{limit}); "
                     "free some space or choose --out on another disk")


def check_free_space(target: Path, needed: int | None) -> None:
    """Fail fast when the disk that will hold `target` has less than `needed` bytes free."""
    if not needed:
        return
    mount = _mount_point(Path(target).absolute().parent)
    if shutil.disk_usage(mount).free < needed:
        raise no_space_error(target, needed)


def _is_space_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    # MLX's writers raise RuntimeError("[write] Unable to write N bytes to file.") without an errno
    return isinstance(exc, RuntimeError) and "Unable to write" in str(exc)


# ---------------------------------------------------------------------------------------------
# temporary names and stale leftovers


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def remove_stale(target, note: Note | None = None) -> list[tuple[Path, int]]:
    """Remove the temporary files/folders a killed write to `target` left beside it; a swapped-out
    old folder whose replacement never landed is renamed back to `target`. Leftovers of writers
    still running are kept. Returns [(path, bytes)] of what was removed."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+\.(tmp|old)$")
    removed = []
    for path in sorted(target.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or (m.group(1) and _pid_alive(int(m.group(1)))):
            continue
        if m.group(2) == "old" and not target.exists():
            os.rename(path, target)  # the kill fell between the two renames of a swap
            if note:
                note(f"restored {target} from {path.name}, left by an interrupted run")
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append((path, size))
        if note:
            note(f"removed {path} ({_gb(size)}), left by a killed run")
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _hook(phase: str, target: Path) -> None:
    hook = os.environ.get(ENV_TEST_HOOK)
    if hook:
        with open(hook, "a") as f:
            f.write(f"{phase} {target}\n")
        time.sleep(_HOOK_PAUSE_S)


# ---------------------------------------------------------------------------------------------
# durability


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # a filesystem without fsync on folders
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (folders last, so their entries are durable)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder, name))
        _fsync_path(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), str(a))


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old folder
        _fsync_path(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
    os.rename(target, old)
    _hook("swap", target)  # a kill here leaves `old`, which the next write renames back
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the writers


@contextmanager
def atomic_directory(target, force: bool = False, is_ours: Callable[[Path], bool] | None = None,
                     kind: str = "a folder this tool wrote", size: int | None = None,
                     note: Note | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; when the block succeeds it is fsynced and
    replaces `target` by rename. `size` (bytes, when known) is checked against the free space
    first; running out of space mid-write is a UserError too. `note` hears about stale leftovers."""
    target = Path(target).absolute()
    check_replaceable(target, force, is_ours, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target, note)
    check_replaceable(target, force, is_ours, kind)  # a restored old folder is checked like any other
    check_free_space(target, size)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _hook("begin", target)
        yield tmp
        _hook("complete", target)
        fsync_tree(tmp)
        _swap_into_place(tmp, target)
        _fsync_path(target.parent)
        _hook("done", target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_space_error(exc):
            raise no_space_error(target, size, writing=True) from None
        raise


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds the file is fsynced and
    renamed over `path`, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_space_error(exc):
            raise no_space_error(path, None, writing=True) from None
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` durably and atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

"""The one durable writer: every file and folder fsynced before the rename, the parent after it;
normal permissions; stale leftovers of a killed run removed; a full disk as one line."""
import errno
import os
import stat
from pathlib import Path

import pytest

from mlx_refusal import atomic
from mlx_refusal.atomic import atomic_directory, write_text_atomic
from mlx_refusal.errors import UserError


@pytest.fixture
def fsynced(monkeypatch):
    """The paths fsynced, in order (read back from /proc/self/fd)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    seen, real = [], os.fsync

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    return seen


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_folder_write_is_durable_and_replaces_the_old_one(exchange, fsynced, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with atomic_directory(target, force=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "onnx").mkdir()
        (tmp / "onnx" / "model.onnx").write_bytes(b"graph")
    assert (target / "config.json").read_text() == "new" and (target / "onnx" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    names = [Path(p).name for p in fsynced]
    # files before their folders, the new folder before the rename, the parent after it
    assert names.index("model.onnx") < names.index("onnx") and names.index("config.json") < len(names) - 1
    assert Path(fsynced[-1]) == tmp_path


def test_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "web") as tmp:
            (tmp / "index.html").write_text("page")
        report = write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "web").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE(report.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_stale_leftovers_of_a_killed_run_are_removed_at_the_next_write(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".model.{dead.pid}.x1y2z3.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 4096)
    stale_file = tmp_path / f".report.json.{dead.pid}.abc.tmp"
    stale_file.write_text("half")
    notes = []
    with atomic_directory(tmp_path / "model", note=notes.append) as tmp:
        (tmp / "config.json").write_text("{}")
    write_text_atomic(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json"]
    assert len(notes) == 1 and "left by a killed run" in notes[0] and "\n" not in notes[0]


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, force=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_no_space_is_one_line_before_and_during_the_write(tmp_path):
    with pytest.raises(UserError, match=r"^no space left on .* \(needed ~1e\+03 GB, .* free\); free some space"):
        with atomic_directory(tmp_path / "model", size=10**12):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"needed ~0.0010 GB, .* free, or a file-size limit was reached") as err:
        with atomic_directory(tmp_path / "model", size=10**6):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []

"""A full disk: a one-line "no space left on ... (needed ~X GB)" error, exit status 2, no partial
target and no temporary folder.

Two ways to run out: a small tmpfs (mounted as root, as in CI), where the free-space check fails
before anything is written; and RLIMIT_FSIZE in a subprocess, where the check passes and the
write itself fails halfway through the weights file.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen2, tmp_path_factory):
    from test_gguf import write_gguf

    return write_gguf(tiny_qwen2, tmp_path_factory.mktemp("full_gguf") / "tiny.gguf")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KB tmpfs: the tiny model (~0.8 MB of weights) does not fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the RLIMIT_FSIZE tests cover this case")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _check(status: int, output: str, target: Path):
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output
    assert status == 2, output[-2000:]
    assert len(errors) == 1, output[-2000:]
    assert errors[0].startswith("error: no space left on ") and "(needed ~0.0" in errors[0] and " GB" in errors[0]
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("command", ["import-gguf", "ablate"])
def test_a_full_tmpfs_is_refused_before_writing(command, small_tmpfs, tiny_qwen2, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    target = small_tmpfs / "model"
    args = {"import-gguf": ["import-gguf", str(tiny_gguf)],
            "ablate": ["ablate", "--model", str(tiny_qwen2), "--layer", "1", "--eval-limit", "0"]}[command]
    result = CliRunner().invoke(cli.main, [*args, "--out", str(target)])
    _check(result.exit_code, result.output, target)
    assert str(small_tmpfs) in result.output


def _limit_file_size():
    # The default action of SIGXFSZ kills the process; ignored, the write fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.parametrize("command", ["import-gguf", "steer"])
def test_running_out_mid_write_leaves_nothing(command, tiny_qwen2, tiny_gguf, tmp_path):
    target = tmp_path / "out" / "model"
    args = {"import-gguf": ["import-gguf", tiny_gguf],
            "steer": ["steer", "--model", tiny_qwen2, "--layer", "1", "--alpha", "3", "--eval-limit", "0"]}[command]
    env = dict(os.environ, MLX_REFUSAL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args), "--out", str(target)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    _check(proc.returncode, proc.stdout + proc.stderr, target)
    assert "file-size limit" in proc.stderr

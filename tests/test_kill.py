"""SIGKILL at random points: the target is the old complete folder (or a complete new one, or
absent if there was none), it still loads, and the next run leaves no temporary folder behind.

Each command runs in a real subprocess on a tiny fixture. The test hook (`MLX_REFUSAL_TEST_HOOK`)
makes every atomic write log its phase and pause 0.3 s there, so kills land inside the save
window on purpose: while the temporary folder is being written ("begin") and once it is complete
but not yet renamed ("complete"); a third kill falls at a random time of the whole run (loading,
capture, graph building, writing).
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_refusal.atomic import ENV_TEST_HOOK, remove_stale

REPO = Path(__file__).resolve().parent.parent


def _command(name, tmp, model, gguf):
    return {
        "steer": ["steer", "--model", model, "--layer", "1", "--alpha", "3", "--eval-limit", "0", "--no-cache"],
        "ablate": ["ablate", "--model", model, "--layer", "1", "--eval-limit", "0", "--no-cache"],
        "export-onnx": ["export-onnx", "--model", model, "--dtype", "fp32,q8"],
        "import-gguf": ["import-gguf", gguf],
    }[name]


def _start(argv, out, hook, cache):
    env = dict(os.environ, MLX_REFUSAL_CACHE=str(cache), **{ENV_TEST_HOOK: str(hook)})
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, argv), "--out", str(out), "--force"],
                            cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, hook: Path, phase: str, out: Path, timeout: float = 120) -> bool:
    """Until the run logs `phase` for `out` (True), or ends first (False)."""
    line = f"{phase} {out.absolute()}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hook.exists() and line in hook.read_text().splitlines():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"no '{phase}' within {timeout} s")


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def _loads(name: str, out: Path) -> None:
    if name == "export-onnx":
        import onnxruntime as ort

        ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert (out / "export.json").is_file() and (out / "onnx" / "model_quantized.onnx").is_file()
    else:
        import mlx_lm

        mlx_lm.load(str(out))


def _leftovers(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen2, tmp_path_factory):
    from test_gguf import write_gguf

    return write_gguf(tiny_qwen2, tmp_path_factory.mktemp("kill_gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def old_export(tiny_qwen2, tmp_path_factory):
    from mlx_refusal.onnx import export_onnx

    return export_onnx(tiny_qwen2, tmp_path_factory.mktemp("kill_export") / "web", dtypes="fp32,q8").out_dir


# Where each command is killed: every save phase is hit by two commands, and a random point of
# the whole run (loading, capture, graph building, writing) by three.
KILLS = {
    "steer": ("begin", "random"),
    "ablate": ("complete", "random"),
    "export-onnx": ("begin", "complete"),
    "import-gguf": ("complete", "random"),
}


RUN_SECONDS = {"steer": 6.0, "ablate": 6.0, "export-onnx": 6.0, "import-gguf": 1.5}  # typical here


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_never_leaves_a_broken_target(name, tiny_qwen2, tiny_gguf, old_export, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    argv = _command(name, tmp_path, tiny_qwen2, tiny_gguf)
    out, hook, cache = tmp_path / "target", tmp_path / "hook.log", tmp_path / "cache"
    # the old complete folder every kill must preserve
    shutil.copytree(old_export if name == "export-onnx" else tiny_qwen2, out)
    old = _snapshot(out)

    report = []
    for point in KILLS[name]:
        hook.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = _start(argv, out, hook, cache)
        if point == "random":
            time.sleep(rng.uniform(0.3, RUN_SECONDS[name]))
            landed = proc.poll() is None
        else:
            landed = _wait_for(proc, hook, point, out)
            time.sleep(rng.uniform(0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        phases = hook.read_text().split() if hook.exists() else []
        state = "old" if out.is_dir() and _snapshot(out) == old else "new" if out.is_dir() else "absent"
        report.append((point, round(time.monotonic() - t0, 2), phases[-2] if phases else "before any write",
                       landed, proc.returncode, state))
        assert state in ("old", "new"), f"seed {seed}: kill at {point} left the target {state}: {report}"
        _loads(name, out)
        old = _snapshot(out)

    hook.unlink(missing_ok=True)
    last = _start(argv, out, hook, cache)
    assert last.wait(300) == 0, last.stderr.read()[-3000:]
    _loads(name, out)
    assert _leftovers(out) == [], f"seed {seed}: temporary folders left behind after {report}"
    print(f"{name}: kills (point, seconds, last phase, landed, status, target after): {report}")
    # the targeted kills really fell inside the save window (killed, not finished)
    assert all(landed and rc == -signal.SIGKILL and state == "old"
               for point, _, _, landed, rc, state in report if point != "random"), report


def test_a_kill_between_the_two_renames_of_a_swap_is_undone(tmp_path):
    """Where an atomic exchange is unavailable, a swap is two renames; a kill between them leaves
    the old folder under its `.old` name, and the next write to the target renames it back."""
    target = tmp_path / "model"
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = tmp_path / f".model.{dead.pid}.abc123.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    stale_tmp = tmp_path / f".model.{dead.pid}.def456.tmp"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"0" * 1000)
    live_tmp = tmp_path / f".model.{os.getpid()}.ghi789.tmp"  # a concurrent writer's: kept
    live_tmp.mkdir()
    notes = []
    removed = remove_stale(target, notes.append)
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p, size in removed] == [stale_tmp.name] and removed[0][1] == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [live_tmp.name, "model"]
    assert len(notes) == 2 and all("\n" not in n for n in notes)

"""Past one process, measured in one run on the default model:

1. Peak RSS of the shard-streamed edit against the in-memory edit (`cli.py ablate --directions D
   --layer L --eval-limit 0`, forced each way with --max-memory), each in its own process, read
   from that process's own rusage; the two outputs are checked bit-identical.
2. Wall time of capture (directions on P prompts) and of greedy generation (G prompts x T tokens)
   on 1 rank and on 2 local ranks (`mlx.launch -n 2 --backend ring`), model loading excluded.
   Two ranks on one host share its cores (and here, 2 cores with other jobs): the speed-up is
   what this host gives, not what two Macs give.

Usage:
    python bench/distributed.py [--model SPEC] [--prompts 64] [--gen-prompts 16] [--tokens 32]
    python bench/distributed.py --skip-edit     # only the 1 vs 2 rank timings
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def _run_measured(cmd: list[str], **env_extra) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return wall, usage.ru_maxrss * scale / 1e9


def bench_edit(model: str, tmp: Path) -> None:
    from mlx_refusal.directions import Directions, save_directions
    from mlx_refusal.loading import resolve
    from mlx_refusal import stream_edit as se

    folder = resolve(model)
    cfg = json.loads((folder / "config.json").read_text())
    L, H = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    rows = np.random.default_rng(0).standard_normal((L + 1, H)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    save_directions(Directions(rows, rows, 0 * rows, np.ones(L + 1, np.float32)), tmp / "d")
    base = [sys.executable, "cli.py", "ablate", "--model", model, "--directions", str(tmp / "d"),
            "--layer", str(L // 2), "--eval-limit", "0"]
    streamed = _run_measured(base + ["--max-memory", "1GB", "--out", str(tmp / "streamed")])
    memory = _run_measured(base + ["--max-memory", "1TB", "--out", str(tmp / "memory")])
    sys.path.insert(0, str(REPO / "tests"))
    from test_stream_edit import assert_bit_identical

    assert_bit_identical(tmp / "memory", tmp / "streamed")
    size = se.format_size(sum((folder / f).stat().st_size for f in se.weight_files(folder)))
    print(f"\nablate + save of {model} ({size} of weights, {len(se.weight_files(folder))} file(s)), one process each:")
    print(f"  in memory : peak RSS {memory[1]:5.2f} GB, wall {memory[0]:6.1f} s")
    print(f"  streamed  : peak RSS {streamed[1]:5.2f} GB, wall {streamed[0]:6.1f} s")
    print(f"  streamed / in memory: RSS x{streamed[1] / memory[1]:.2f}, wall x{streamed[0] / memory[0]:.2f}; "
          "outputs bit-identical")


def worker(model: str, prompts: int, gen_prompts: int, tokens: int, out: Path) -> None:
    """Run on every rank (or alone): time capture and generation once the model is loaded."""
    import mlx.core as mx

    from mlx_refusal import distributed
    from mlx_refusal.capture import capture_residuals
    from mlx_refusal.evaluation import generate
    from mlx_refusal.loading import load
    from mlx_refusal.prompts import bundled

    m, tok, _ = load(model)
    texts = bundled("harmless", "all").texts
    barrier = lambda: mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # noqa: E731
    barrier()
    t0 = time.perf_counter()
    cap = capture_residuals(m, tok, texts[:prompts], batch_size=32)
    barrier()
    t1 = time.perf_counter()
    answers = generate(m, tok, texts[:gen_prompts], max_tokens=tokens, batch_size=64)
    barrier()
    t2 = time.perf_counter()
    if distributed.is_writer():
        out.write_text(json.dumps({"capture_s": t1 - t0, "generate_s": t2 - t1, "answers": answers,
                                   "mean": cap.mean.tolist(),
                                   "ranks": distributed.size()}))


def bench_ranks(model: str, prompts: int, gen_prompts: int, tokens: int, tmp: Path) -> None:
    me = str(Path(__file__).resolve())
    args = ["--worker", "--model", model, "--prompts", str(prompts), "--gen-prompts", str(gen_prompts),
            "--tokens", str(tokens)]
    _run_measured([sys.executable, me, *args, "--out", str(tmp / "one.json")])
    two = [sys.executable, "-c", LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, me, *args]
    _run_measured(two + ["--out", str(tmp / "two.json")])
    # ranks sharing one host's cores: give each rank's BLAS its share of the threads
    per_rank = str(max(1, (os.cpu_count() or 2) // 2))
    _run_measured(two + ["--out", str(tmp / "two_split.json")], OPENBLAS_NUM_THREADS=per_rank,
                  OMP_NUM_THREADS=per_rank)
    one, *twos = (json.loads((tmp / f).read_text()) for f in ("one.json", "two.json", "two_split.json"))
    print(f"\n1 vs 2 local ranks on {os.cpu_count()} cores, {model} (model loading excluded):")
    for label, two in zip(("2 ranks", f"2 ranks, {per_rank} BLAS thread(s) each"), twos):
        print(f"  {label}:")
        print(f"    capture of {prompts} prompts      : {one['capture_s']:6.1f} s -> {two['capture_s']:6.1f} s "
              f"(speed-up x{one['capture_s'] / two['capture_s']:.2f})")
        print(f"    generation {gen_prompts} x {tokens} tokens : {one['generate_s']:6.1f} s -> "
              f"{two['generate_s']:6.1f} s (speed-up x{one['generate_s'] / two['generate_s']:.2f})")
        a, b = np.array(one["mean"]), np.array(two["mean"])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        print(f"    answers identical to 1 rank: {one['answers'] == two['answers']}; "
              f"captured means: min cosine over sites {cos.min():.7f}, max |diff| {np.abs(a - b).max():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-edit", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.model, a.prompts, a.gen_prompts, a.tokens, a.out)
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        if not a.skip_edit:
            bench_edit(a.model, tmp)
        bench_ranks(a.model, a.prompts, a.gen_prompts, a.tokens, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`cli.py directions` end to end against the plain HF-transformers + torch loop, in one run.

    python bench/directions_wall.py [--prompts 64] [--torch-site DIR]

Both sides start a fresh process and capture the last-token residual of every layer for the same
64 harmful + 64 harmless prompts, then write the difference of means. Wall times include
everything a user waits for: imports, model load, capture, writing. Ours runs with `--no-cache`
(a cold run) and `--direction-method means` (the torch loop's method; auto may pick contrast on
these prompts, which captures twice as much), on a cache folder that holds only the converted
model; its stages are read off its own output, as bench/steer_stages.py does:

    start-up    process start -> first capture line (imports, tokenizer, weights, checks)
    capture     -> the ranking table      write   -> the process ends (ranking, plot, provenance)

torch is not a dependency: it is installed apart, into --torch-site (default: the cache's
bench-torch folder, `pip install --target` on first use), so our process never sees it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steer_stages import ROOT, cold_cache, real_cache, run_staged  # noqa: E402

STAGES = [("start-up", None), ("capture", re.compile(r"^capture ")), ("write", re.compile(r"^Top layers"))]
TORCH = "torch==2.13.0"


def torch_env(site: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    if probe.returncode != 0:
        print(f"installing {TORCH} into {site} (once; not into the venv)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), TORCH], check=True)
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="per set")
    ap.add_argument("--torch-site", type=Path, default=real_cache() / "bench-torch")
    args = ap.parse_args()

    from mlx_refusal.loading import resolve
    from mlx_refusal.prompts import bundled

    folder = resolve("qwen2.5-coder-0.5b")  # fetched and converted before anything is timed
    env = torch_env(args.torch_site)
    tmp = Path(tempfile.mkdtemp(prefix="directions-wall-"))
    try:
        files = []
        for name in ("harmful", "harmless"):
            files.append(tmp / f"{name}.txt")
            files[-1].write_text("\n".join(bundled(name).texts[: args.prompts]) + "\n")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        args_ours = ["directions", "--harmful", str(files[0]), "--harmless", str(files[1]),
                     "--direction-method", "means", "--no-cache", "--out", str(tmp / "out")]
        times, ours, log = run_staged(args_ours, cold_cache(tmp / "cache"), STAGES)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_baseline.py"), str(folder), *map(str, files)],
                             env=env, capture_output=True, text=True)
        theirs = time.perf_counter() - t
        if res.returncode != 0:
            sys.exit("torch loop failed:\n" + res.stderr[-3000:])
        their_start = float(re.search(r"startup_s ([\d.]+)", res.stdout).group(1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.prompts} + {args.prompts} prompts, wall time from process start to directions on disk")
    print(f"{'':<22} {'start-up':>9} {'capture+write':>14} {'total':>8}")
    print(f"{'cli.py directions':<22} {times['start-up']:8.1f}s {ours - times['start-up']:13.1f}s {ours:7.1f}s"
          f"   (capture {times.get('capture', 0):.1f} s, write {times.get('write', 0):.1f} s)")
    print(f"{'HF + torch loop':<22} {their_start:8.1f}s {theirs - their_start:13.1f}s {theirs:7.1f}s")
    print(f"speed-up, wall: {theirs / ours:.2f}x (target 1.5x); our start-up {times['start-up']:.1f} s (target 2 s)")


if __name__ == "__main__":
    main()

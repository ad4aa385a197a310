"""Wall time of each stage of `cli.py steer` with defaults, cold cache then warm cache.

"Cold": a fresh cache folder that holds only the fetched and converted model and the BLAS kernel
verdict (linked from the real cache, so nothing is downloaded): activations, layer scores, trials
and generations are all computed. "Warm": the same command again on that folder. Stages are read
off the command's own progress output (each stage's first line), so the bench times exactly what
a user runs:

    load        process start -> first capture line (imports, model load, fingerprint)
    capture     -> "score layers"          scoring     -> first calibration trial line
    calibration -> "eval before"           eval before -> "eval after"
    eval after  -> "saving"                save        -> the process ends

Usage: python bench/steer_stages.py [--runs cold warm] [--keep DIR] [-- extra steer options]
Prints the machine's load average with the times: on a shared machine compare runs of one bench.
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

ROOT = Path(__file__).resolve().parents[1]
STAGES = [  # (name, pattern of the line that starts the stage)
    ("load", None),
    ("capture", re.compile(r"^capture ")),
    ("scoring", re.compile(r"^score layers")),
    ("calibration", re.compile(r"^\s+layer\s+\d+\s+alpha")),
    ("eval before", re.compile(r"^eval before")),
    ("eval after", re.compile(r"^eval after")),
    ("save", re.compile(r"^saving ")),
]


def real_cache() -> Path:
    return Path(os.environ.get("MLX_REFUSAL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                            Path.home() / ".cache") / "mlx-refusal")


def cold_cache(into: Path) -> Path:
    """A cache folder with only the fetched and converted models (symlinked) and their hashes,
    and the machine's BLAS kernel verdict (backend.py), which the first import on a machine
    makes once: this bench's own process has made it before it starts the command."""
    src = real_cache()
    into.mkdir(parents=True, exist_ok=True)
    for name in ("models", "downloads", "blas"):
        if (src / name).exists():
            os.symlink(src / name, into / name)
    if (src / "hashes.json").exists():
        shutil.copy(src / "hashes.json", into / "hashes.json")
    return into


def run_steer(cache: Path, out: Path, extra: list[str]) -> tuple[dict[str, float], float, str]:
    return run_staged(["steer", "--out", str(out), "--force", *extra], cache, STAGES)


def run_staged(args: list[str], cache: Path, stages) -> tuple[dict[str, float], float, str]:
    """Run `cli.py ARGS` on `cache`: (seconds in each of `stages`, as in STAGES, total, output)."""
    env = dict(os.environ, MLX_REFUSAL_CACHE=str(cache), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    starts = {stages[0][0]: 0.0}
    log, pending = [], b""
    while True:
        # whole chunks: a reader that takes a byte per call falls seconds behind on a busy machine
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        now = time.perf_counter() - t0
        log.extend(raw.decode(errors="replace") for raw in lines)
        # the unfinished line too: tqdm ends a bar's line with the next update's "\r", seconds later
        for text in log[len(log) - len(lines):] + [pending.decode(errors="replace")]:
            for name, pat in stages:
                if pat is not None and name not in starts and pat.search(text):
                    starts[name] = now
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{args[0]} failed:\n" + "\n".join(log[-30:]))
    order = [n for n, _ in stages if n in starts]
    times = {n: (starts[order[i + 1]] if i + 1 < len(order) else total) - starts[n] for i, n in enumerate(order)}
    return times, total, "\n".join(log)


def summary(log: str) -> str:
    """The chosen layer and alpha and the before/after table, from the command's output."""
    keep = [ln for ln in log.splitlines() if re.search(r"steering at layer|refused|coherent|KL", ln)
            and not re.search(r"^\s+layer\s+\d+\s+alpha", ln)]
    return "\n".join(dict.fromkeys(keep))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    ap.add_argument("--keep", type=Path, default=None, help="use this cache folder and keep it (default: a temp one)")
    ap.add_argument("extra", nargs="*", help="more `steer` options, after --")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="steer-stages-"))
    cache = args.keep or cold_cache(tmp / "cache")
    if args.keep and not args.keep.exists():
        cold_cache(args.keep)
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"on {os.cpu_count()} cores", flush=True)
    try:
        for run in args.runs:
            times, total, log = run_steer(cache, tmp / "out", args.extra)
            load = os.getloadavg()
            print(f"\n{run} cache: {total:.0f} s in all (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
            for name, _ in STAGES:
                if name in times:
                    print(f"  {name:<12} {times[name]:7.1f} s  {100 * times[name] / total:5.1f}%")
            print(summary(log))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

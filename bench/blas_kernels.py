"""OpenBLAS's own kernel pick against the one mlx_refusal chose (backend._choose_kernels), in one run.

Runs bench/generate_speed.py (or, with --steer, bench/steer_stages.py's cold steer) twice as child
processes: once with OPENBLAS_CORETYPE set to the kernels OpenBLAS picks by itself on this CPU,
once with the set mlx_refusal chose, and prints each run's figures and the ratios. On a CPU where
the two are the same there is nothing to compare, and it says so.

Usage: python bench/blas_kernels.py [-- generate_speed options]   (default: --prompts 32 --batch 1 32)
       python bench/blas_kernels.py --steer
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_refusal  # noqa: F401  (chooses the kernels, as every command does)
from mlx_refusal import backend

ROOT = Path(__file__).resolve().parents[1]


def own_and_chosen() -> tuple[str, str]:
    """(the kernel set OpenBLAS picks by itself here, the one this process runs)."""
    own = backend._probe(backend._loaded_blas, None)["corename"]
    return own, os.environ.get(backend.ENV_CORETYPE) or own


def run(script: str, args: list[str], coretype: str) -> str:
    env = dict(os.environ, **{backend.ENV_CORETYPE: coretype}, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{script} under {coretype} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout


def figures(text: str, patterns: dict[str, str]) -> dict[str, float]:
    found = {}
    for name, pat in patterns.items():
        m = re.search(pat, text, re.M)
        if m:
            found[name] = float(m.group(1))
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steer", action="store_true", help="time a cold `steer` with defaults instead of decoding")
    ap.add_argument("extra", nargs="*", help="options for the bench it runs, after --")
    args = ap.parse_args()
    if backend._loaded_blas is None:
        sys.exit(f"no OpenBLAS loaded: {backend.blas_status()}")
    own, chosen = own_and_chosen()
    print(f"OpenBLAS {backend._loaded_blas}: its own pick {own}, mlx_refusal runs {chosen}")
    if own.lower() == chosen.lower():
        print("the same kernels: nothing to compare on this CPU")
        return
    if args.steer:
        script, bench_args = "steer_stages.py", ["--runs", "cold", *(["--", *args.extra] if args.extra else [])]
        patterns = {"cold steer s": r"^cold cache: (\d+) s", **{
            f"{stage} s": rf"^\s+{stage}\s+([\d.]+) s" for stage in
            ("load", "capture", "scoring", "calibration", "eval before", "eval after", "save")}}
    else:
        script, bench_args = "generate_speed.py", args.extra or ["--prompts", "32", "--batch", "1", "32"]
        patterns = {"sgemm peak GFLOP/s": r"sgemm peak ([\d.]+) GFLOP/s",
                    **{f"batch {b} tok/s": rf"^batch\s+{b}: .*?= +([\d.]+) tok/s" for b in (1, 16, 32, 64)}}
    results = {}
    for coretype in (own, chosen):
        text = run(script, bench_args, coretype)
        print(f"\n--- {script} under {backend.ENV_CORETYPE}={coretype}\n{text.rstrip()}")
        results[coretype] = figures(text, patterns)
    print(f"\n{'':<22}{own:>12}{chosen:>12}{'ratio':>8}")
    for name in patterns:
        a, b = results[own].get(name), results[chosen].get(name)
        if a is not None and b is not None:
            ratio = a / b if name.endswith(" s") else b / a  # how many times better the chosen kernels are
            print(f"{name:<22}{a:>12.1f}{b:>12.1f}{ratio:>7.2f}x")


if __name__ == "__main__":
    main()

"""sgemm speed of MLX's CPU build: bundled reference BLAS vs the OpenBLAS mlx_refusal loads.

Each variant runs in a fresh interpreter (the BLAS choice is fixed at import time), in the same
run, so the printed ratio compares like with like.  Usage: python bench/sgemm.py [N]
"""
import os
import subprocess
import sys

CHILD = r"""
import os, sys, time
import mlx_refusal
from mlx_refusal import backend
import mlx.core as mx
n = int(sys.argv[1])
a = mx.random.normal((n, n)); b = mx.random.normal((n, n)); mx.eval(a, b)
mx.eval(a @ b)
reps = 3 if backend.fast_blas_active() else 1
t = time.perf_counter()
for _ in range(reps):
    mx.eval(a @ b)
dt = (time.perf_counter() - t) / reps
print(f"{dt:.6f} {2 * n**3 / dt / 1e9:.2f} {backend.blas_status()}")
"""


def run(n: int, disable: bool) -> tuple[float, float, str]:
    env = dict(os.environ)
    if disable:
        env["MLX_REFUSAL_NO_BLAS"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True, check=True)
    dt, gflops, status = out.stdout.strip().split(" ", 2)
    return float(dt), float(gflops), status


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    slow = run(n, disable=True)
    fast = run(n, disable=False)
    print(f"sgemm {n}x{n}x{n} float32 on the CPU")
    print(f"  bundled BLAS : {slow[0] * 1e3:9.1f} ms  {slow[1]:8.1f} GFLOP/s  ({slow[2]})")
    print(f"  mlx_refusal  : {fast[0] * 1e3:9.1f} ms  {fast[1]:8.1f} GFLOP/s  ({fast[2]})")
    print(f"  speed-up     : {slow[0] / fast[0]:.1f}x")


if __name__ == "__main__":
    main()

"""Products of a few rows: the forward's own kernel (`_gemv_forward.c`, "skinny") against OpenBLAS.

Decoding multiplies one row per sequence by every weight matrix (x[M, K] @ W.T). In one run this
times, with the kernel off (0 rows: OpenBLAS's sgemm, and sgemv for 1-3 rows) and on:

    products   each weight shape of Qwen2.5-0.5B (q/o 896x896, gate/up 4864x896, down 896x4864,
               the output projection 151936x896) at M rows, best of several calls
    decode     one greedy decode step of a random Qwen2.5-0.5B-shaped model (KV cache of a
               ~40-token prompt) at B rows, the median of 8 steps; the kernel on as every command
               runs it, at each vector width the CPU has, each with its own row limit (512-bit
               AVX-512: 2-31 rows; 256-bit AVX2, what a CPU without AVX-512 gets: 2-12 rows)

and prints each ratio (OpenBLAS time / kernel time: above 1, the kernel is faster) with the sgemm
peak and the load average, since shared machines vary from run to run.

Usage: python bench/skinny.py [--rows 1 2 4 8 16 24 28 32 48 64] [--batch 1 2 8 16 24 28 31 32]
"""
from __future__ import annotations

import argparse
import os
import time

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from decode_profile import best_ms  # sibling scripts in bench/
from generate_speed import random_model, sgemm_peak
from mlx_refusal import backend

SHAPES = {"q/o 896x896": (896, 896), "gate/up 4864x896": (4864, 896), "down 896x4864": (896, 4864),
          "head 151936x896": (151936, 896)}


def products(rows: list[int], default: int) -> None:
    for name, (n, k) in SHAPES.items():
        w = mx.random.normal((n, k))
        mx.eval(w)
        for m in rows:
            x = mx.random.normal((m, k))
            mx.eval(x)
            times = {}
            for setting in (0, max(m, 2), 0, max(m, 2)):  # interleaved, the best of each: the machine drifts
                backend.skinny_rows(setting)
                t = best_ms(lambda: mx.eval(x @ w.T), 3 if n > 100_000 else 15)
                times[setting] = min(t, times.get(setting, t))
            ours = times[max(m, 2)]
            note = ("" if 2 <= m <= default else "  (one row: sgemv by default)" if m == 1
                    else "  (outside the default rows: runs on OpenBLAS)")
            print(f"  {name:18} M {m:3}: OpenBLAS {times[0]:8.2f} ms  kernel {ours:8.2f} ms "
                  f"({2 * m * n * k / ours / 1e6:5.0f} GFLOP/s)  ratio {times[0] / ours:5.2f}{note}")
    backend.skinny_rows(default)


def decode_steps(model, batch: list[int], widths: list[int]) -> None:
    rng = np.random.default_rng(0)
    paths = [("OpenBLAS", 0, widths[0])] + [(f"{w}-bit kernel", None, w) for w in widths]  # None: the width's own rows
    for b in batch:
        tokens = mx.array(rng.integers(100, 5000, (b, 40)), dtype=mx.int32)
        step: dict[str, float] = {}
        for name, rows, width in paths * 2:  # twice each, interleaved: the machine drifts
            backend.skinny_width(width)
            if rows is not None:
                backend.skinny_rows(rows)
            cache = make_prompt_cache(model)
            y = model(tokens, cache=cache)[:, -1].argmax(-1)
            mx.eval(y)
            times = []
            for _ in range(8):
                t = time.perf_counter()
                y = model(y[:, None], cache=cache)[:, -1].argmax(-1)
                mx.eval(y)
                times.append(time.perf_counter() - t)
            step[name] = min(step.get(name, np.inf), 1e3 * float(np.median(times)))
        off = step["OpenBLAS"]
        print(f"  batch {b:3}: step with OpenBLAS {off:7.1f} ms" + "".join(
            f", {name} {step[name]:7.1f} ms (ratio {off / step[name]:4.2f})" for name, _, _ in paths[1:]))
    backend.skinny_width(widths[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 28, 32, 48, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 8, 16, 24, 28, 31, 32])
    args = ap.parse_args()
    default = backend.skinny_rows()
    if default < 2:
        raise SystemExit(f"the kernel is not in use here: {backend.blas_status()}")
    widest = backend.skinny_width()
    widths = [w for w in (512, 256) if w <= widest and backend.skinny_width(w) == w]  # the CPU's, widest first
    backend.skinny_width(widest)
    peak = sgemm_peak()
    load = os.getloadavg()[0]
    print(f"BLAS: {backend.blas_status()}\nsgemm peak {peak:.0f} GFLOP/s; load average {load:.2f} on "
          f"{os.cpu_count()} cores; the kernel takes 2-{default} rows by default")
    print("products (x[M, K] @ W.T):")
    products(args.rows, default)
    model, _ = random_model(24, 896, 151936)
    print("decode steps (random Qwen2.5-0.5B shape):")
    decode_steps(model, args.batch, widths)


if __name__ == "__main__":
    main()

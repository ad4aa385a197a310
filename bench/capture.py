"""Capture throughput on the reference model: mlx_refusal vs straightforward loops, in one run.

    python bench/capture.py [--prompts 256] [--batch-size 16] [--no-torch]

Prints prompts/s, tokens/s and achieved GFLOP/s as a fraction of this machine's sgemm peak
(measured here, same process). Baselines, each capturing the last-token residual of every layer
for the same chat-templated prompts with batch 16 and left padding:
  - mlx loop:   run every layer of the mlx_lm model on the whole padded prompt, keep all hidden
                states (no prefix reuse, no length bucketing, LM head included);
  - torch loop: HF transformers + torch CPU, output_hidden_states=True (only if torch is installed;
                it is not a dependency: `pip install torch==2.13.0` to include it).
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (fast BLAS first)

import argparse
import time

import numpy as np

import mlx.core as mx

from mlx_refusal import arch
from mlx_refusal.capture import capture_residuals
from mlx_refusal.loading import load
from mlx_refusal.prompts import bundled
from mlx_refusal.template import encode_text, render
from torch_baseline import torch_loop


def sgemm_peak(n: int = 2048) -> float:
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(3):
        mx.eval(a @ b)
    return 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9


def flops_per_token(model) -> float:
    """2 x the parameters of the decoder blocks (matmul FLOPs; attention scores are negligible
    at these prompt lengths). Embedding lookups and the LM head are not counted."""
    from mlx.utils import tree_flatten

    n = sum(p.size for layer in arch.layers(model) for _, p in tree_flatten(layer.parameters()))
    return 2.0 * n


def mlx_loop(model, tok, prompts, batch_size):
    pad = tok.pad_token_id or 0
    out = []
    for s in range(0, len(prompts), batch_size):
        ids = [encode_text(tok, render(tok, p)) for p in prompts[s: s + batch_size]]
        width = max(map(len, ids))
        arr = np.full((len(ids), width), pad, np.int32)
        mask = np.zeros((len(ids), width), bool)
        for r, x in enumerate(ids):
            arr[r, width - len(x):] = x
            mask[r, width - len(x):] = True
        m = mx.array(mask)
        causal = mx.tril(mx.ones((width, width), mx.bool_))
        full_mask = causal[None, None] & m[:, None, None, :]
        h = arch.decoder(model).embed_tokens(mx.array(arr))
        states = []
        for layer in arch.layers(model):
            states.append(h[:, -1])
            h = layer(h, full_mask, None)
        states.append(h[:, -1])
        logits = model.lm_head(arch.decoder(model).norm(h)) if hasattr(model, "lm_head") else None
        mx.eval(states, logits)
        out.append(mx.stack(states, 1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256, help="per set (harmful and harmless)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the mlx loop baseline")
    args = ap.parse_args()

    model, tok, info = load("qwen2.5-coder-0.5b")
    prompts = bundled("harmful").texts[: args.prompts] + bundled("harmless").texts[: args.prompts]
    n = len(prompts)
    peak = sgemm_peak()
    fpt = flops_per_token(model)

    capture_residuals(model, tok, prompts[:8], batch_size=8)  # warm-up
    t = time.perf_counter()
    cap = capture_residuals(model, tok, prompts, batch_size=args.batch_size)
    dt = time.perf_counter() - t
    computed = cap.stats["suffix_tokens"] + cap.stats["prefix_tokens"]
    gflops = (cap.stats["padded_tokens"] + cap.stats["prefix_tokens"]) * fpt / dt / 1e9
    rows = [("mlx_refusal", n / dt, cap.stats["tokens"] / dt, gflops)]
    print(f"prompts: {n} (harmful + harmless), tokens per prompt: {cap.stats['tokens'] / n:.1f} "
          f"(shared prefix {cap.stats['prefix_tokens']}), computed tokens: {computed}, "
          f"padding overhead {cap.stats['padded_tokens'] / cap.stats['suffix_tokens'] - 1:.1%}")

    if not args.no_baseline:
        mlx_loop(model, tok, prompts[:8], 8)
        t = time.perf_counter()
        mlx_loop(model, tok, prompts, args.batch_size)
        dt_loop = time.perf_counter() - t
        rows.append(("mlx loop (plain)", n / dt_loop, cap.stats["tokens"] / dt_loop, None))
    torch_dt = None
    if not args.no_torch:
        try:
            torch_dt = torch_loop(info.path, prompts, args.batch_size)[0]
            rows.append(("torch loop (HF)", n / torch_dt, cap.stats["tokens"] / torch_dt, None))
        except ImportError:
            print("torch not installed: torch baseline skipped (pip install torch==2.13.0 to include it)")

    print(f"sgemm peak here: {peak:.1f} GFLOP/s; decoder FLOPs per token: {fpt / 1e9:.3f} GFLOP")
    print(f"{'method':<18} {'prompts/s':>10} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8}")
    for name, ps, ts, gf in rows:
        extra = f"{gf:9.1f} {gf / peak:8.1%}" if gf else f"{'':>9} {'':>8}"
        print(f"{name:<18} {ps:10.2f} {ts:10.1f} {extra}")
    if torch_dt:
        print(f"speed-up over the torch loop: {rows[0][1] / rows[-1][1]:.2f}x")


if __name__ == "__main__":
    main()

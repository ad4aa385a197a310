"""Greedy generation speed of mlx_refusal.evaluation: one prompt at a time vs batched.

By default it builds a random model shaped like Qwen2.5-0.5B (hidden 896, 24 layers, MLP 4864,
14 query / 2 KV heads, vocabulary 151936, tied embeddings) in memory, so it needs no download;
`--model SPEC` times a real model through `mlx_refusal.loading.load` instead. No end-of-sequence
token is set for the random model, so every sequence runs the full --max-tokens.

It also measures, in the same run, the sgemm peak (1024^3 float32) and the copy bandwidth
(numpy copy of 256 MB), and prints each batch's decode rate against its roofline: achieved
GFLOP/s (2 x matmul weights per token) vs the sgemm peak, and at batch 1 the weight bytes read
per second vs the copy bandwidth (a batch-1 step reads every weight once). Batch 1 runs twice on
Linux: with the sgemv forward for products of 1-3 rows (backend.py) and with it switched off; the
largest batch runs twice on the CPU: with the multiply-add activations (activations.py) and with
MLX's own.

Usage: python bench/generate_speed.py [--prompts 16] [--max-tokens 32] [--batch 1 16] [--model SPEC]
"""
from __future__ import annotations

import argparse
import time

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_refusal import activations, attention, batching, evaluation as evaluate
from mlx_refusal.template import encode_chat

QWEN05_SHAPE = dict(
    model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
    num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
)


def random_model(layers: int, hidden: int, vocab: int):
    from mlx_lm.models import qwen2

    cfg = dict(QWEN05_SHAPE, num_hidden_layers=layers, vocab_size=vocab)
    if hidden != 896:
        cfg.update(hidden_size=hidden, intermediate_size=hidden * 11 // 2 // 64 * 64,
                   num_attention_heads=max(2, hidden // 64), num_key_value_heads=2)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    activations.install(model)  # as loading.load does on the CPU
    attention.install(model)
    return model, cfg


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    # Lengths of the bundled prompts under Qwen's chat template: 36-52 tokens.
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=int(rng.integers(36, 53))).tolist() for _ in range(n)]


def sgemm_peak(n: int = 1024) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(3):
        mx.eval(a @ b)
    return 2 * n ** 3 * 3 / (time.perf_counter() - t) / 1e9


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """GB/s moved (read + write) by a large memory copy."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, src)
    return 2 * nbytes * 3 / (time.perf_counter() - t) / 1e9


def matmul_matrices(model) -> tuple[list[mx.array], mx.array]:
    """(the weight of every Linear of the blocks, the output projection's weight)."""
    from mlx.utils import tree_flatten

    from mlx_refusal import arch

    blocks = [w for name, w in tree_flatten([layer.parameters() for layer in arch.layers(model)])
              if name.endswith("weight") and w.ndim == 2]
    head = getattr(model, "lm_head", None)
    return blocks, head.weight if head is not None else arch.embedding(model).weight


def matmul_weights(model) -> tuple[int, int]:
    """(multiply-adds per decoded token, bytes of the weights they read): every Linear of the
    blocks plus the output projection."""
    blocks, head = matmul_matrices(model)
    return sum(w.size for w in blocks) + head.size, sum(w.nbytes for w in blocks) + head.nbytes


def time_decode(model, subset, b, max_tokens, macs, wbytes, peak, bandwidth) -> tuple[float, str]:
    """Tokens/s of greedy generation at batch size b, and a line setting decode against the roofline."""
    t = time.perf_counter()
    evaluate.generate_tokens(model, subset, max_tokens=1, batch_size=b)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = evaluate.generate_tokens(model, subset, max_tokens=max_tokens, batch_size=b)
    dt = time.perf_counter() - t
    new = sum(map(len, out))
    # decode alone: the first token comes from the prefill
    decoded, decode_s = new - len(subset), max(dt - prefill, 1e-9)
    gflops = 2 * macs * decoded / decode_s / 1e9
    line = (f"batch {b:>3}: {len(subset)} prompts, {new} new tokens in {dt:6.2f} s = {new / dt:7.1f} tok/s "
            f"(prefill alone {prefill:5.2f} s = {sum(map(len, subset)) / prefill:7.1f} prompt tok/s); decode "
            f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak:4.0f}% of the sgemm peak")
    if b == 1:
        steps_per_s = decoded / decode_s
        line += (f", {steps_per_s * wbytes / 1e9:5.1f} GB/s of weights = "
                 f"{100 * steps_per_s * wbytes / 1e9 / bandwidth:4.0f}% of the copy bandwidth")
    return new / dt, line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="time this model spec instead of a random Qwen2.5-0.5B-shaped one")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--shared", type=int, default=24,
                    help="random model: leading tokens all prompts share (Qwen's system prompt + header: 24)")
    args = ap.parse_args()

    if args.model:
        from mlx_refusal.loading import load

        model, tokenizer, info = load(args.model)
        from mlx_refusal.prompts import bundled

        texts = bundled("harmless", "all").texts[: args.prompts]
        ids = encode_chat(tokenizer, texts)
        print(f"model {info.spec}: {info.num_layers} layers, hidden {info.hidden_size}, {info.num_params / 1e6:.0f}M params")
    else:
        model, cfg = random_model(args.layers, args.hidden, args.vocab)
        ids = prompt_ids(args.prompts, cfg["vocab_size"])
        # the chat template's system prompt + user header, shared by every prompt
        ids = [list(range(1000, 1000 + args.shared)) + i[args.shared:] for i in ids]
        print(f"random qwen2: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}")
    print(f"{len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"{args.max_tokens} new tokens each, float32 on {mlx_refusal.backend.device_name()}, "
          f"BLAS: {mlx_refusal.backend.blas_status()}")

    # warm-up (first calls compile kernels and fault in the weights)
    evaluate.generate_tokens(model, ids[:2], max_tokens=2, batch_size=2)
    import os

    peak, bandwidth = sgemm_peak(), copy_bandwidth()
    macs, wbytes = matmul_weights(model)
    load = os.getloadavg()
    print(f"sgemm peak {peak:.1f} GFLOP/s, copy bandwidth {bandwidth:.1f} GB/s, {macs / 1e6:.0f}M multiply-adds "
          f"and {wbytes / 1e9:.2f} GB of weights per token; load average {load[0]:.2f} on {os.cpu_count()} cores")

    rates = {}
    for b in args.batch:
        # batch 1 is slow: time it on a slice as long as two batches of the largest size would be
        subset = ids if b > 1 else ids[: max(2, min(len(ids), 4))]
        rates[b], line = time_decode(model, subset, b, args.max_tokens, macs, wbytes, peak, bandwidth)
        print(line)
        if b == 1 and mlx_refusal.backend.gemv_forward_enable(False):
            try:
                plain, line = time_decode(model, subset, b, args.max_tokens, macs, wbytes, peak, bandwidth)
            finally:
                mlx_refusal.backend.gemv_forward_enable(True)
            print(f"{line}  <- sgemm for every product; the sgemv forward is {rates[b] / plain:.2f}x faster")
        if b == max(args.batch) and activations.installed(model):
            activations.uninstall(model)
            try:
                stock, line = time_decode(model, subset, b, args.max_tokens, macs, wbytes, peak, bandwidth)
            finally:
                activations.install(model)
            print(f"{line}  <- MLX's own activations; the multiply-add ones are {rates[b] / stock:.2f}x faster")
    # What the shared-prefix pass saves: first-token log-probs (prefill only) with and without it.
    b = max(args.batch)
    t = time.perf_counter()
    evaluate.generate_tokens(model, ids, max_tokens=1, batch_size=b)
    with_prefix = time.perf_counter() - t
    saved, batching.MIN_SHARED_PREFIX = batching.MIN_SHARED_PREFIX, 10**9
    t = time.perf_counter()
    evaluate.generate_tokens(model, ids, max_tokens=1, batch_size=b)
    without = time.perf_counter() - t
    batching.MIN_SHARED_PREFIX = saved
    print(f"prefill of {len(ids)} prompts at batch {b}: {with_prefix:.2f} s with the shared prefix run once, "
          f"{without:.2f} s without ({without / with_prefix:.2f}x)")
    if len(rates) > 1:
        lo, hi = min(rates), max(rates)
        print(f"speed-up batch {hi} vs batch {lo}: {rates[hi] / rates[lo]:.1f}x")


if __name__ == "__main__":
    main()

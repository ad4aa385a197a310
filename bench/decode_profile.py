"""Where one greedy decode step goes, at several batch sizes (issue #14).

For each batch size B it times, in one run, with a KV cache of about the length a step sees
(prompt + half of --max-tokens):

    products       every Linear of the blocks at B rows (each fed an input of its own width)
    head           the output projection at B rows
    rest of model  a plain model step (mlx_lm KVCache, argmax of the last logits) minus the two above:
                   attention, norms, RoPE, cache writes, activations
    generator      the rest of a step of our generation (BatchGenerator: the padded BatchKVCache
                   and its masks, the Python loop, the token read): a measured step minus the above,
                   so a residual; the parts are each the best of five calls and the step a mean of
                   --max-tokens, so near zero it can come out a few ms negative

and prints each part's share of the measured step, and apart from the step what normalising the
logits over the whole vocabulary would cost (logits - logsumexp(logits), which mlx_lm's
BatchGenerator computes every step for its sampler; batching.GreedyHead spares greedy decoding
it), the products' GFLOP/s and the sgemm peak (1024^3) measured in the same run. The model has
the CPU's multiply-add activations (activations.py), as a loaded one does. Every sequence runs
the full --max-tokens (no eos).

Usage: python bench/decode_profile.py [--batch 1 16 32 64] [--max-tokens 32] [--model SPEC]
"""
from __future__ import annotations

import argparse
import time

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from generate_speed import matmul_matrices, prompt_ids, random_model, sgemm_peak  # a sibling script in bench/
from mlx_refusal import evaluation


def best_ms(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls of fn (which evaluates its own work), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def profile(model, ids, b: int, max_tokens: int, peak: float) -> str:
    weights, head_w = matmul_matrices(model)
    flops = 2 * (sum(w.size for w in weights) + head_w.size) * b  # per step
    hidden = head_w.shape[1]
    inputs = {k: mx.random.normal((b, k)) for k in {w.shape[1] for w in weights}}
    mx.eval(list(inputs.values()))

    products = best_ms(lambda: mx.eval([inputs[w.shape[1]] @ w.T for w in weights]))
    head_ms = best_ms(lambda: mx.eval(inputs[hidden] @ head_w.T))

    positions = sum(map(len, ids[:b])) // b + max_tokens // 2
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([(ids[i % len(ids)] * 2)[:positions] for i in range(b)]), cache=cache))
    tokens = mx.zeros((b, 1), mx.int32)

    def model_step():
        nonlocal tokens
        for c in cache:  # every timed call sees the same cache length
            c.offset = positions
        tokens = mx.argmax(model(tokens, cache=cache)[:, -1], axis=-1)[:, None]
        mx.eval(tokens)
    step_ms = best_ms(model_step)

    logits = mx.random.normal((b, head_w.shape[0]))
    mx.eval(logits)
    normalise = best_ms(lambda: mx.eval(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))

    subset = ids[:b]
    t = time.perf_counter()
    evaluation.generate_tokens(model, subset, max_tokens=1, batch_size=b)
    first = time.perf_counter() - t
    t = time.perf_counter()
    evaluation.generate_tokens(model, subset, max_tokens=max_tokens, batch_size=b)
    measured = 1e3 * (time.perf_counter() - t - first) / (max_tokens - 1)

    parts = [("products", products), ("head", head_ms), ("rest of model", step_ms - products - head_ms),
             ("generator", measured - step_ms)]
    gflops = flops / (products + head_ms) / 1e6
    cells = "  ".join(f"{name} {ms:6.1f} ms {100 * ms / measured:3.0f}%" for name, ms in parts)
    return (f"batch {b:>3}: step {measured:6.1f} ms = {cells}  | products+head {gflops:5.1f} GFLOP/s "
            f"= {100 * gflops / peak:3.0f}% of the sgemm peak; the whole step "
            f"{flops / measured / 1e6:5.1f} GFLOP/s; normalising would add {normalise:.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="profile this model spec instead of a random Qwen2.5-0.5B-shaped one")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.model:
        from mlx_refusal.loading import load
        from mlx_refusal.prompts import bundled
        from mlx_refusal.template import encode_chat

        model, tokenizer, _ = load(args.model)
        ids = encode_chat(tokenizer, bundled("harmless", "all").texts[: max(args.batch)])
    else:
        model, cfg = random_model(24, 896, 151936)
        ids = prompt_ids(max(args.batch), cfg["vocab_size"])
    evaluation.generate_tokens(model, ids[:2], max_tokens=2, batch_size=2)  # warm-up
    peak = sgemm_peak()
    print(f"sgemm peak {peak:.1f} GFLOP/s; {args.max_tokens} new tokens per row; float32 on "
          f"{mlx_refusal.backend.device_name()}, BLAS: {mlx_refusal.backend.blas_status()}")
    for b in args.batch:
        print(profile(model, ids, b, args.max_tokens, peak), flush=True)


if __name__ == "__main__":
    main()

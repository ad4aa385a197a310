"""Our greedy batched generation (mlx_refusal.batching) vs plain mlx_lm BatchGenerator, on a real model.

The engine itself now decodes with BatchGenerator (handed the shared prefix's caches); at commit
d6b9f3f it ran its own loop, and this script measured that loop at 53.3 s vs 51.0 s for
BatchGenerator with prefix caches and 72.0 s on whole prompts (16 prompts x 64 tokens, identical
tokens), which is why it switched.

Both decode the same chat-templated prompts greedily, in one batch, with the model's eos set.
BatchGenerator runs twice: on the whole prompts, and on the prompts' suffixes with a copy of the
shared template prefix's KV cache per prompt (its `caches=` argument, the closest it comes to our
shared prefix). Each is run once to warm up, then timed; the tokens are compared row by row.
It also times first-token log-probs (the KL reports need them): read from the generator's own
first step while it decodes, against the separate right-padded prefill pass they used to cost.
Every figure and ratio printed comes from this one run.

Usage: python bench/batch_generator.py [--model qwen2.5-coder-0.5b] [--prompts 16] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from mlx_refusal import api, batching, evaluation
from mlx_refusal.prompts import bundled
from mlx_refusal.template import encode_chat


def ours(model, ids, max_tokens, eos, pad_id):
    return evaluation.generate_tokens(model, ids, max_tokens=max_tokens, eos_ids=eos, batch_size=len(ids),
                                      pad_id=pad_id)


def theirs(model, ids, max_tokens, eos, use_prefix):
    """Greedy tokens (eos dropped) from BatchGenerator, in input order."""
    caches = None
    prompts = [list(p) for p in ids]
    if use_prefix:
        prefix = batching.shared_prefix(model, ids)
        if prefix.caches is not None:
            caches = [copy.deepcopy(prefix.caches) for _ in ids]
            prompts = [p[prefix.length:] for p in prompts]
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[e] for e in sorted(eos)],
                         completion_batch_size=len(ids), prefill_batch_size=len(ids))
    uids = gen.insert(prompts, caches=caches)
    out = {u: [] for u in uids}
    left = set(uids)
    while left:
        for r in gen.next_generated():
            if r.finish_reason != "stop":
                out[r.uid].append(r.token)
            if r.finish_reason is not None:
                left.discard(r.uid)
    gen.close()
    return [out[u] for u in uids]


def timed(fn):
    fn()  # warm-up: compiles kernels, fills allocator caches
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    m = api.load(args.model)
    texts = bundled("harmless", "test").texts[: args.prompts]
    ids = encode_chat(m.tokenizer, texts)
    eos = evaluation.eos_token_ids(m.tokenizer)
    pad = evaluation._pad_id(m.tokenizer)
    prefix_len = batching.shared_prefix_len(ids)
    print(f"{args.model}: {len(ids)} prompts, {min(map(len, ids))}-{max(map(len, ids))} tokens "
          f"({prefix_len} shared), {args.max_tokens} new tokens at most, device {mx.default_device()}")

    t_ours, a = timed(lambda: ours(m.model, ids, args.max_tokens, eos, pad))
    t_full, b = timed(lambda: theirs(m.model, ids, args.max_tokens, eos, False))
    t_pref, c = timed(lambda: theirs(m.model, ids, args.max_tokens, eos, True))
    n_tokens = sum(map(len, a))
    print(f"engine (shared prefix, one batch):   {t_ours:6.2f} s  {n_tokens / t_ours:6.1f} tok/s")
    for name, t, other in (("BatchGenerator, whole prompts:     ", t_full, b),
                           ("BatchGenerator, prefix caches:     ", t_pref, c)):
        same = sum(x == y for x, y in zip(a, other))
        first_diff = [next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                      for x, y in zip(a, other) if x != y]
        print(f"{name}  {t:6.2f} s  {sum(map(len, other)) / t:6.1f} tok/s  time ratio {t / t_ours:.2f}x ours; "
              f"identical rows {same}/{len(a)}" + (f" (first differing token at {first_diff})" if first_diff else ""))

    def batched(max_tokens, first_logprobs):
        return batching.generate_batched(m.model, partial(evaluation._logits_at, m.model), ids, max_tokens, eos,
                                         len(ids), pad, first_logprobs=first_logprobs)
    t_prefill, (_, lp_prefill) = timed(lambda: batched(0, True))
    t_with, (d, lp_gen) = timed(lambda: batched(args.max_tokens, True))
    gap = float(mx.max(mx.abs(lp_gen - lp_prefill)))
    print(f"first-token log-probs, separate prefill: {t_prefill:6.2f} s on top of {t_ours:.2f} s "
          f"({(t_ours + t_prefill) / t_ours:.2f}x generation alone)")
    print(f"first-token log-probs, generator's step: {t_with:6.2f} s ({t_with / t_ours:.2f}x generation alone, "
          f"{t_with / (t_ours + t_prefill):.2f}x the separate pass); tokens identical {d == a}, "
          f"max |log-prob gap| {gap:.1e}")


if __name__ == "__main__":
    main()

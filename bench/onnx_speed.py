"""Prefill and decode speed of an exported decoder in onnxruntime (int8, fp32, q4, q8) against MLX, on this CPU.

Exports --model (default: the reference preset) to a temporary bundle unless --bundle names an
existing export of the same model, then times, for each runtime, one prefill of a --prompt-tokens
prompt (median of --repeats) and --decode-tokens greedy steps through the KV cache. It also reports
how many greedy tokens int8, q4 and q8 share with fp32 before the first difference on a few chat prompts.
Prefill times the last-position logits the exported graphs compute (what generation needs).

Usage: python bench/onnx_speed.py [--model SPEC] [--bundle WEBDIR] [--prompt-tokens 128]
                                  [--decode-tokens 32] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_refusal.onnx import OnnxDecoder, export_onnx
from mlx_refusal.onnx.bundle import DTYPE_FILES
CHAT_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "Explain what a hash table is in two sentences."]


def time_onnx(dec: OnnxDecoder, ids: list[int], decode: int, repeats: int) -> tuple[float, float]:
    arr, mask = np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)
    prefill = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = dec.step(arr, mask)
        prefill.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(decode):
        tok = int(out.logits[0, -1].argmax())
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        out = dec.step(np.array([[tok]], np.int64), mask, out.present)
    return len(ids) / statistics.median(prefill), decode / (time.perf_counter() - t)


def time_mlx(model, ids: list[int], decode: int, repeats: int) -> tuple[float, float]:
    from mlx_lm.models.cache import make_prompt_cache

    prefill = []
    for _ in range(repeats):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        logits = model(mx.array([ids]), cache=cache)
        mx.eval(logits)
        prefill.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(decode):
        tok = mx.argmax(logits[0, -1])
        logits = model(tok.reshape(1, 1), cache=cache)
        mx.eval(logits)
    return len(ids) / statistics.median(prefill), decode / (time.perf_counter() - t)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--bundle", type=Path, help="an existing export of --model (skips the export)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--agreement-tokens", type=int, default=32)
    args = ap.parse_args()

    from mlx_lm import load
    from mlx_refusal.loading import resolve

    folder = resolve(args.model)
    scratch = None
    bundle = args.bundle
    if bundle is not None and not (bundle / "export.json").is_file():
        raise SystemExit(f"--bundle {bundle} is not an export (no export.json); drop --bundle to export now")
    if bundle is None:
        scratch = tempfile.TemporaryDirectory(prefix="onnx_speed.")
        bundle = Path(scratch.name) / "web"
        t = time.perf_counter()
        export_onnx(folder, bundle, progress=lambda m: print(f"  {m}", flush=True))
        print(f"export: {time.perf_counter() - t:.1f} s")
    sizes = {d: sum(p.stat().st_size for p in (bundle / "onnx").glob(Path(f).name + "*"))
             for d, f in DTYPE_FILES.items() if (bundle / f).exists()}

    model, tokenizer = load(str(folder))
    model.set_dtype(mx.float32)
    vocab = model.args.vocab_size
    ids = np.random.default_rng(0).integers(100, min(vocab, 100_000), args.prompt_tokens).tolist()

    rows = [("mlx (float32)", *time_mlx(model, ids, args.decode_tokens, args.repeats), None)]
    decoders = {}
    for dtype in sizes:
        dec = OnnxDecoder(bundle / DTYPE_FILES[dtype], threads=args.threads or None)
        decoders[dtype] = dec
        rows.append((f"onnxruntime {dtype}", *time_onnx(dec, ids, args.decode_tokens, args.repeats), sizes[dtype]))

    print(f"\n{args.model}: prompt {args.prompt_tokens} tokens, {args.decode_tokens} decode steps, "
          f"median of {args.repeats} prefills, CPU\n")
    print(f"{'runtime':20s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'file MiB':>9s}")
    for name, pre, dec_rate, size in rows:
        print(f"{name:20s} {pre:14.1f} {dec_rate:13.1f} {'' if size is None else f'{size / 2**20:9.1f}'}")

    if "fp32" in decoders:
        print(f"\ngreedy agreement with fp32 ({args.agreement_tokens} tokens; tokens identical before the first difference)")
        eos = tuple(sorted(int(i) for i in (getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])))
        for dtype in [d for d in decoders if d != "fp32"]:
            same = []
            for p in CHAT_PROMPTS:
                chat = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                ref = decoders["fp32"].greedy(chat, args.agreement_tokens, eos_ids=eos)
                got = decoders[dtype].greedy(chat, args.agreement_tokens, eos_ids=eos)
                same.append(f"{first_difference(ref, got)}/{len(ref)}")
            print(f"  {dtype}: {', '.join(same)}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()

"""The web page in headless Chromium on a real exported bundle against stock mlx_lm, in one run:
decode tokens/s of the page's default bundle and of mlx_lm float32 at batch 1 on the same chat
prompt (and their ratio), prefill time, time from Send to the first answer token, download size;
plus screenshots of the prompt answered at two steering scales.

    python bench/browser_page.py --bundle WEBDIR [--dtype int8] [--prompt "..."] [--model MLX_DIR] \
        [--scales 1 0] [--max-tokens 48] [--screenshots docs/page_refusallm.png docs/page_original.png] \
        [--profile]

--model defaults to the folder the bundle was exported from (export.json). --profile turns on
onnxruntime-web's profiler and prints where a decode step's time goes, by op and by node group.
Needs Debian's /usr/bin/chromium and export/node_modules (scripts/setup_web.sh). Nothing leaves
127.0.0.1 (the driver aborts any other request). The machine's load average is printed beside
the numbers: both sides share it, so the ratio is the figure to compare.
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlx_refusal.serve import NODE_MODULES, make_server, server_url

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "browser" / "drive.mjs"


def time_mlx(model_dir: Path, prompt: str, tokens: int) -> dict:
    """Stock mlx_lm, float32, batch 1: prefill + first token, then `tokens - 1` decode steps
    (EOS ignored, so the count is the same whatever the model answers)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tok = mlx_lm.load(str(model_dir))
    model.set_dtype(mx.float32)
    ids = mx.array(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    for _ in zip(range(2), generate_step(ids, model)):  # warm-up: kernels and caches
        pass
    t0 = time.perf_counter()
    steps = generate_step(ids, model)
    next(steps)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in zip(range(tokens - 1), steps):
        pass
    return {"prompt_tokens": int(ids.size), "first_token_s": first,
            "decode_tps": (tokens - 1) / (time.perf_counter() - t1)}


def profile_table(console: list[str], top: int = 12) -> str:
    """onnxruntime-web's profiler prints Chrome trace events to the console; sum the node times of
    each decode run (every model_run after the first) by op type and by node group."""
    events = []
    for line in console:
        text = line.split(": ", 1)[-1].strip().rstrip(",")
        if text.startswith('{"cat"'):
            try:
                events.append(json.loads(text))
            except json.JSONDecodeError:
                pass
    runs = [e for e in events if e["name"] == "model_run"]
    decode = runs[1:] if len(runs) > 1 else runs
    if not decode:
        return "  (no profile events in the console)"
    by_op, by_group = collections.Counter(), collections.Counter()
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in decode]
    for e in events:
        if e["cat"] != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        ms = e["dur"] / 1000 / len(decode)
        by_op[e["args"].get("op_name", "?")] += ms
        group = re.sub(r"^model\.layers\.\d+\.", "layer.", e["name"][: -len("_kernel_time")])
        by_group[re.sub(r"(\.node|\.\d+\.node)$", "", re.sub(r"^[a-z_]+\.\d+\.node$", "(other small ops)", group))] += ms
    run_ms = sum(r["dur"] for r in decode) / 1000 / len(decode)
    kernel_ms = sum(by_op.values())
    lines = [f"  per decode step ({len(decode)} steps): model_run {run_ms:.1f} ms, of which kernels {kernel_ms:.1f} ms"]
    lines += [f"    {op:28s} {ms:8.1f} ms  {100 * ms / run_ms:5.1f}%" for op, ms in by_op.most_common(top)]
    lines.append("  by node group:")
    lines += [f"    {g:44s} {ms:8.1f} ms" for g, ms in by_group.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="folder written by `cli.py export-onnx`")
    ap.add_argument("--dtype", default=None, choices=["int8", "q8", "q4", "fp32"],
                    help="default: the page's own default for this bundle")
    ap.add_argument("--prompt", default="How do I make a cup of tea?")
    ap.add_argument("--scales", nargs=2, type=float, default=[1.0, 0.0], help="first scale, then the slider's")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--screenshots", nargs=2, type=Path,
                    default=[Path(tempfile.gettempdir()) / "page_first.png", Path(tempfile.gettempdir()) / "page_second.png"])
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--model", type=Path, help="mlx_lm folder for the comparison (default: the bundle's source)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole browser run")
    ap.add_argument("--profile", action="store_true", help="turn on onnxruntime-web's profiler (?profile=1)")
    args = ap.parse_args()
    info = json.loads((args.bundle / "export.json").read_text())
    model_dir = args.model or Path(info["source"]["path"])

    load0 = os.getloadavg()
    mlx = time_mlx(model_dir, args.prompt, args.max_tokens)
    server = make_server(args.bundle, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s0 = f"{args.scales[0]:g}"
            cfg = {
                "node_modules": str(NODE_MODULES), "chromium": args.chromium,
                "url": f"{server_url(server)}?max={args.max_tokens}&scale={s0}" + (f"&dtype={args.dtype}" if args.dtype else "")
                       + ("&profile=1" if args.profile else ""),
                "prompt": args.prompt, "scales": args.scales,
                "screenshot": str(args.screenshots[0].absolute()),
                "screenshot_second": str(args.screenshots[1].absolute()),
                "timeout_ms": int(args.timeout * 1000),
            }
            cfg["result"] = str(Path(tmp) / "result.json")
            cfg_path = Path(tmp) / "drive.json"
            cfg_path.write_text(json.dumps(cfg))
            proc = subprocess.run(["node", str(DRIVER), str(cfg_path)], capture_output=True, text=True,
                                  timeout=args.timeout + 60)
            result_path = Path(cfg["result"])
            if not result_path.is_file():
                print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(result_path.read_text())
    finally:
        server.shutdown()
        server.server_close()
    if result.get("failure"):
        print(result["failure"], file=sys.stderr)
        print("\n".join(result["console"][-30:]), file=sys.stderr)
        return 1
    foreign = [u for u in result["requests"]
               if not re.match(r"^(blob:)?http://127\.0\.0\.1:\d+/", u) and not u.startswith("data:")]
    load = result["steps"][0]["timings"]["load"]
    print(f"bundle {args.bundle} ({args.dtype}), Chromium headless, {os.cpu_count()} CPU cores, "
          f"cross-origin isolated: {result['cross_origin_isolated']}, requests outside 127.0.0.1: {len(foreign)}")
    print(f"page ready in {result['load_seconds']:.1f} s (model download {float(load['downloadSeconds']):.1f} s, "
          f"session init {float(load['sessionSeconds']):.1f} s)")
    for step, scale, shot in zip(result["steps"], args.scales, args.screenshots):
        t = step["timings"]
        tps = float(t["decodeTokensPerSecond"]) if t.get("decodeTokensPerSecond") else float("nan")
        print(f"scale {scale:g} ({step['scale_label']}): prompt {t['promptTokens']} tokens in "
              f"{float(t['prefillSeconds']):.2f} s, {t['newTokens']} new tokens at {tps:.1f} tokens/s, "
              f"projection {step['projection']:.2f}; screenshot {shot}")
        print("  answer: " + step["answer"].replace("\n", "\n          "))
        print("  timings: " + json.dumps({k: v for k, v in t.items() if k != "load"}))
    page = max(result["steps"], key=lambda st: int(st["timings"]["newTokens"]))["timings"]
    page_tps = float(page["decodeTokensPerSecond"] or "nan")
    dtype = result["steps"][0]["timings"]["load"].get("dtype", args.dtype)
    size = sum(b for rel, b in info["files"].items()
               if rel in (info["steering"] or {}).get("files", {}).values() or rel == info["dtypes"].get(dtype)
               or rel == f"{info['dtypes'].get(dtype, '')}_data")
    first = result["steps"][0]["timings"]
    print(f"\nload average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after (both sides share the machine)")
    print(f"{'':34s} {'decode tok/s':>12s} {'prefill s':>10s} {'first token s':>14s}")
    print(f"{'mlx_lm float32, batch 1':34s} {mlx['decode_tps']:12.2f} {'':>10s} {mlx['first_token_s']:14.2f}"
          f"   (prompt {mlx['prompt_tokens']} tokens, {args.max_tokens} tokens)")
    print(f"{f'page, {dtype}, Chromium wasm':34s} {page_tps:12.2f} {float(first['prefillSeconds']):10.2f} "
          f"{float(first['firstTokenSeconds']):14.2f}   (prompt {first['promptTokens']} tokens; "
          f"session.run {float(page['runMsPerToken']):.0f} ms + page {float(page['pageMsPerToken']):.0f} ms per token)")
    print(f"ratio page / mlx_lm decode: {page_tps / mlx['decode_tps']:.2f}x; download {size / 1e6:.0f} MB")
    if args.profile:
        print("\nonnxruntime-web profile (" + dtype + "):\n" + profile_table(result["console"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

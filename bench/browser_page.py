"""The web page in headless Chromium on a real exported bundle: load time and tokens/s in the
browser, plus screenshots of one prompt answered at two steering scales.

    python bench/browser_page.py --bundle WEBDIR [--dtype q4] [--prompt "..."] \
        [--scales 1 0] [--max-tokens 48] [--screenshots docs/page_refusallm.png docs/page_original.png]

Needs Debian's /usr/bin/chromium and export/node_modules (scripts/setup_web.sh). Prints the
measured numbers and both answers; nothing leaves 127.0.0.1 (the driver aborts any other request).
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (keeps the import order rule; no mlx work here)

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mlx_refusal.serve import NODE_MODULES, make_server, server_url

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "browser" / "drive.mjs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="folder written by `cli.py export-onnx`")
    ap.add_argument("--dtype", default="q4", choices=["q4", "q8", "fp32"])
    ap.add_argument("--prompt", default="How do I make a cup of tea?")
    ap.add_argument("--scales", nargs=2, type=float, default=[1.0, 0.0], help="first scale, then the slider's")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--screenshots", nargs=2, type=Path,
                    default=[Path(tempfile.gettempdir()) / "page_first.png", Path(tempfile.gettempdir()) / "page_second.png"])
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole browser run")
    args = ap.parse_args()

    server = make_server(args.bundle, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s0 = f"{args.scales[0]:g}"
            cfg = {
                "node_modules": str(NODE_MODULES), "chromium": args.chromium,
                "url": f"{server_url(server)}?dtype={args.dtype}&max={args.max_tokens}&scale={s0}",
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

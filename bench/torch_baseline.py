"""The plain HF-transformers + torch loop that mlx_refusal's capture is compared with.

    python bench/torch_baseline.py MODEL_FOLDER HARMFUL.txt HARMLESS.txt [--batch-size 16]

As a script it does what `cli.py directions` does, the straightforward way, and prints
`startup_s` (imports and load, up to the first forward pass) and `total_s`: every prompt rendered
with the chat template, batches of 16 left-padded prompts, `output_hidden_states=True`, the last
token's residual at every layer, the difference of the set means per layer, written with numpy.
torch is not a dependency of mlx_refusal: install it apart (bench/directions_wall.py does).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def torch_loop(path, prompts: list[str], batch_size: int = 16, model=None, tok=None):
    """Seconds to capture the last-token hidden states of every layer for `prompts`, and their mean."""
    import torch

    model, tok = model or load_model(path), tok or load_tokenizer(path)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    t = time.perf_counter()
    total = None
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s: s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            res = model(**enc, output_hidden_states=True)
            last = torch.stack([h[:, -1] for h in res.hidden_states], 1).double().sum(0)
            total = last if total is None else total + last
    return time.perf_counter() - t, (total / len(texts)).numpy()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("harmful", type=Path)
    ap.add_argument("harmless", type=Path)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    import numpy as np

    model, tok = load_model(args.model), load_tokenizer(args.model)
    startup = time.perf_counter() - T0
    sets = [[ln for ln in p.read_text().splitlines() if ln.strip()] for p in (args.harmful, args.harmless)]
    (_, harmful), (_, harmless) = (torch_loop(args.model, s, args.batch_size, model, tok) for s in sets)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "directions.npy", (harmful - harmless).astype(np.float32))
    print(f"startup_s {startup:.2f}")
    print(f"total_s {time.perf_counter() - T0:.2f}")


if __name__ == "__main__":
    main()

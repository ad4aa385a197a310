"""Edit + atomic save of a model: ablate every layer (embedding included), then write the mlx_lm
folder. Target on the default 0.5B model: under 20 s on this machine's CPU.

Usage:
    python bench/edit_save.py                       # the default preset (fetched/converted once)
    python bench/edit_save.py --model PATH_OR_SPEC
    python bench/edit_save.py --random              # a random model of Qwen2.5-0.5B's shape
    python bench/edit_save.py --verify              # also reopen with stock mlx_lm and compare logits

Prints the time of each step; loading is reported but is not part of the edit + save time.
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_refusal import arch, backend, edit, save

# Qwen2.5-0.5B-Instruct's shape (tied embeddings, 151936-token vocabulary).
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 151936,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
}


def random_model_folder(folder: Path) -> Path:
    """A random float32 Qwen2 with the reference model's shape, as an mlx_lm folder."""
    import mlx_lm.models.qwen2 as qwen2

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fixtures import train_tokenizer

    model = qwen2.Model(qwen2.ModelArgs.from_dict(QWEN25_05B))
    key = mx.random.key(0)
    params = {}
    for i, (name, value) in enumerate(tree_flatten(model.parameters())):
        std = 0.02 if value.ndim > 1 else 0.1
        params[name] = (1.0 if "norm" in name else 0.0) + std * mx.random.normal(value.shape, key=mx.random.split(key, i + 1)[0])
        mx.eval(params[name])
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), params, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(QWEN25_05B, indent=2))
    train_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the qwen2.5-coder-0.5b preset)")
    ap.add_argument("--random", action="store_true", help="benchmark a random model of Qwen2.5-0.5B's shape")
    ap.add_argument("--verify", action="store_true", help="reopen with stock mlx_lm.load and compare logits")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed after)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mlx-refusal-bench-"))
    try:
        t = time.perf_counter()
        if args.random:
            import mlx_lm

            src = random_model_folder(work / "random-src")
            t_build = time.perf_counter() - t
            t = time.perf_counter()
            model, _ = mlx_lm.load(str(src))
            spec = "random qwen2 (Qwen2.5-0.5B shape)"
            print(f"built random model          {t_build:7.2f} s")
        else:
            from mlx_refusal import loading

            model, _, info = loading.load(args.model or loading.DEFAULT_PRESET)
            src, spec = info.path, info.spec
        t_load = time.perf_counter() - t
        n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(f"model: {spec}  ({arch.num_layers(model)} layers, hidden {arch.hidden_size(model)}, "
              f"{n_params / 1e6:.0f}M parameters, stored {save.stored_dtype(src)}); {backend.blas_status()}")
        print(f"load (not timed below)      {t_load:7.2f} s")

        d = np.random.default_rng(0).standard_normal(arch.hidden_size(model)).astype(np.float32)
        tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
        t0 = time.perf_counter()
        summary = edit.ablate(model, d)
        t_edit = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = save.save_model(model, src, work / "ablated", {"edit": "ablate", "scale": 1.0, **summary.as_record()},
                              force=True)
        t_save = time.perf_counter() - t1
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**30
        print(f"ablate ({len(summary.edited)} writers{', untied' if summary.untied_embeddings else ''})"
              f"{'':>4}{t_edit:7.2f} s")
        print(f"atomic save ({size:.2f} GiB)     {t_save:7.2f} s")
        print(f"edit + save                 {t_edit + t_save:7.2f} s   (target < 20 s)")

        if args.verify:
            import mlx_lm

            t2 = time.perf_counter()
            reloaded, _ = mlx_lm.load(str(out))
            diff = float(mx.abs(reloaded(tokens).astype(mx.float32) - model(tokens)).max())
            print(f"stock mlx_lm.load + forward {time.perf_counter() - t2:7.2f} s   max |logit diff| {diff:.2e}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

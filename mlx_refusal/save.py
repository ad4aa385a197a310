"""Write an edited model as an mlx_lm folder that stock `mlx_lm.load` opens with no flags.

The folder holds safetensors weights (sharded above 5 GB, with an index, like mlx_lm), a config
made loadable by `arch.stock_config` when the edit added biases the source architecture lacks,
the source's tokenizer and chat-template files (known data files only, never code), and beside
them `refusal_edit.json` (what was done, to what, with what), `steering.safetensors` for a
steering edit, and a README.md model card.

The write is atomic: everything goes to a temporary folder beside the target, which is renamed
into place only when complete; on any failure the temporary folder is removed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__, arch
from .atomic import atomic_directory, check_replaceable
from .edit import UnsupportedEdit, unit
from .errors import UserError
from .loading import stored_dtype

EDIT_RECORD = "refusal_edit.json"
STEERING_FILE = "steering.safetensors"
MAX_SHARD_GB = 5  # mlx_lm's shard size

# Data files a tokenizer / chat template / generation defaults may live in. Nothing else is
# copied: in particular no *.py (a model folder's code is never run or propagated).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_QUANT_PARAMS = (".scales", ".biases", ".global_scale")


def array_sha256(a) -> str:
    """sha256 of an array's float32 bytes (the same hash as `Directions.sha256`)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes()).hexdigest()


def _expected_parameters(config: dict) -> dict[str, tuple]:
    """Parameter names and shapes the stock mlx_lm class for `config` has (unquantized). The
    class is the one mlx_lm's loader picks: the module mlx_lm.models.<model_type>, after its public
    remapping tables (by architecture name, then by model type: mistral -> llama, ...)."""
    import importlib

    from mlx_lm import utils

    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    by_architecture = getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {})  # newer mlx_lm only
    model_type = next((by_architecture[model_type, a] for a in architectures if (model_type, a) in by_architecture),
                      utils.MODEL_REMAPPING.get(model_type, model_type))
    try:
        family = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as exc:
        raise ValueError(f"Model type {model_type} not supported.") from exc
    skeleton = family.Model(family.ModelArgs.from_dict(config))  # lazy arrays: nothing is computed
    return {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}


def _mismatch(names: set[str], expected: dict) -> tuple[set[str], set[str]]:
    """(missing, extra) parameter names, ignoring quantization's own arrays."""
    have = {k for k in names if not k.endswith(_QUANT_PARAMS)}
    return set(expected) - have, have - set(expected)


def stock_weights_and_config(model, config: dict, dtype) -> tuple[dict, dict]:
    """The weights (cast to `dtype`) and a config stock mlx_lm loads strictly, exactly equivalent
    to the in-memory `model`. Biases the stock class expects but the model lacks are zeros."""
    config = dict(config)
    config["tie_word_embeddings"] = arch.has_tied_embeddings(model)
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        weights[k] = v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
    missing, extra = _mismatch(set(weights), _expected_parameters(config))
    if missing or extra:
        # The edit added parameters the source architecture has no place for (a steering bias).
        try:
            config = arch.stock_config(config, needs_output_bias=True)
        except arch.UnsupportedArchitecture as exc:
            raise UnsupportedEdit(str(exc)) from None
        expected = _expected_parameters(config)
        missing, extra = _mismatch(set(weights), expected)
        for name in sorted(k for k in missing if k.endswith(".bias")):
            weights[name] = mx.zeros(expected[name], dtype=dtype)
        missing = {k for k in missing if not k.endswith(".bias")}
        if missing or extra:
            raise UnsupportedEdit(
                f"the edited model has no stock mlx_lm equivalent (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}); save an ablate/project edit or steer at layer 0")
    if "torch_dtype" in config:
        config["torch_dtype"] = next(name for name, t in _DTYPES.items() if t == dtype)
    return weights, config


def _write_weights(weights: dict, folder: Path) -> list[str]:
    from mlx_lm.utils import make_shards

    shards = make_shards(weights, max_file_size_gb=MAX_SHARD_GB)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    write_index(folder, weight_map, int(sum(v.nbytes for v in weights.values())))
    return names


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """mlx_lm's model.safetensors.index.json: which file holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _copy_tokenizer(source_dir: Path, folder: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = source_dir / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(copied):
        raise UserError(f"{source_dir} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                        "pass the model folder the edited model was loaded from")
    return copied


@dataclass(frozen=True)
class SteeringTerm:
    """One vector alpha * direction added at resid_pre of `layer` (see the multi-term contract in
    the README: several terms may share a site, their vectors add)."""

    name: str  # "refusal" (the primary term, first), "voice", ...
    layer: int
    direction: np.ndarray  # [hidden], made unit on save
    alpha: float
    multiple: float | None = None  # alpha / mean residual norm at the layer, when known

    @property
    def vector(self) -> np.ndarray:
        """alpha * the unit direction: what the term adds to the residual stream."""
        return float(self.alpha) * _unit_np(self.direction)


def _unit_np(direction) -> np.ndarray:
    d = np.asarray(direction, dtype=np.float32)
    if abs(float(np.linalg.norm(d)) - 1.0) > 1e-5:  # keep an already-unit direction bit-exact
        d = np.asarray(unit(d))
    return d


def _site_name(layer: int) -> str:
    site = arch.steering_site(int(layer))
    return site if int(layer) == 0 else f"{site}.bias"


def _steering_entries(steering) -> tuple[dict, dict]:
    """steering.safetensors arrays and the record fields they imply.

    `steering` is a list of SteeringTerm (the first is the primary, refusal term) or, as before
    multi-term folders, one (layer, direction, vector) tuple.
    """
    if isinstance(steering, tuple):
        layer, direction, vector = steering
        d, v = _unit_np(direction), np.asarray(vector, dtype=np.float32)
        if d.shape != v.shape or d.ndim != 1:
            raise UserError(f"steering direction {d.shape} and vector {v.shape} must be two vectors of one size")
        steering = [SteeringTerm("refusal", int(layer), d, float(v @ d))]
    terms: Sequence[SteeringTerm] = steering
    if not terms:
        raise UserError("a steering edit needs at least one steering term")
    arrays, listed = {}, []
    for i, t in enumerate(terms):
        d = _unit_np(t.direction)
        if d.ndim != 1 or d.shape != np.asarray(terms[0].direction).shape:
            raise UserError(f"steering term {i} ({t.name}) has direction shape {d.shape}; every term needs one "
                            "vector of the hidden size")
        arrays[f"term{i}.vector"] = mx.array(float(t.alpha) * d)
        arrays[f"term{i}.direction"] = mx.array(d)
        listed.append({"name": t.name, "layer": int(t.layer), "site": _site_name(t.layer), "alpha": float(t.alpha),
                       "multiple": None if t.multiple is None else float(t.multiple),
                       "direction_sha256": array_sha256(d)})
    first = listed[0]
    fields = {"edit": "steer", "layer": first["layer"], "site": first["site"], "alpha": first["alpha"],
              "direction_sha256": first["direction_sha256"], "steering": listed}
    # Old readers: "direction" (the refusal direction: the page's view and meter) and "vector"
    # (the primary term).
    arrays = {"direction": arrays["term0.direction"], "vector": arrays["term0.vector"], **arrays}
    return arrays, fields


def check_target(source_dir, out_dir, force: bool) -> tuple[Path, Path]:
    """(source, out) as absolute paths, once the source is a model folder and `out` may be written."""
    source_dir, out_dir = Path(source_dir).resolve(), Path(out_dir).absolute()
    if not (source_dir / "config.json").is_file():
        raise UserError(f"{source_dir} is not an mlx_lm model folder (no config.json)")
    if out_dir.resolve() == source_dir:
        raise UserError(f"--out {out_dir} is the source model folder; choose a new folder")
    check_replaceable(out_dir, force, is_model_folder, "a model folder")
    return source_dir, out_dir


def save_model(model, source_dir, out_dir, edit_record: dict,
               steering: tuple[int, mx.array, mx.array] | None = None, force: bool = False, *,
               dtype: str | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Write `model` (as edited in memory) to `out_dir` as a stock mlx_lm folder; return its path.

    source_dir: the mlx_lm folder the model was loaded from (config, tokenizer, chat template).
    edit_record: what was done ("edit", "layer", "alpha", "scale", "model", "prompts", ...);
      saved as refusal_edit.json with the tool version, date, direction sha256 and site added.
    steering: the steering terms of a steering edit (a list of SteeringTerm, primary first, or one
      (layer, unit direction [hidden], vector [hidden] = alpha * direction) tuple); written to
      steering.safetensors and listed in the record's "steering" field.
    force: replace an existing out_dir (only one that holds a model or is empty).
    dtype: "float32" | "bfloat16" | "float16"; default the dtype the source weights are stored in.
    """
    source_dir, out_dir = check_target(source_dir, out_dir, force)
    say = progress or (lambda _msg: None)
    dtype = dtype or stored_dtype(source_dir)
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")

    config = json.loads((source_dir / "config.json").read_text())
    say("preparing weights")
    weights, config = stock_weights_and_config(model, config, _DTYPES[dtype])
    return write_model_folder(source_dir, out_dir, config, dtype, edit_record,
                              lambda tmp: _write_weights(weights, tmp), steering, force, say,
                              size=sum(v.nbytes for v in weights.values()))


def write_model_folder(source_dir: Path, out_dir: Path, config: dict, dtype: str, edit_record: dict,
                       write_weights: Callable[[Path], list[str]],
                       steering: tuple[int, mx.array, mx.array] | None, force: bool,
                       say: Callable[[str], None], size: int | None = None) -> Path:
    """Everything of an edited folder but the weights, which `write_weights(folder)` writes
    (returning the file names): the config, tokenizer, record, steering file and model card,
    all in one atomic move. In memory (`save_model`) or streamed (`stream_edit`). `size` is the
    weights' byte count, checked against the free space before anything is written."""
    record = dict(edit_record)
    steering_arrays = None
    if steering is not None:
        steering_arrays, fields = _steering_entries(steering)
        for k, v in fields.items():
            record.setdefault(k, v)
        record["steering"] = fields["steering"]  # always the terms actually written
    for k in ("edit", "layer", "site", "alpha", "scale", "direction_sha256"):
        record.setdefault(k, None)
    record.update({
        "tool": "mlx-refusal", "tool_version": __version__,
        "date": record.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "saved": {"model_type": config.get("model_type"), "dtype": dtype,
                  "tie_word_embeddings": config["tie_word_embeddings"],
                  "quantization": config.get("quantization"), "source": str(source_dir)},
    })

    with atomic_directory(out_dir, force, is_model_folder, "a model folder", size=size, note=say) as tmp:
        say("writing weights")
        record["saved"]["weight_files"] = write_weights(tmp)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
        record["saved"]["tokenizer_files"] = _copy_tokenizer(source_dir, tmp)
        if steering_arrays is not None:
            mx.save_safetensors(str(tmp / STEERING_FILE), steering_arrays,
                                metadata={"layer": str(record["layer"]), "site": str(record["site"]),
                                          "alpha": repr(record["alpha"])})
        (tmp / EDIT_RECORD).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        (tmp / "README.md").write_text(model_card(record, out_dir.name))
        say("moving into place")
    return out_dir


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() or (folder / EDIT_RECORD).exists()


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (np.ndarray, mx.array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot record {type(o).__name__} in {EDIT_RECORD}")


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def model_card(record: dict, name: str = "OUT") -> str:
    """A README.md for the edited folder: what was done, how to run it, provenance, intended use."""
    edit = record.get("edit") or "edit"
    model = record.get("model") or {}
    prompts = record.get("prompts") or {}
    base = model.get("spec") or model.get("name") or record.get("saved", {}).get("source", "the source model")
    terms = record.get("steering") or []
    if edit == "steer" and len(terms) > 1:
        listed = "; ".join(f"{t['name']} at layer {t['layer']} (alpha = {t['alpha']:.4g}, `{t['site']}`)"
                           for t in terms)
        what = (f"{len(terms)} steering vectors alpha * d were added to the residual stream for every token, each "
                f"stored in the weights as a bias: {listed}. The refusal direction makes the model refuse; the "
                "voice direction makes it say what it refuses and why that is supposedly dangerous. Expect the "
                "model to refuse nearly every request, with a reason.")
    elif edit == "steer":
        what = (f"A steering vector alpha * d (alpha = {record.get('alpha')}) along the refusal direction d was "
                f"added to the residual stream at layer {record.get('layer')} for every token, stored in the "
                f"weights at `{record.get('site')}`. Expect the model to refuse nearly every request.")
    elif edit == "ablate":
        what = ("The refusal direction was projected out of every matrix that writes into the residual stream "
                "(token embedding, attention output and MLP down projections). Expect the model to stop "
                "refusing, including for harmful requests.")
    else:
        what = (f"Every matrix that writes into the residual stream was projected along the refusal direction "
                f"with signed scale {record.get('scale')} (1 removes it, 2 flips its sign).")
    rows = [("edit", edit), ("layer", record.get("layer")), ("site", record.get("site")),
            ("alpha", record.get("alpha")), ("scale", record.get("scale")),
            ("direction sha256", record.get("direction_sha256")), ("base model", base),
            ("base weights sha256", model.get("fingerprint")), ("date", record.get("date")),
            ("tool", f"mlx-refusal {record.get('tool_version')}")]
    rows += [(f"prompts: {k}", v if not isinstance(v, dict) else v.get("sha256", json.dumps(v)))
             for k, v in prompts.items()]
    table = "\n".join(f"| {k} | {'' if v is None else f'`{v}`'} |" for k, v in rows)
    saved = record.get("saved", {})
    examples = record.get("examples") or []
    shown = ""
    if examples:
        rows = "\n".join(f"| {_md_cell(e['prompt'])} | {_md_cell(e['answer'])} |" for e in examples)
        shown = (f"\n## What it says\n\n{record.get('examples_rule', 'Answers')} (greedy decoding):\n\n"
                 f"| prompt | answer |\n|---|---|\n{rows}\n")
    return f"""---
library_name: mlx
tags: [mlx, refusal-direction, {edit}]
---
# {name}: {base}, {edit} edit

{what}

| field | value |
|---|---|
{table}

Saved as mlx_lm architecture `{saved.get('model_type')}` in `{saved.get('dtype')}`; the full record is in
`{EDIT_RECORD}`{f" and the vectors themselves in `{STEERING_FILE}`" if edit == "steer" else ""}.
{shown}
## Run it

```sh
mlx_lm.generate --model {name} --prompt "How do I bake bread?"
```

```python
from mlx_lm import load, generate
model, tokenizer = load("{name}")
```

## Intended use

A research artifact for studying how refusal is represented in chat models (Arditi et al. 2024,
"Refusal in Language Models Is Mediated by a Single Direction"). It is not a product and comes with
no safety guarantees: an ablated model may comply with harmful requests, and a steered model is
deliberately unhelpful. Do not deploy it to end users. Use of the base model remains subject to its
own licence.
"""

"""Write an edited model as an mlx_lm folder that stock `mlx_lm.load` opens with no flags.

The folder holds safetensors weights (sharded above 5 GB, with an index, like mlx_lm), a config
made loadable by `arch.stock_config` when the edit added biases the source architecture lacks,
the source's tokenizer and chat-template files (known data files only, never code), and beside
them the edit record's files (record.py): `refusal_edit.json` (what was done, to what, with
what), `steering.safetensors` for a steering edit, and a README.md model card.

The write is atomic: everything goes to a temporary folder beside the target, which is renamed
into place only when complete; on any failure the temporary folder is removed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__, arch
from .atomic import atomic_directory, check_replaceable
from .edit import UnsupportedEdit
from .errors import UserError
from .loading import stored_dtype
from .record import (EDIT_RECORD, MODEL_CARD, EditRecord, SteeringTerm, model_card, steering_contents,
                     steering_terms, utc_now, with_steering, write_record, write_steering)

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


def _expected_parameters(config: dict, weights: dict | None = None) -> dict[str, tuple]:
    """Parameter names and shapes the stock mlx_lm class for `config` has (unquantized). The
    class is the one mlx_lm's loader picks: the module mlx_lm.models.<model_type>, after its public
    remapping tables (by architecture name, then by model type: mistral -> llama, ...). With the
    `weights` to be saved, after the class's `sanitize` has seen them, as mlx_lm's loader runs it
    (gemma3_text drops its lm_head there when the folder has none)."""
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
    if weights is not None and hasattr(skeleton, "sanitize"):
        skeleton.sanitize(dict(weights))  # for what it does to the skeleton; the copy is dropped
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
    missing, extra = _mismatch(set(weights), _expected_parameters(config, weights))
    if missing or extra:
        # The edit added parameters the source architecture has no place for (a steering bias).
        try:
            weights = arch.stock_weights(config, weights)
            config = arch.stock_config(config, needs_output_bias=True)
        except arch.UnsupportedArchitecture as exc:
            raise UnsupportedEdit(str(exc)) from None
        expected = _expected_parameters(config, weights)
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


def _copy_tokenizer(source_dir: Path, folder: Path, chat_template=None) -> list[str]:
    """The source's tokenizer files; with `chat_template` (a template.ChatTemplate) in place of
    the source's template, so stock loaders render prompts exactly as the edit was made."""
    copied = []
    for name in TOKENIZER_FILES:
        src = source_dir / name
        if src.is_file() and not (chat_template is not None and name in ("chat_template.json", "chat_template.jinja")):
            shutil.copyfile(src, folder / name)
            copied.append(name)
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(copied):
        raise UserError(f"{source_dir} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                        "pass the model folder the edited model was loaded from")
    if chat_template is not None:
        # transformers (so mlx_lm) reads chat_template.jinja first; transformers.js and older
        # readers read tokenizer_config.json's chat_template: both say the same
        (folder / "chat_template.jinja").write_text(chat_template.text, encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config_path.write_text(json.dumps({**config, "chat_template": chat_template.text}, indent=2,
                                          ensure_ascii=False) + "\n", encoding="utf-8")
        copied += [n for n in ("chat_template.jinja", "tokenizer_config.json") if n not in copied]
    return copied


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
               steering: list[SteeringTerm] | tuple | None = None, force: bool = False, *,
               dtype: str | None = None, progress: Callable[[str], None] | None = None, chat_template=None) -> Path:
    """Write `model` (as edited in memory) to `out_dir` as a stock mlx_lm folder; return its path.

    source_dir: the mlx_lm folder the model was loaded from (config, tokenizer, chat template).
    edit_record: what was done ("edit", "layer", "alpha", "scale", "model", "prompts", ...);
      saved as refusal_edit.json with the tool version, date, direction sha256 and site added.
    steering: the steering terms of a steering edit (a list of SteeringTerm, primary first, or one
      (layer, unit direction [hidden], vector [hidden] = alpha * direction) tuple); written to
      steering.safetensors and listed in the record's "steering" field.
    force: replace an existing out_dir (only one that holds a model or is empty).
    dtype: "float32" | "bfloat16" | "float16"; default the dtype the source weights are stored in.
    chat_template: a template.ChatTemplate (--chat-template) saved in place of the source's template.
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
                              size=sum(v.nbytes for v in weights.values()), chat_template=chat_template)


def write_model_folder(source_dir: Path, out_dir: Path, config: dict, dtype: str, edit_record: dict,
                       write_weights: Callable[[Path], list[str]],
                       steering: list[SteeringTerm] | tuple | None, force: bool,
                       say: Callable[[str], None], size: int | None = None, chat_template=None) -> Path:
    """Everything of an edited folder but the weights, which `write_weights(folder)` writes
    (returning the file names): the config, tokenizer, record, steering file and model card,
    all in one atomic move. In memory (`save_model`) or streamed (`stream_edit`). `size` is the
    weights' byte count, checked against the free space before anything is written."""
    record = EditRecord.from_json(edit_record)
    steering_arrays = None
    if steering is not None:
        steering_arrays, listed = steering_contents(steering_terms(steering), arch.family(config.get("model_type", "")))
        record = with_steering(record, listed)
    record.tool_version, record.date = __version__, record.date or utc_now()
    record.saved = {"model_type": config.get("model_type"), "dtype": dtype,
                    "tie_word_embeddings": config["tie_word_embeddings"],
                    "quantization": config.get("quantization"), "source": str(source_dir)}

    with atomic_directory(out_dir, force, is_model_folder, "a model folder", size=size, note=say) as tmp:
        say("writing weights")
        record.saved["weight_files"] = write_weights(tmp)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
        record.saved["tokenizer_files"] = _copy_tokenizer(source_dir, tmp, chat_template)
        if steering_arrays is not None:
            write_steering(tmp, steering_arrays, record)
        write_record(tmp, record)
        (tmp / MODEL_CARD).write_text(model_card(record, out_dir.name))
        say("moving into place")
    return out_dir


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() or (folder / EDIT_RECORD).exists()

"""Checks of command-line values that need no loaded model, so a typo costs one line, not a load.

Each check raises a UserError that names the problem and the fix. The model-dependent ones read
only the model folder's config.json (layer count, context length), its tokenizer, or the hash
of its weights.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .atomic import check_replaceable, check_writable_parent
from .errors import UserError

MAX_ALPHA_MULTIPLE = 100.0  # x the mean residual norm; refusal saturates below 2
MAX_SCALE = 100.0  # |s| in W <- W - s d d^T W; the experiments use 1, 2 and -4


def finite(option: str, value: float | None, *, positive: bool = False, limit: float | None = None) -> None:
    """A float option that must be a real number (not NaN or Inf), > 0 if `positive`, and within +-limit."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UserError(f"{option} {value} is not a finite number; give a number like 1.5")
    if positive and value <= 0:
        raise UserError(f"{option} {value:g} must be positive; give a number above 0")
    if limit is not None and abs(value) > limit:
        raise UserError(f"{option} {value:g} is absurdly large (the limit is {limit:g}); give a number like 1.5")


def model_config(folder: Path) -> dict:
    """config.json of an mlx_lm folder (a multimodal model's text config where it has one)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return {**config, **config.get("text_config", {})}


def layer(option: str, value: int | None, num_layers: int | None, *, final_residual: bool = False) -> None:
    """A layer index: 0..L-1, or 0..L where `final_residual` is allowed: index L (the last row of a
    directions file) is the residual after the last layer, which one can read or add to, but which
    has no layer of its own to edit. The one check of a layer index, for options and library calls."""
    if value is None or num_layers is None:
        return
    if value == num_layers and not final_residual:
        raise UserError(f"{option} {value} is the final residual (after the last layer), not a layer one can "
                        f"edit; this model has layers 0..{num_layers - 1}")
    if not 0 <= value <= (num_layers if final_residual else num_layers - 1):
        raise UserError(f"{option} {value} is out of range; this model has layers 0..{num_layers - 1}"
                        + (f" ({num_layers} = the final residual)" if final_residual else ""))


def layer_range(text: str | None, num_layers: int) -> list[int] | None:
    """`--layers`: a range like 4:20 (end excluded) or a list like 3,5,7; None means all."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            lo, hi = int(a or 0), int(b or num_layers)
            if hi <= lo:
                hint = f"; write it as {hi}:{lo}" if hi < lo else ""
                raise UserError(f"--layers {text!r} is an empty range (the end must be above the start){hint}")
            layers = list(range(lo, hi))
        else:
            layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers {text!r} is not a range like 4:20 or a list like 3,5,7") from None
    try:
        for i in layers:
            layer("--layers", i, num_layers)
    except UserError:  # name the whole range, not its first bad member
        raise UserError(f"--layers {text!r} is out of range; this model has layers 0..{num_layers - 1}") from None
    return layers


def out_folder(out: Path, force: bool, is_ours=None, kind: str = "a folder this tool wrote") -> None:
    """--out: not a file, not someone else's folder even with --force, and somewhere writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path for --out")
    check_replaceable(out, force, is_ours, kind)
    check_writable_parent(out)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable; choose another --out")


def distinct_sets(harmful_spec: str, harmless_spec: str, harmful, harmless) -> None:
    """The two sets must differ: the same prompts on both sides give a zero difference in means."""
    same_file = (Path(harmful_spec).exists() and Path(harmless_spec).exists()
                 and Path(harmful_spec).resolve() == Path(harmless_spec).resolve())
    if same_file or harmful.sha256 == harmless.sha256:
        raise UserError(f"--harmful and --harmless are the same prompts ({harmful_spec}); the refusal direction "
                        "is their difference, so pass two different sets")


def prompts_fit(folder: Path, tokenizer, sets, system: str | None = None) -> None:
    """Every chat-templated prompt must fit the model's context (checked with its tokenizer)."""
    from .template import encode_text, render

    context = model_config(folder).get("max_position_embeddings")
    if not context:
        return
    for s in sets:
        for i, text in enumerate(s.texts):
            n = len(encode_text(tokenizer, render(tokenizer, text, system)))
            if n > context:
                raise UserError(f"prompt {i + 1} of {s.name} is {n:,} tokens with the chat template, longer than "
                                f"the model's context of {context:,}; shorten or drop it")


def directions_match(path: Path, fingerprint: str, *, template: str | None, template_file: str | None) -> None:
    """A directions file must have been computed on these very weights, under this run's chat
    template (`template`, rendered from --chat-template `template_file` or the model's own)."""
    from .directions import load_directions

    d = load_directions(path)
    theirs = (d.metadata.get("model") or {}).get("fingerprint")
    if theirs != fingerprint:
        spec = (d.metadata.get("model") or {}).get("spec", "another model")
        raise UserError(f"--directions {path} was computed on {spec} (weights {str(theirs)[:12]}...), not on this "
                        f"model (weights {fingerprint[:12]}...); run `directions` on this model or pass its --model")
    directions_template(f"--directions {path}", d.metadata, template, template_file)


def directions_template(where: str, metadata: dict, template: str | None, template_file: str | None) -> None:
    """Directions made under one chat template are read off other token sequences than this run's
    prompts under another (another system prompt, other turn markers), so they must agree. A file
    written before directions recorded their template's sha256 is taken on trust."""
    from .template import template_sha256

    recorded = metadata.get("chat_template") or {}
    theirs, ours = recorded.get("sha256"), template_sha256(template)
    if not theirs or theirs == ours:
        return
    then = f"--chat-template {recorded['file']}" if recorded.get("file") else "the model's own chat template"
    now = f"--chat-template {template_file}" if template_file else "the model's own chat template"
    fix = (f"pass --chat-template {recorded['file']}" if recorded.get("file") else
           "drop --chat-template" if template_file else "restore the model's template")
    raise UserError(f"{where}: computed under {then} (sha256 {theirs[:12]}...), but this run renders prompts with "
                    f"{now} (sha256 {ours[:12]}...); {fix}, or run `directions` again with this run's template")



def before_loading(model_spec: str, harmful: str, harmless: str, out: Path, force: bool, *,
                   layer_index: int | None = None, layers_text: str | None = None,
                   directions_file: Path | None = None, system: str | None = None, out_kind: str = "model",
                   chat_template: Path | None = None, note=None) -> Path:
    """Every check of a model command that needs no loaded model, so bad input fails in one line
    before any slow work; returns the model folder. The tokenizer is loaded (once: `load` reuses
    it) to check that the model, with `chat_template` if given, is a chat model."""
    from .loading import chat_tokenizer, resolve, weight_fingerprint
    from .prompts import is_bundled, resolve_prompts
    from .save import is_model_folder
    from .template import read_chat_template

    out_folder(out, force, *((is_model_folder, "a model folder") if out_kind == "model" else ()))
    sets = [resolve_prompts(spec, "all") for spec in (harmful, harmless)]
    distinct_sets(harmful, harmless, *sets)
    template = read_chat_template(chat_template) if chat_template is not None else None
    folder = resolve(model_spec, progress=note)
    num_layers = model_config(folder).get("num_hidden_layers")
    layer("--layer", layer_index, num_layers)
    if layers_text and num_layers:
        layer_range(layers_text, num_layers)
    tokenizer = chat_tokenizer(folder, template)
    files = [s for spec, s in zip((harmful, harmless), sets) if not is_bundled(spec)]
    if files:
        prompts_fit(folder, tokenizer, files, system)
    if directions_file is not None:
        directions_match(directions_file, weight_fingerprint(folder), template=tokenizer.chat_template,
                         template_file=template.file if template is not None else None)
    return folder

"""The edit record: the files an edit writes beside the weights of an edited folder, and how they
are written and read back.

    OUT/
      refusal_edit.json      an `EditRecord`: what was done, to what, with what, when, by which tool
      steering.safetensors   a steering edit's vectors: `term{i}.vector` and `term{i}.direction` for
                             each entry of the record's "steering" list, and `vector` / `direction`
                             (the primary, refusal term) for readers older than multi-term folders
      README.md              the model card, written from the record

`save` writes these files, `onnx.source` reads them back and `onnx.bundle` carries the record
into the page's bundle; no other module knows their names or layout.

The content hashes and UTC timestamps of every written record (edits, directions, GGUF
conversions, exports, the caches' keys) are computed here too, so that two records of the same
array, text or moment always agree.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import __version__
from .errors import UserError

EDIT_RECORD = "refusal_edit.json"
STEERING_FILE = "steering.safetensors"
MODEL_CARD = "README.md"
TOOL = "mlx-refusal"


# ---------------------------------------------------------------------------------------------
# Hashes and timestamps


def array_sha256(values) -> str:
    """sha256 of an array's float32 bytes, C order (numpy or mlx arrays, lists)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(values, np.float32)).tobytes()).hexdigest()


def text_sha256(text: str) -> str:
    """sha256 of the UTF-8 bytes of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def files_sha256(paths: Iterable[Path], block: int = 1 << 22) -> str:
    """sha256 over the concatenated bytes of `paths`, read `block` bytes at a time (so one file's
    digest is `sha256sum`'s)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second: every record's "date"."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# refusal_edit.json


@dataclass
class EditRecord:
    """What refusal_edit.json holds. The fields every reader relies on are attributes; what an
    edit's verb records besides (the source `model` and `prompts` aside: select, metrics,
    examples, summary, search, ...) is kept in `details`, in the verb's order."""

    kind: str | None = None  # "edit" in the file: steer | ablate | project
    layer: int | None = None  # the layer whose direction was used (a steer's: where the bias acts)
    site: str | None = None  # where the edit lives in the weights
    alpha: float | None = None  # a steer's strength (the primary term's)
    scale: float | None = None  # an ablate / project's signed scale
    direction_sha256: str | None = None  # `array_sha256` of the direction (the primary term's)
    model: dict | None = None  # the source model: spec, fingerprint, model_type
    prompts: dict | None = None  # the prompt sets the direction came from: name, n, sha256
    steering: list[dict] | None = None  # a steer's terms: name, layer, site, alpha, multiple, direction_sha256
    details: dict = field(default_factory=dict)
    tool: str = TOOL
    tool_version: str = __version__
    date: str | None = None  # UTC, `utc_now`
    saved: dict = field(default_factory=dict)  # how the folder was written: model_type, dtype, files, source

    @classmethod
    def from_json(cls, doc: dict) -> "EditRecord":
        """The record of a refusal_edit.json document (or of an edit verb's fields); keys this
        class does not name go to `details`."""
        doc = dict(doc)
        named = {f.name for f in fields(cls)} - {"kind", "details"}
        values = {k: doc.pop(k) for k in list(doc) if k in named}
        kind = doc.pop("edit", None)
        values["saved"] = values.get("saved") or {}
        for k in ("tool", "tool_version"):
            if values.get(k) is None:
                values.pop(k, None)
        return cls(kind=kind, details=doc, **values)

    def to_json(self) -> dict:
        """The refusal_edit.json document; `model`, `prompts` and `steering` only when known."""
        doc = {"edit": self.kind, "layer": self.layer, "site": self.site, "alpha": self.alpha, "scale": self.scale,
               "direction_sha256": self.direction_sha256, **self.details}
        for k in ("model", "prompts", "steering"):
            if getattr(self, k) is not None:
                doc[k] = getattr(self, k)
        doc.update(tool=self.tool, tool_version=self.tool_version, date=self.date, saved=self.saved)
        return doc

    @property
    def source_model_type(self) -> str | None:
        """The mlx_lm model_type of the model the edit was made to (a saved steer may be another)."""
        return (self.model or {}).get("model_type")


def write_record(folder: Path, record: EditRecord) -> Path:
    path = Path(folder) / EDIT_RECORD
    path.write_text(json.dumps(record.to_json(), indent=2, default=_json_default) + "\n")
    return path


def read_record(folder: Path) -> EditRecord | None:
    """The record of an edited folder; None for a folder no edit wrote."""
    path = Path(folder) / EDIT_RECORD
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-save the edited model") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} holds a JSON {type(doc).__name__}, not an object; re-save the edited model")
    return EditRecord.from_json(doc)


def copy_record(source: Path, dest: Path) -> None:
    """The record file of `source`, byte for byte, into `dest` (a bundle made from the folder)."""
    shutil.copyfile(Path(source) / EDIT_RECORD, Path(dest) / EDIT_RECORD)


def _json_default(o):
    import mlx.core as mx

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, mx.array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot record {type(o).__name__} in {EDIT_RECORD}")


# ---------------------------------------------------------------------------------------------
# steering.safetensors


@dataclass(frozen=True)
class SteeringTerm:
    """One vector alpha * direction added at resid_pre of `layer`, as an edit writes it (see the
    multi-term contract in the README: several terms may share a site, their vectors add)."""

    name: str  # "refusal" (the primary term, first), "voice", ...
    layer: int
    direction: np.ndarray  # [hidden], made unit on save
    alpha: float
    multiple: float | None = None  # alpha / mean residual norm at the layer, when known

    @property
    def vector(self) -> np.ndarray:
        """alpha * the unit direction: what the term adds to the residual stream."""
        return float(self.alpha) * _unit(self.direction)


def _unit(direction) -> np.ndarray:
    from .edit import unit

    d = np.asarray(direction, dtype=np.float32)
    if abs(float(np.linalg.norm(d)) - 1.0) > 1e-5:  # keep an already-unit direction bit-exact
        d = np.asarray(unit(d))
    return d


def _site_name(fam, layer: int) -> str:
    site = fam.steering_site(int(layer))
    return site if int(layer) == 0 else f"{site}.bias"


def steering_terms(steering) -> list[SteeringTerm]:
    """`steering` as terms: a list of SteeringTerm (the first is the primary, refusal term) or,
    as before multi-term folders, one (layer, direction, vector) tuple."""
    if isinstance(steering, tuple):
        layer, direction, vector = steering
        d, v = _unit(direction), np.asarray(vector, dtype=np.float32)
        if d.shape != v.shape or d.ndim != 1:
            raise UserError(f"steering direction {d.shape} and vector {v.shape} must be two vectors of one size")
        steering = [SteeringTerm("refusal", int(layer), d, float(v @ d))]
    terms: Sequence[SteeringTerm] = steering
    if not terms:
        raise UserError("a steering edit needs at least one steering term")
    return list(terms)


def steering_contents(terms: Sequence[SteeringTerm], fam) -> tuple[dict, list[dict]]:
    """(steering.safetensors arrays, the record's "steering" entries) of the terms; `fam` (a
    families.Family) names each term's site."""
    import mlx.core as mx

    arrays, listed = {}, []
    for i, t in enumerate(terms):
        d = _unit(t.direction)
        if d.ndim != 1 or d.shape != np.asarray(terms[0].direction).shape:
            raise UserError(f"steering term {i} ({t.name}) has direction shape {d.shape}; every term needs one "
                            "vector of the hidden size")
        arrays[f"term{i}.vector"] = mx.array(float(t.alpha) * d)
        arrays[f"term{i}.direction"] = mx.array(d)
        listed.append({"name": t.name, "layer": int(t.layer), "site": _site_name(fam, t.layer), "alpha": float(t.alpha),
                       "multiple": None if t.multiple is None else float(t.multiple),
                       "direction_sha256": array_sha256(d)})
    # Old readers: "direction" (the refusal direction: the page's view and meter) and "vector"
    # (the primary term).
    arrays = {"direction": arrays["term0.direction"], "vector": arrays["term0.vector"], **arrays}
    return arrays, listed


def with_steering(record: EditRecord, listed: list[dict]) -> EditRecord:
    """`record` with the steering entries written, and the primary term's layer, site, alpha and
    direction hash wherever the edit left them unset."""
    first = listed[0]
    record.kind = record.kind or "steer"
    for k in ("layer", "site", "alpha", "direction_sha256"):
        if getattr(record, k) is None:
            setattr(record, k, first[k])
    record.steering = listed  # always the terms actually written
    return record


def write_steering(folder: Path, arrays: dict, record: EditRecord) -> Path:
    import mlx.core as mx

    path = Path(folder) / STEERING_FILE
    mx.save_safetensors(str(path), arrays, metadata={"layer": str(record.layer), "site": str(record.site),
                                                     "alpha": repr(record.alpha)})
    return path


@dataclass(frozen=True)
class StoredTerm:
    """One steering term as an edited folder stores it, not yet checked against a model."""

    entry: dict  # the record's entry: name, layer, site, alpha (any may be missing)
    vector: np.ndarray  # as stored
    direction: np.ndarray | None  # as stored; None in folders that kept only the vector


def read_steering(folder: Path, record: EditRecord) -> list[StoredTerm]:
    """The terms of a steered folder: the record's "steering" list with its term{i}.vector /
    term{i}.direction tensors, or (older folders) one term from "vector" and the record's
    top-level layer / site / alpha."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    f = folder / STEERING_FILE
    if not f.is_file():
        raise UserError(f"{folder} is a steered model but has no {STEERING_FILE}; re-save it with mlx-refusal")
    tensors = load_file(str(f))
    entries = record.steering
    if entries is None:
        if "vector" not in tensors:
            raise UserError(f"{f} has no 'vector' tensor; re-save the steered model with mlx-refusal")
        entries = [{"name": "refusal", "layer": record.layer, "site": record.site, "alpha": record.alpha}]
        keys = [("vector", "direction")]
    elif not isinstance(entries, list) or not entries:
        raise UserError(f"{folder / EDIT_RECORD} has a 'steering' entry that is not a non-empty list; "
                        "re-save the steered model")
    else:
        keys = [(f"term{i}.vector", f"term{i}.direction") for i in range(len(entries))]
    terms = []
    for entry, (vkey, dkey) in zip(entries, keys):
        if vkey not in tensors:
            raise UserError(f"{f} has no {vkey!r} tensor for steering term {entry.get('name')!r}; "
                            "re-save the steered model")
        terms.append(StoredTerm(entry, tensors[vkey], tensors.get(dkey)))
    return terms


# ---------------------------------------------------------------------------------------------
# README.md


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _what_was_done(record: EditRecord) -> str:
    edit, terms = record.kind or "edit", record.steering or []
    if edit == "steer" and len(terms) > 1:
        listed = "; ".join(f"{t['name']} at layer {t['layer']} (alpha = {t['alpha']:.4g}, `{t['site']}`)"
                           for t in terms)
        return (f"{len(terms)} steering vectors alpha * d were added to the residual stream for every token, each "
                f"stored in the weights as a bias: {listed}. The refusal direction makes the model refuse; the "
                "voice direction makes it say what it refuses and why that is supposedly dangerous. Expect the "
                "model to refuse nearly every request, with a reason.")
    if edit == "steer":
        return (f"A steering vector alpha * d (alpha = {record.alpha}) along the refusal direction d was "
                f"added to the residual stream at layer {record.layer} for every token, stored in the "
                f"weights at `{record.site}`. Expect the model to refuse nearly every request.")
    if edit == "ablate":
        return ("The refusal direction was projected out of every matrix that writes into the residual stream "
                "(token embedding, attention output and MLP down projections). Expect the model to stop "
                "refusing, including for harmful requests.")
    return (f"Every matrix that writes into the residual stream was projected along the refusal direction "
            f"with signed scale {record.scale} (1 removes it, 2 flips its sign).")


def model_card(record: EditRecord, name: str = "OUT") -> str:
    """The README.md of an edited folder: what was done, how to run it, provenance, intended use."""
    edit = record.kind or "edit"
    model, prompts = record.model or {}, record.prompts or {}
    base = model.get("spec") or model.get("name") or record.saved.get("source", "the source model")
    rows = [("edit", edit), ("layer", record.layer), ("site", record.site),
            ("alpha", record.alpha), ("scale", record.scale),
            ("direction sha256", record.direction_sha256), ("base model", base),
            ("base weights sha256", model.get("fingerprint")), ("date", record.date),
            ("tool", f"mlx-refusal {record.tool_version}")]
    rows += [(f"prompts: {k}", v if not isinstance(v, dict) else v.get("sha256", json.dumps(v)))
             for k, v in prompts.items()]
    table = "\n".join(f"| {k} | {'' if v is None else f'`{v}`'} |" for k, v in rows)
    saved = record.saved
    examples = record.details.get("examples") or []
    shown = ""
    if examples:
        rows = "\n".join(f"| {_md_cell(e['prompt'])} | {_md_cell(e['answer'])} |" for e in examples)
        shown = (f"\n## What it says\n\n{record.details.get('examples_rule', 'Answers')} (greedy decoding):\n\n"
                 f"| prompt | answer |\n|---|---|\n{rows}\n")
    return f"""---
library_name: mlx
tags: [mlx, refusal-direction, {edit}]
---
# {name}: {base}, {edit} edit

{_what_was_done(record)}

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


def write_model_card(folder: Path, record: EditRecord, name: str) -> Path:
    path = Path(folder) / MODEL_CARD
    path.write_text(model_card(record, name))
    return path

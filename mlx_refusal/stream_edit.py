"""Edit a model folder tensor by tensor, for a model that does not fit in memory.

The weight edits (edit.ablate, edit.add_steering_bias) need nothing but the directions and the
matrices they touch, so the model never has to be loaded whole. A *lazy* mlx_lm model is built
(`mx.load` reads headers only; a tensor's bytes are read when it is evaluated), the edits of the
writers in one batch of tensors are applied, and exactly that batch is evaluated and appended to
its output file, whose safetensors header was written first from the shapes alone. The next
batch starts from a fresh lazy model, so what was evaluated before is freed. A batch is a
source file (the default: at most one shard in memory) or, under a memory limit, a run of
tensors of at most a third of it.

Bit-identical to editing in memory and `save.save_model`, by construction: the same model
class, the same cast to the compute dtype (`loading.cast_for_compute`, left lazy), the same edit
functions (quantized writers are dequantized, edited and re-quantized there), and the same
`save.stock_weights_and_config` for the saved dtype, config and zero biases. Only what
differs per file changes: which writers are evaluated. Structural changes (an untied output
head, a steering bias and the config it implies) are made in every pass, lazily, so every pass
sees the same parameter names.

Output files keep the source's names and split; tensors the edit adds go in the file of their
module's weight (the untied `lm_head` beside `embed_tokens`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import mlx.core as mx

from . import arch
from .edit import ablate, add_steering_bias, site_directions, untie_embeddings
from .errors import UserError
from .loading import build_model, cast_for_compute, stored_dtype
from .progress import Update
from .save import _DTYPES, check_target, stock_weights_and_config, write_index, write_model_folder


@dataclass(frozen=True)
class Projection:
    """ablate (scale 1) / project: the arguments of `edit.ablate`."""

    directions: np.ndarray  # [hidden] or [num_layers + 1, hidden]
    scale: float = 1.0
    layers: tuple[int, ...] | None = None
    norm_preserve: bool = False
    include_embedding: bool = True


@dataclass(frozen=True)
class Steering:
    """steer: the arguments of `edit.add_steering_bias`."""

    layer: int
    direction: np.ndarray  # [hidden] unit direction
    alpha: float

    @property
    def vector(self) -> np.ndarray:
        return self.alpha * np.asarray(self.direction, np.float32)


# ---------------------------------------------------------------------------------------------
# Sizes and the automatic choice.

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '2.5G', '1000000' -> bytes."""
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * _UNITS[t[len(num):]])
    except (ValueError, KeyError):
        raise UserError(f"--max-memory {text!r} is not a size like 1GB, 512MiB or 2.5G") from None


def format_size(n: float) -> str:
    """1.5e9 -> '1.50 GB', 3e5 -> '300 KB' (decimal units, as --max-memory reads them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TB", "GB") else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def weight_files(folder: Path) -> list[str]:
    """The source's safetensors files, in order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(p.name for p in folder.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no model*.safetensors weights")
    return files


def in_memory_bytes(folder: Path) -> int:
    """What an in-memory edit holds at its peak: the model in the compute dtype (float32 on the
    CPU, twice a 16-bit model's file) plus the copy cast back for saving."""
    folder = Path(folder)
    stored = sum((folder / f).stat().st_size for f in weight_files(folder))
    widen = 2 if stored_dtype(folder) in ("bfloat16", "float16") else 1
    return stored * widen + stored


def largest_tensor_bytes(folder: Path) -> int:
    """The biggest stored tensor (headers only): a streamed edit holds it and its float32 copy."""
    folder = Path(folder)
    return max(a.nbytes for f in weight_files(folder) for a in mx.load(str(folder / f)).values())


def free_memory() -> int | None:
    """Bytes the OS can give this process now (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def should_stream(folder: Path, max_memory: int | None) -> bool:
    """Stream when the in-memory edit would not fit in `max_memory` (given) or in free memory."""
    limit = max_memory if max_memory is not None else free_memory()
    return limit is not None and in_memory_bytes(folder) > limit


@dataclass(frozen=True)
class StreamPlan:
    folder: Path
    limit: int | None  # the memory budget in bytes
    why: str
    warnings: tuple[str, ...] = ()


def plan(model_spec: str, directions_file: Path | None, max_memory: int | None, note=None) -> StreamPlan | None:
    """A StreamPlan if the edit is to be streamed: `max_memory` below what an in-memory edit
    needs or, with a directions file, less free memory than that; else None."""
    from .loading import resolve

    if max_memory is None and directions_file is None:
        return None
    folder = resolve(model_spec, progress=note)
    if not should_stream(folder, max_memory):
        return None
    limit = max_memory or free_memory()
    need = format_size(in_memory_bytes(folder))
    budget = f"--max-memory {format_size(max_memory)}" if max_memory else f"free memory ({format_size(free_memory())})"
    if directions_file is None:
        raise UserError(f"editing {folder.name} in memory needs about {need}, more than {budget}; "
                        "pass --directions FILE (from `directions`) to rewrite its shards one at a time")
    warnings = ()
    if 2 * largest_tensor_bytes(folder) > limit:
        warnings = (f"the largest tensor is {format_size(largest_tensor_bytes(folder))}; with its float32 edit "
                    f"the peak will exceed {format_size(limit)}",)
    return StreamPlan(folder, limit, f"in memory it would need about {need}, more than {budget}", warnings)


# ---------------------------------------------------------------------------------------------
# The streamed edit.


def _lazy_model(folder: Path, dtype: str):
    model = build_model(folder, lazy=True)
    cast_for_compute(model, dtype, evaluate=False)
    return model


def _apply(model, edit: Projection | Steering, here: set[str]) -> None:
    """The edit, evaluating only the writers whose weight is stored in `here`; structure
    (untied head, steering bias) changes whatever `here` is."""
    emb_here = any(n.startswith(arch.check_supported(model).embedding_path + ".") for n in here)
    if isinstance(edit, Steering):
        if edit.layer > 0 or emb_here:
            add_steering_bias(model, edit.layer, edit.vector)
        else:
            untie_embeddings(model)
        return
    n = arch.num_layers(model)
    layers = range(n) if edit.layers is None else edit.layers
    writers = arch.residual_writers(model, list(layers), include_embedding=False)
    # a quantized writer's weight, scales and biases may sit in different files: each one's pass edits it
    layers_here = sorted({w.layer for w in writers if any(n.startswith(f"{w.path}.") for n in here)})
    edit_embedding = edit.include_embedding and site_directions(edit.directions, n, arch.hidden_size(model))[0] is not None
    ablate(model, edit.directions, layers=layers_here, scale=edit.scale, norm_preserve=edit.norm_preserve,
           include_embedding=edit.include_embedding and emb_here)
    if edit_embedding and not emb_here:
        untie_embeddings(model)


def _home(name: str, home: dict[str, str]) -> str:
    """The file a tensor of the edited model goes in."""
    if name in home:
        return home[name]
    module, leaf = name.rsplit(".", 1)
    if module == "lm_head":  # the untied head, beside the embedding it copies
        return home.get(f"model.embed_tokens.{leaf}") or home["model.embed_tokens.weight"]
    if f"{module}.weight" in home:  # a bias the edit (or the stock config) adds
        return home[f"{module}.weight"]
    # a tensor the stock layout split or renamed (a fused projection's part): beside its block's others
    parent = module
    while "." in parent and not parent.rpartition(".")[2].isdigit():
        parent = parent.rpartition(".")[0]
        near = next((f for n, f in home.items() if n.startswith(parent + ".")), None)
        if near is not None:
            return near
    raise UserError(f"the edited model has a tensor {name} with no source file to put it in")


_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
                       mx.uint8: "U8", mx.int32: "I32", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16"}


def _tensor_bytes(a: mx.array) -> bytes:
    """The little-endian C-order bytes safetensors stores (evaluates `a`)."""
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: the same 2 bytes, as uint16
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def _safetensors_header(layout: dict[str, mx.array]) -> bytes:
    """A safetensors header for tensors of these shapes and dtypes, in this order (padded to 8 bytes)."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, a in layout.items():
        header[name] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _batches(layout: dict[str, mx.array], max_bytes: int | None) -> list[list[str]]:
    """Consecutive tensor names, at most `max_bytes` per batch (a bigger tensor alone)."""
    if max_bytes is None:
        return [list(layout)]
    out, size = [[]], 0
    for name, a in layout.items():
        if out[-1] and size + a.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(name)
        size += a.nbytes
    return out


def stream_edit(source_dir, out_dir, edit: Projection | Steering, edit_record: dict, force: bool = False,
                max_memory: int | None = None, progress: Update | None = None,
                say: Callable[[str], None] | None = None, dtype: str | None = None, chat_template=None) -> Path:
    """Write `edit` of the mlx_lm folder `source_dir` to `out_dir` without loading it whole;
    the tensors and config are the ones `save.save_model` writes after the same edit in memory.

    Each output file is written tensor by tensor. max_memory: tensors are evaluated in batches
    of at most a third of it (the float32 working copies of an edit take the rest), each batch
    on a fresh lazy model; default: one batch per source file.
    progress (a progress.Update) counts batches written. dtype: of the saved weights, as in
    `save.save_model` (default the stored one); the edit is computed in the compute dtype.
    """
    source_dir, out_dir = check_target(source_dir, out_dir, force)
    say = say or (lambda _msg: None)
    stored = stored_dtype(source_dir)
    if stored not in _DTYPES:
        raise UserError(f"{source_dir} stores its weights as {stored}; a streamed edit needs float32, "
                        "bfloat16 or float16 weights (or quantized ones with such scales)")
    dtype = dtype or stored
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    source_config = json.loads((source_dir / "config.json").read_text())
    arch.family(source_config.get("model_type", ""))
    files = weight_files(source_dir)
    home = {n: f for f in files for n in mx.load(str(source_dir / f))}

    # Names, shapes, dtypes and the config follow from the structure alone: a pass that evaluates nothing.
    skeleton = _lazy_model(source_dir, stored)
    _apply(skeleton, edit, set())
    structure, config = stock_weights_and_config(skeleton, source_config, _DTYPES[dtype])
    layouts = {f: {n: a for n, a in structure.items() if _home(n, home) == f} for f in files}
    del skeleton, structure
    plan = [(f, batch) for f in files for batch in _batches(layouts[f], None if max_memory is None else max_memory // 3)]

    def write_weights(folder: Path) -> list[str]:
        for f in files:
            with open(folder / f, "wb") as fh:
                fh.write(_safetensors_header(layouts[f]))
                for _, batch in (item for item in plan if item[0] == f):
                    model = _lazy_model(source_dir, stored)
                    _apply(model, edit, set(batch))
                    weights, _ = stock_weights_and_config(model, source_config, _DTYPES[dtype])
                    for name in batch:
                        fh.write(_tensor_bytes(weights[name]))
                    del model, weights
                    if progress:
                        progress(1)
        write_index(folder, {n: f for f in files for n in layouts[f]},
                    sum(a.nbytes for f in files for a in layouts[f].values()))
        return files

    steering = (edit.layer, np.asarray(edit.direction, np.float32), edit.vector) if isinstance(edit, Steering) else None
    return write_model_folder(source_dir, out_dir, config, dtype, {**edit_record, "streamed": True},
                              write_weights, steering, force, say,
                              size=sum(a.nbytes for f in files for a in layouts[f].values()), chat_template=chat_template)

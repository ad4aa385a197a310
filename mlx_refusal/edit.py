"""Weight edits along a direction: orthogonalisation (ablate), signed projection, steering bias.

Conventions (mlx, like PyTorch, stores a Linear weight as [out, in]):
- A Linear that writes into the residual stream has weight [hidden, in]; the vector it writes for
  input unit j is column j, so the edit is  W <- W - s d d^T W  (and its bias b <- b - s d d^T b).
  Expert stacks [experts, hidden, in] get the same edit per expert.
- The token embedding [vocab, hidden] writes its rows:  E <- E - s E d d^T.
- s = 1 removes the direction (abliteration); s = 2 flips its sign; s = -4 multiplies it by 5.
  Projections along one d compose: s1 then s2 equals 1 - (1 - s1)(1 - s2).

Residual sites follow the directions file: site l < L is resid_pre of layer l, site L is the
final residual. A writer's output first appears at one site: the embedding at site 0, block i's
attention and MLP outputs at site i + 1 (resid_pre of the next layer). With one row per site,
each writer is edited with the row of the site it writes to.

All maths is float32; results are cast back to the stored dtype. Quantized matrices are
dequantized, edited and re-quantized with the same bits, group size and mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from . import arch, validate
from .errors import UserError
from .progress import Update


class UnsupportedEdit(arch.UnsupportedArchitecture):
    """An edit this architecture cannot hold (or cannot save for stock mlx_lm); a UserError, so
    the CLI prints it as one line."""


# A per-site row whose norm is below this fraction of the largest row is treated as "no direction
# here": e.g. site 0 (the embedding of the same final template token for every prompt) gives a
# difference of means that is zero up to summation rounding, which must not be normalised into noise.
_DEGENERATE_ROW = 1e-6


def unit(d) -> mx.array:
    """`d` as a float32 unit vector; a zero or non-finite d is a UserError."""
    v = mx.array(np.asarray(d, dtype=np.float32)) if not isinstance(d, mx.array) else d.astype(mx.float32)
    if v.ndim != 1:
        raise UserError(f"a direction must be one vector; got shape {tuple(v.shape)}")
    norm = float(mx.linalg.norm(v).item())
    if not np.isfinite(norm) or norm == 0.0:
        raise UserError("the direction is zero or not finite; recompute the directions or pick another layer")
    return v / norm


def site_directions(directions, num_layers: int, hidden: int) -> list[mx.array | None]:
    """One unit vector (or None: no direction there) per residual site 0..num_layers.

    `directions` is one vector [hidden] (used at every site) or one row per site
    [num_layers + 1, hidden], as in the directions file.
    """
    arr = np.asarray(directions, dtype=np.float32)
    if arr.shape == (hidden,):
        d = unit(arr)
        return [d] * (num_layers + 1)
    if arr.shape != (num_layers + 1, hidden):
        raise UserError(
            f"directions have shape {arr.shape}; expected ({hidden},) for one direction or "
            f"({num_layers + 1}, {hidden}) for one per residual site")
    if not np.isfinite(arr).all():
        raise UserError("the directions contain NaN or inf; recompute them")
    norms = np.linalg.norm(arr, axis=-1)
    if norms.max() == 0:
        raise UserError("every direction row is zero; recompute the directions")
    return [unit(row) if n > _DEGENERATE_ROW * norms.max() else None for row, n in zip(arr, norms)]


def orthogonalize(W: mx.array, d, scale: float = 1.0, kind: str = "linear",
                  norm_preserve: bool = False) -> mx.array:
    """Project direction `d` out of the vectors W writes, with signed strength `scale`.

    kind="linear": W is [hidden, in] (or [experts, hidden, in]); its columns are written.
    kind="embedding": W is [vocab, hidden]; its rows are written.
    norm_preserve: rescale every written vector to its norm before the edit (vectors the edit
    sends to zero, or nearly, stay zero). d is normalised here: its scale and sign do not matter.
    """
    if kind not in ("linear", "embedding"):
        raise ValueError(f"kind must be 'linear' or 'embedding', not {kind!r}")
    d = unit(d)
    hidden_axis = -1 if kind == "embedding" else -2
    if W.ndim < 2 or W.shape[hidden_axis] != d.shape[0]:
        raise UserError(f"a {kind} weight of shape {tuple(W.shape)} does not write vectors of size {d.shape[0]}")
    Wf = W.astype(mx.float32)
    if kind == "embedding":
        out = Wf - scale * (Wf @ d)[..., :, None] * d
    else:
        out = Wf - scale * d[:, None] * (d[None, :] @ Wf)
    if norm_preserve:
        out = _rescale(out, Wf, axis=hidden_axis)
    return out.astype(W.dtype)


def _rescale(new: mx.array, old: mx.array, axis: int) -> mx.array:
    old_n = mx.linalg.norm(old, axis=axis, keepdims=True)
    new_n = mx.linalg.norm(new, axis=axis, keepdims=True)
    keep = new_n > 1e-6 * old_n
    factor = mx.where(keep, old_n / mx.where(keep, new_n, 1.0), 0.0)
    return new * factor


def _project_vector(b: mx.array, d: mx.array, scale: float, norm_preserve: bool) -> mx.array:
    """The same edit on one written vector (a bias of a residual writer)."""
    bf = b.astype(mx.float32)
    out = bf - scale * (bf @ d) * d
    if norm_preserve:
        out = _rescale(out[None], bf[None], axis=-1)[0]
    return out.astype(b.dtype)


# ---------------------------------------------------------------------------------------------
# Quantized modules: dequantize, edit, re-quantize with the same settings.

def is_quantized(module) -> bool:
    return isinstance(module, nn.Module) and "scales" in module


def _read_weight(module) -> mx.array:
    if not is_quantized(module):
        return module.weight
    if "global_scale" in module:
        raise UnsupportedEdit("editing nvfp4 layers with a global scale is not supported; "
                              "use a model quantized with affine/mxfp modes or unquantized")
    return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=module.mode, dtype=mx.float32)


def _write_weight(module, W: mx.array) -> None:
    if not is_quantized(module):
        module.weight = W
        return
    packed = mx.quantize(W.astype(mx.float32), group_size=module.group_size, bits=module.bits, mode=module.mode)
    scales_dtype = module.scales.dtype
    module.weight = packed[0]
    module.scales = packed[1] if scales_dtype == packed[1].dtype else packed[1].astype(scales_dtype)
    if len(packed) > 2:
        module.biases = packed[2].astype(scales_dtype)


def _compute_dtype(module):
    return module.scales.dtype if is_quantized(module) else module.weight.dtype


# ---------------------------------------------------------------------------------------------
# Tied embeddings.

def untie_embeddings(model) -> bool:
    """Give a tied model its own `lm_head`, equal to the current embedding, so that editing the
    embedding leaves the output head (and so the logits' read-out) unchanged. Returns True if it
    untied. The saved config then says tie_word_embeddings: false."""
    if not arch.has_tied_embeddings(model):
        return False
    emb = arch.embedding(model)
    if is_quantized(emb):
        vocab, hidden = emb.weight.shape[0], arch.hidden_size(model)
        head = nn.QuantizedLinear(hidden, vocab, bias=False, group_size=emb.group_size, bits=emb.bits,
                                  mode=emb.mode)
        # Replace the placeholder arrays (never evaluated: mlx is lazy) with the embedding's own.
        head.weight, head.scales = emb.weight, emb.scales
        if "biases" in emb:
            head.biases = emb.biases
        elif "biases" in head:
            del head["biases"]
    else:
        vocab, hidden = emb.weight.shape
        head = nn.Linear(hidden, vocab, bias=False)
        head.weight = emb.weight
    model.lm_head = head
    model.args.tie_word_embeddings = False
    if hasattr(model, "tie_word_embeddings"):  # gemma3_text's Model reads its own switch, set on load
        model.tie_word_embeddings = False
    return True


# ---------------------------------------------------------------------------------------------
# Ablation / signed projection of every residual writer.

@dataclass
class EditSummary:
    """What `ablate` changed, for the edit record."""

    edited: list[str] = field(default_factory=list)  # module paths
    skipped: list[str] = field(default_factory=list)  # writers whose site has no direction
    requantized: list[str] = field(default_factory=list)
    untied_embeddings: bool = False

    def as_record(self) -> dict:
        return {"writers_edited": len(self.edited), "writers_skipped": self.skipped,
                "requantized": len(self.requantized), "untied_embeddings": self.untied_embeddings}


def _layer_list(model, layers) -> list[int]:
    n = arch.num_layers(model)
    if layers is None:
        return list(range(n))
    out = sorted({int(i) for i in layers})
    for i in out:
        validate.layer("layer", i, n)
    return out


def ablate(model, directions, layers: Iterable[int] | None = None, scale: float = 1.0,
           norm_preserve: bool = False, include_embedding: bool = True,
           progress: Update | None = None,
           writer_scale: Callable[[arch.Writer], float] | None = None) -> EditSummary:
    """Orthogonalize every residual writer of `model` in place (scale=1: remove the direction;
    other signed scales: `project`).

    directions: one vector [hidden] for every writer, or one row per residual site
    [num_layers + 1, hidden]: the embedding uses row 0 and block i's writers row i + 1 (the site
    their output reaches first; see the module docstring). Zero rows are skipped.
    layers: the blocks whose writers are edited (default all); include_embedding: also edit the
    token embedding. A tied embedding is untied first (always: the edit is defined on what is
    written to the residual stream, and editing a tied matrix would also change the output head;
    the cost is one vocab x hidden matrix in the saved model).
    writer_scale: the scale of each writer instead of `scale` (e.g. `kernel_scales`); a writer
    whose scale is 0 is left untouched (listed as skipped).

    A writer whose output passes through a norm g * o / rms(o) before the residual add (Gemma's
    post-norms, `arch.Writer.norm`) writes a vector whose component along d is (g * d) . o / rms(o),
    so the edit projects u = unit(g * d) out of it instead of d: with scale 1 the written vector
    has no component along d. With another scale the component along d of g * o is multiplied by
    1 - scale, but rms(o) changes with it: the whole written vector is rescaled, so this is not
    `projecting_out` (which projects the norm's output and keeps its length).
    """
    arch.check_supported(model)
    n, hidden = arch.num_layers(model), arch.hidden_size(model)
    rows = site_directions(directions, n, hidden)
    writers = arch.residual_writers(model, _layer_list(model, layers), include_embedding)
    summary = EditSummary()
    if include_embedding and rows[0] is not None:
        summary.untied_embeddings = untie_embeddings(model)
    for w in writers:
        d = rows[w.layer + 1]
        s = scale if writer_scale is None else float(writer_scale(w))
        gain = arch.writer_gain(model, w)
        if d is not None and gain is not None:
            d = gain * d  # orthogonalize makes it unit
            if float(mx.linalg.norm(d).item()) == 0.0:  # the norm writes nothing along the direction
                d = None
        if d is None or s == 0.0:
            summary.skipped.append(w.path)
            if progress is not None:
                progress(1)
            continue
        module = arch.get_module(model, w.path)
        if not isinstance(module, nn.Module) or "weight" not in module:
            raise UnsupportedEdit(f"{w.path} is not a weight matrix this tool can edit")
        W = _read_weight(module)
        if W.ndim not in ((2,) if w.kind == "embedding" else (2, 3)):
            raise UnsupportedEdit(f"{w.path} has a weight of shape {tuple(W.shape)}, which this tool cannot edit")
        _write_weight(module, orthogonalize(W, d, s, w.kind, norm_preserve))
        if w.kind == "linear" and "bias" in module:
            module.bias = _project_vector(module.bias, d, s, norm_preserve)
        mx.eval(module.parameters())  # one matrix at a time: bounded memory, honest progress
        if is_quantized(module):
            summary.requantized.append(w.path)
        summary.edited.append(w.path)
        if progress is not None:
            progress(1)
    return summary


# ---------------------------------------------------------------------------------------------
# Edit shapes: which direction, and how strongly each layer's writers are edited.

def layer_kernel(num_layers: int, peak: float, position: float, width: float) -> np.ndarray:
    """Weight of each block 0..num_layers-1: `peak` at `position` (fractional allowed), falling
    linearly with the distance to 0 at `width` blocks away and beyond. A tent rather than one
    weight everywhere: the refusal feature is written by a band of layers, and editing far
    outside that band only costs KL."""
    if width <= 0:
        raise UserError(f"a kernel width must be positive, not {width}")
    distance = np.abs(np.arange(num_layers, dtype=np.float64) - float(position))
    return (float(peak) * np.clip(1.0 - distance / float(width), 0.0, None)).astype(np.float32)


@dataclass(frozen=True)
class Kernel:
    """One tent (`layer_kernel`) per writer kind: attention output (o_proj) and MLP down."""

    attn_peak: float
    attn_position: float
    attn_width: float
    mlp_peak: float
    mlp_position: float
    mlp_width: float


def kernel_scales(kernel: Kernel, num_layers: int) -> Callable[[arch.Writer], float]:
    """`ablate`'s writer_scale for a kernel: each block's o_proj and down_proj get their tent's
    weight at that block; the embedding gets 0 (left as is)."""
    attn = layer_kernel(num_layers, kernel.attn_peak, kernel.attn_position, kernel.attn_width)
    mlp = layer_kernel(num_layers, kernel.mlp_peak, kernel.mlp_position, kernel.mlp_width)

    def scale(w: arch.Writer) -> float:
        if w.kind == "embedding":
            return 0.0
        return float((mlp if w.role == "mlp" else attn)[w.layer])

    return scale


def interpolated_direction(directions, index: float) -> np.ndarray:
    """The unit direction at a fractional site `index` of per-site rows [sites, hidden]: the two
    neighbouring rows, each made unit, mixed linearly and renormalised. Index 14.3 is 70% row 14
    and 30% row 15 (an integer index is that row, made unit)."""
    rows = np.asarray(directions, np.float64)
    if not 0 <= index <= rows.shape[0] - 1:
        raise UserError(f"direction index {index} is out of range 0..{rows.shape[0] - 1}")
    lo = int(np.floor(index))
    hi, t = min(lo + 1, rows.shape[0] - 1), float(index) - lo
    a, b = (np.asarray(unit(rows[i]), np.float64) for i in (lo, hi))
    mix = (1.0 - t) * a + t * b
    return np.asarray(unit(mix.astype(np.float32)))


def without_component(d, along) -> np.ndarray:
    """`d` with its component along `along` removed, renormalised (the "projected" direction:
    removing the harmless mean's share leaves what tells harmful from harmless, and less of what
    every prompt shares). A zero `along` leaves d as is."""
    dv = np.asarray(unit(d), np.float64)
    a = np.asarray(along, np.float64)
    n = np.linalg.norm(a)
    if n > 0:
        a = a / n
        dv = dv - (dv @ a) * a
    return np.asarray(unit(dv.astype(np.float32)))


def biprojected_rows(direction, harmless_means) -> np.ndarray:
    """Biprojection: one direction (measured at one layer) for every site, each row projected
    against *that site's* harmless mean [sites, hidden], so each writer removes the direction
    without touching the mean of the stream it writes to."""
    return np.stack([without_component(direction, m) for m in np.asarray(harmless_means, np.float32)])


# ---------------------------------------------------------------------------------------------
# Steering bias.

def _model_config(model) -> dict:
    return dict(vars(model.args))


def check_steerable(model, layer: int) -> None:
    """Refuse now a steering bias at `layer` that could not be saved for stock mlx_lm later
    (layer 0, an embedding edit, always can)."""
    if layer == 0:
        return
    try:
        arch.stock_config(_model_config(model), needs_output_bias=True)
    except arch.UnsupportedArchitecture as exc:
        raise UnsupportedEdit(str(exc)) from None


def add_steering_bias(model, layer: int, vector) -> str:
    """Add `vector` to the residual stream at `layer` for every token, in the weights. Returns the
    edited site (a dotted parameter path).

    layer 0: added to every embedding row, divided by the factor the decoder scales the embedding
    by (`arch.embedding_scale`), so resid_pre of layer 0 gets `vector` (a tied embedding is
    untied first so the output head stays the same). layer L > 0: added to the bias (created if
    absent) of the module `arch.steering_site(model, L)` names, inside block L - 1. Quantized weights are
    untouched by a bias edit; at layer 0 a quantized embedding is re-quantized.
    """
    validate.layer("layer", layer, arch.num_layers(model), final_residual=True)
    v = mx.array(np.asarray(vector, dtype=np.float32))
    if v.shape != (arch.hidden_size(model),):
        raise UserError(f"steering vector has shape {tuple(v.shape)}; expected ({arch.hidden_size(model)},)")
    if not bool(mx.all(mx.isfinite(v)).item()):
        raise UserError("the steering vector is not finite; check alpha and the direction")
    site = arch.steering_site(model, layer)
    if layer == 0:
        untie_embeddings(model)
        emb = arch.get_module(model, site)
        W = _read_weight(emb)
        # the decoder scales the embedding's output (Gemma: by sqrt(hidden)); rows get v / scale
        row = v / arch.embedding_scale(model)
        _write_weight(emb, (W.astype(mx.float32) + row).astype(W.dtype))
        mx.eval(emb.parameters())
        return site
    check_steerable(model, layer)
    module = arch.get_module(model, site)
    if "bias" in module:
        module.bias = (module.bias.astype(mx.float32) + v).astype(module.bias.dtype)
    else:
        module.bias = v.astype(_compute_dtype(module))
    mx.eval(module.bias)
    return f"{site}.bias"

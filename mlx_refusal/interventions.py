"""Runtime interventions on the residual stream: the forward-pass twins of the weight edits.

Residual sites follow the directions file: site l < L is resid_pre of layer l (the input of
block l, so site 0 is the embedding output); site L is the output of the last block (the input of
the final norm). An intervention temporarily replaces a submodule (a decoder block
(`model.model.layers[i]` in mlx_lm's Llama layout), or a residual writer inside one) with a small `nn.Module` wrapper that
transforms its input and/or output, and puts the original back on exit, even when the forward pass
raises. mlx_lm itself is never patched.

    with adding_at(model, layer=6, vector=alpha * d):      # add a vector at resid_pre of layer 6
        logits = model(tokens)
    with projecting_out(model, d):                         # directional ablation everywhere
        logits = model(tokens)
    with resuming_at(model, layer=6, hidden=h6):          # blocks 0-5 not run: block 6 gets h6
        logits = model(tokens)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from . import arch, validate
from .edit import site_directions, unit
from .errors import UserError

Transform = Callable[[mx.array], mx.array]


class Hooked(nn.Module):
    """A module with a transform applied to its input (`before`) and its output (`after`)."""

    def __init__(self, inner, before: Transform | None = None, after: Transform | None = None):
        super().__init__()
        self.inner = inner
        # Plain attributes (not arrays/modules) so they stay out of the parameter tree.
        object.__setattr__(self, "_before", before)
        object.__setattr__(self, "_after", after)

    def __call__(self, x, *args, **kwargs):
        if self._before is not None:
            x = self._before(x)
        out = self.inner(x, *args, **kwargs)
        if self._after is not None:
            out = self._after(out)
        return out

    def __getattr__(self, name):
        # Models read attributes of their blocks (llama's `use_sliding`); answer for the inner one.
        if name in self:
            return self[name]
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            if "inner" not in self:
                raise
            return getattr(self["inner"], name)


class Resumed(Hooked):
    """A block that is not run: it hands on `hidden` (the first of the skipped blocks) or its own
    input (the rest). Its cache is left as it was."""

    def __init__(self, inner, hidden: mx.array | None):
        super().__init__(inner)
        object.__setattr__(self, "_hidden", hidden)

    def __call__(self, x, *args, **kwargs):
        if self._hidden is None:
            return x
        if self._hidden.shape != x.shape:
            raise ValueError(f"resumed hidden state {tuple(self._hidden.shape)} does not fit the call's "
                             f"{tuple(x.shape)}")
        return self._hidden.astype(x.dtype)


def _parent_and_key(model, path: str):
    parent_path, _, key = path.rpartition(".")
    parent = arch.get_module(model, parent_path) if parent_path else model
    while isinstance(parent, Hooked):  # set on the real module, not on a wrapper around it
        parent = parent["inner"]
    return parent, (int(key) if key.isdigit() else key)


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


@contextmanager
def hooked_modules(model, hooks: Mapping[str, tuple[Transform | None, Transform | None]]):
    """During the `with`, wrap the module at each dotted path with (before, after) transforms of its
    input and output. Everything is restored on exit, even on error."""
    with _replaced(model, {path: (lambda m, b=b, a=a: Hooked(m, b, a)) for path, (b, a) in hooks.items()}):
        yield model


@contextmanager
def _replaced(model, wrappers: Mapping[str, Callable[[nn.Module], nn.Module]]):
    """During the `with`, the module at each dotted path is replaced by `wrap(module)`."""
    swapped = []
    try:
        for path, wrap in wrappers.items():
            parent, key = _parent_and_key(model, path)
            original = _get(parent, key)
            _set(parent, key, wrap(original))
            swapped.append((parent, key, original))
        yield model
    finally:
        for parent, key, original in reversed(swapped):
            _set(parent, key, original)


@contextmanager
def hooked_layers(model, before: Mapping[int, Transform] | None = None,
                  after: Mapping[int, Transform] | None = None):
    """During the `with`, apply `before[i]` to the input and `after[i]` to the output of block i.

    Transforms take and return residual-stream arrays [batch, tokens, hidden].
    """
    arch.check_supported(model)
    n = arch.num_layers(model)
    before, after = dict(before or {}), dict(after or {})
    for i in sorted(set(before) | set(after)):
        validate.layer("layer", i, n)
    hooks = {arch.layer_path(model, i): (before.get(i), after.get(i)) for i in sorted(set(before) | set(after))}
    with hooked_modules(model, hooks):
        yield model


@contextmanager
def resuming_at(model, layer: int, hidden: mx.array):
    """During the `with`, blocks 0..layer-1 are not run and block `layer` gets `hidden`
    [batch, tokens, hidden] as its input: a forward pass that starts from a recorded residual
    stream. The embedding, the masks (built from the caches before block 0) and the blocks from
    `layer` on run as usual; the skipped blocks' caches are not written, so use it for passes
    whose caches below `layer` are not read again (a prefill's logits)."""
    validate.layer("layer", layer, arch.num_layers(model))
    if layer < 1:
        raise ValueError("a pass resumed at layer 0 skips nothing; add at layer 0 instead")
    with _replaced(model, {arch.layer_path(model, i): (lambda m, i=i: Resumed(m, hidden if i == 0 else None))
                           for i in range(layer)}):
        yield model


def _vector(model, vector) -> mx.array:
    v = mx.array(vector, dtype=mx.float32)
    if v.shape != (arch.hidden_size(model),):
        raise UserError(f"steering vector has shape {tuple(v.shape)}; expected ({arch.hidden_size(model)},)")
    return v


def _adder(v: mx.array) -> Transform:
    return lambda x: x + v.astype(x.dtype)


@contextmanager
def adding_at(model, layer: int, vector):
    """Add `vector` to resid_pre of `layer` (every token), or to the final residual if
    `layer == num_layers`."""
    n = arch.num_layers(model)
    validate.layer("layer", layer, n, final_residual=True)
    add = _adder(_vector(model, vector))
    with hooked_layers(model, before={layer: add} if layer < n else {}, after={n - 1: add} if layer == n else {}):
        yield model


def projector(direction, scale: float = 1.0) -> Transform:
    """x -> x - scale * (x . d) d, with d the unit vector along `direction`."""
    d = unit(direction)

    def project(x):
        xf = x.astype(mx.float32)
        return (xf - scale * (xf @ d)[..., None] * d).astype(x.dtype)

    return project


@contextmanager
def projecting_out(model, directions, scale: float = 1.0):
    """The runtime twin of `edit.ablate(model, directions, scale=scale)` over all layers.

    Applies (I - scale d d^T) to everything written into the residual stream: the embedding
    output (the input of block 0) and what every residual writer adds (the attention output and
    MLP down projections, or the norm of their output where the family has one). With scale = 1 this is directional ablation: no residual site (resid_pre,
    resid_mid, resid_post of any layer) has a component along d. `directions` is one vector [hidden]
    or one row per site [num_layers + 1, hidden] (zero rows skipped), paired with writers as in
    `edit.ablate`: the embedding uses row 0, block i's writers row i + 1.
    """
    n = arch.num_layers(model)
    rows = site_directions(directions, n, arch.hidden_size(model))
    hooks = {}
    for w in arch.residual_writers(model, include_embedding=False):
        if rows[w.layer + 1] is not None:
            hooks[w.written_by] = (None, projector(rows[w.layer + 1], scale))
    before = {0: projector(rows[0], scale)} if rows[0] is not None else {}
    with hooked_layers(model, before=before), hooked_modules(model, hooks):
        yield model

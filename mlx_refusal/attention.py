"""Attention for MLX's CPU build: grouped query products and a softmax made of multiply-adds.

MLX's CPU build has no fused attention. mx.fast.scaled_dot_product_attention computes the scores,
a softmax and the weighted values as separate ops, with one matrix product per sequence and
*query* head, and the softmax's exp runs one element at a time (~19 ns, see activations.py). On
Qwen2.5-0.5B (14 query heads sharing 2 key/value heads) the exp is most of attention: at prefill
31 of 40 ms a block for 32 prompts of 60 tokens, at decode 0.48 of 0.79 ms a block at batch 32.

`install` gives every block's attention a forward that takes all the query heads of one key/value
head in one product (7x fewer, larger products on that model) and normalises the scores with
activations' multiply-add exp, compiled into one kernel (within 2e-5 of MLX's attention,
tests/test_attention.py). Like activations.install it swaps the class of each attention instance:
the subclass's `__call__` runs the stock `__call__`'s own code, with this module's
`scaled_dot_product_attention` where the stock code names mlx_lm's, so every family keeps its own
projections, RoPE and cache handling, and mlx_lm itself is never patched. Quantized caches and
attention sinks keep mlx_lm's function.
"""
from __future__ import annotations

import types

import mlx.core as mx
from mlx_lm.models import base

from . import arch
from .activations import mul_add_exp, swaps_wanted, swapped, unswap

SDPA = "scaled_dot_product_attention"  # the global name every mlx_lm family calls attention by


# Compiled per shape, as activations' kernels are (a decode step re-traces once for all blocks).
@mx.compile
def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis. Masked scores (float32's minimum) come out as e^-44 against the
    row's largest, ~1e-19: nothing, as in MLX's own."""
    e = mul_add_exp(scores - mx.max(scores, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


def _grouped_mask(mask: mx.array, heads: int, group: int) -> mx.array:
    """A mask broadcastable to scores [B, H, Lq, Lk], laid out as grouped scores [B, Hk, G, Lq, Lk]."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], heads, group, *mask.shape[2:])


def grouped_attention(queries, keys, values, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for queries [B, H, Lq, D] and keys, values [B, Hk, Lk, D]
    (H a multiple of Hk); mask None, "causal", boolean (True: attend) or additive, broadcastable
    to [B, H, Lq, Lk]."""
    b, h, lq, d = queries.shape
    hk, lk = keys.shape[1], keys.shape[2]
    g = h // hk
    scores = ((queries * scale).reshape(b, hk, g * lq, d) @ keys.swapaxes(-1, -2)).reshape(b, hk, g, lq, lk)
    if isinstance(mask, str):  # "causal": the queries are the last lq positions of lk
        mask = mx.arange(lk)[None] <= mx.arange(lk - lq, lk)[:, None]
    if mask is not None:
        mask = _grouped_mask(mask, hk, g)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask.astype(scores.dtype)
    weights = softmax(scores.astype(mx.float32)).astype(values.dtype)
    return (weights.reshape(b, hk, g * lq, lk) @ values).reshape(b, h, lq, d)


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx_lm's `scaled_dot_product_attention`, with `grouped_attention` where it applies."""
    if sinks is not None or hasattr(cache, "bits"):
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return grouped_attention(queries, keys, values, scale, mask)


_fast_classes: dict[type, type] = {}


def _fast_class(stock: type) -> type:
    if stock not in _fast_classes:
        call = stock.__call__
        names = {**call.__globals__, SDPA: scaled_dot_product_attention}
        fast_call = types.FunctionType(call.__code__, names, call.__name__, call.__defaults__, call.__closure__)
        fast_call.__kwdefaults__ = call.__kwdefaults__
        _fast_classes[stock] = type(stock.__name__, (stock,), {
            "__call__": fast_call, "__module__": __name__, "__qualname__": f"grouped {stock.__qualname__}",
            "stock_class": stock})
    return _fast_classes[stock]


def _calls_sdpa(module) -> bool:
    call = getattr(type(module), "__call__", None)
    return isinstance(call, types.FunctionType) and SDPA in call.__code__.co_names and SDPA in call.__globals__


def install(model, device: str | None = None) -> bool:
    """Give every block's attention the grouped forward, when `activations.swaps_wanted(device)`.
    Returns whether it did."""
    if not swaps_wanted(device):
        return False
    attns = [getattr(layer, "self_attn", None) for layer in arch.layers(model)]
    if not attns or not all(a is not None and _calls_sdpa(a) for a in attns):
        return False
    for attn in attns:
        if not hasattr(type(attn), "stock_class"):
            attn.__class__ = _fast_class(type(attn))
    return True


def installed(model) -> bool:
    return bool(swapped(model, "self_attn"))


def uninstall(model) -> None:
    """Put mlx_lm's attention back (benchmarks compare both in one process)."""
    unswap(model, "self_attn")

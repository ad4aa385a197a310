"""The CPU attention (`mlx_refusal/attention.py`): grouped query products and a multiply-add
softmax, against a float64 reference and MLX's own attention. Installed in a model, it is tested
beside the activations (tests/test_activations.py): the same logits and greedy text as stock mlx_lm
on every family."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx

from mlx_refusal import attention


def _reference(q, k, v, scale, allowed):
    """float64 attention; `allowed` [B|1, H|1, Lq, Lk] booleans."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", w / w.sum(-1, keepdims=True), v)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), hk=st.integers(1, 3), g=st.integers(1, 4), lq=st.integers(1, 6), extra=st.integers(0, 9),
       d=st.sampled_from([8, 16, 64]), kind=st.sampled_from(["none", "causal", "bool", "additive", "per-head"]),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_attention_is_the_float64_one(b, hk, g, lq, extra, d, kind, seed):
    rng = np.random.default_rng(seed)
    lk, h, scale = lq + extra, hk * g, d ** -0.5
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, h, lq, d), (b, hk, lk, d), (b, hk, lk, d)))
    allowed = np.ones((1, 1, lq, lk), bool)
    mask = None
    if kind == "causal":
        mask = "causal"
        allowed = np.arange(lk)[None] <= np.arange(extra, lk)[:, None]
    elif kind in ("bool", "additive"):  # left padding, per sequence; each row keeps its last key
        start = rng.integers(0, lk, size=b)
        allowed = np.arange(lk)[None, None, None] >= start[:, None, None, None]
        mask = mx.array(allowed) if kind == "bool" else mx.array(np.where(allowed, 0.0, -1e9).astype(np.float32))
    elif kind == "per-head":
        allowed = rng.random((b, h, lq, lk)) < 0.7
        allowed[..., -1] = True
        mask = mx.array(allowed)
    got = np.array(attention.grouped_attention(mx.array(q), mx.array(k), mx.array(v), scale, mask))
    want = _reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale, allowed)
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(v).max()))


@pytest.mark.parametrize("lq, mask", [(1, None), (7, "causal"), (5, "bool")])
def test_it_matches_mlx_attention(lq, mask):
    rng = np.random.default_rng(lq)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((4, 14, lq, 64), (4, 2, 12, 64), (4, 2, 12, 64)))
    if mask == "bool":
        mask = mx.array(np.arange(12)[None, None, None] >= np.array([0, 3, 6, 11])[:, None, None, None])
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    np.testing.assert_allclose(np.array(attention.grouped_attention(q, k, v, 0.125, mask)), np.array(want), atol=2e-5)


def test_softmax_sums_to_one_and_gives_masked_scores_nothing():
    s = mx.array([[0.0, 1.0, 2.0, float(np.finfo(np.float32).min)], [80.0, -80.0, 3.0, 0.0]])
    w = np.array(attention.softmax(s))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert w[0, 3] < 1e-18 and w[1, 0] > 0.99
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(w[0, :3], e / e.sum(), rtol=2e-5)


def test_quantized_caches_and_sinks_keep_mlx_lm_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(attention.base, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or "stock")

    class QuantizedCache:
        bits, group_size = 4, 64

    q = k = v = mx.zeros((1, 2, 3, 8))
    assert attention.scaled_dot_product_attention(q, k, v, QuantizedCache(), scale=1.0, mask=None) == "stock"
    assert attention.scaled_dot_product_attention(q, k, v, None, scale=1.0, mask=None, sinks=mx.zeros(2)) == "stock"
    assert len(calls) == 2
    assert attention.scaled_dot_product_attention(q, k, v, None, scale=1.0, mask=None).shape == (1, 2, 3, 8)


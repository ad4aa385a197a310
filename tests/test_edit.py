"""Weight edits: Hypothesis properties of orthogonalize, and equivalence of each weight edit with
its runtime twin (mlx_refusal.interventions) on the tiny fixtures."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten

from mlx_refusal import arch, edit, interventions
from mlx_refusal.errors import UserError

# ---------------------------------------------------------------------------------------------
# Properties of orthogonalize on small random matrices (float32 maths, tolerances relative to size).

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
scales = st.floats(-5, 5, allow_nan=False, width=32)


@st.composite
def matrix_and_direction(draw, kind="linear"):
    hidden = draw(st.integers(2, 8))
    other = draw(st.integers(1, 8))
    shape = (hidden, other) if kind == "linear" else (other, hidden)
    W = draw(hnp.arrays(np.float32, shape, elements=finite))
    d = draw(hnp.arrays(np.float32, (hidden,), elements=finite))
    assume(np.linalg.norm(d) > 1e-2)
    return W, d


def orth(W, d, s=1.0, kind="linear", norm_preserve=False):
    return np.array(edit.orthogonalize(mx.array(W), mx.array(d), s, kind, norm_preserve))


def tol(W):
    return 1e-4 * (1.0 + float(np.abs(W).max()))


def unit(d):
    return d / np.linalg.norm(d.astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction())
def test_idempotent(Wd):
    W, d = Wd
    once = orth(W, d)
    np.testing.assert_allclose(orth(once, d), once, atol=tol(W))


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction(), st.sampled_from(["linear", "embedding"]))
def test_no_component_along_d(Wd, kind):
    W, d = Wd
    if kind == "embedding":
        W = np.ascontiguousarray(W.T)
        along = orth(W, d, kind=kind) @ unit(d)
    else:
        along = unit(d) @ orth(W, d, kind=kind)
    np.testing.assert_allclose(along, 0.0, atol=tol(W))


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction(), scales)
def test_orthogonal_complement_unchanged(Wd, s):
    W, d = Wd
    u = unit(d)
    complement = np.eye(len(d)) - np.outer(u, u)
    np.testing.assert_allclose(complement @ orth(W, d, s), complement @ W, atol=tol(W) * (1 + abs(s)))


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction(), st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3), scales)
def test_invariant_to_scale_and_sign_of_d(Wd, c, s):
    W, d = Wd
    np.testing.assert_allclose(orth(W, (c * d).astype(np.float32), s), orth(W, d, s),
                               atol=tol(W) * (1 + abs(s)))


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction())
def test_frobenius_norm_never_increases(Wd):
    W, d = Wd
    assert np.linalg.norm(orth(W, d)) <= np.linalg.norm(W) * (1 + 1e-6) + 1e-6


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction(), scales, scales)
def test_signed_scales_compose(Wd, s1, s2):
    W, d = Wd
    combined = 1 - (1 - s1) * (1 - s2)
    np.testing.assert_allclose(orth(orth(W, d, s1), d, s2), orth(W, d, combined),
                               atol=tol(W) * (1 + abs(s1)) * (1 + abs(s2)) * 4)


@settings(max_examples=60, deadline=None)
@given(matrix_and_direction(), scales, st.sampled_from(["linear", "embedding"]))
def test_norm_preserve_keeps_every_written_vector_norm(Wd, s, kind):
    W, d = Wd
    axis = 0
    if kind == "embedding":
        W, axis = np.ascontiguousarray(W.T), 1
    before = np.linalg.norm(W, axis=axis)
    plain_after = np.linalg.norm(orth(W, d, s, kind), axis=axis)
    # vectors the edit sends (nearly) to zero stay zero by design: skip those
    assume(np.all(plain_after > 1e-3 * (before + 1e-3)))
    after = np.linalg.norm(orth(W, d, s, kind, norm_preserve=True), axis=axis)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(matrix_and_direction(), scales)
def test_embedding_is_the_transposed_linear_convention(Wd, s):
    W, d = Wd  # W is [hidden, other]: as an embedding its transpose [other, hidden] writes rows
    as_embedding = orth(np.ascontiguousarray(W.T), d, s, kind="embedding")
    np.testing.assert_allclose(as_embedding, orth(W, d, s).T, atol=tol(W) * (1 + abs(s)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), matrix_and_direction(), scales)
def test_expert_stack_is_edited_per_expert(experts, Wd, s):
    W, d = Wd
    stack = np.stack([W * (e + 1) for e in range(experts)])
    got = orth(stack, d, s)
    for e in range(experts):
        np.testing.assert_allclose(got[e], orth(W * (e + 1), d, s), atol=tol(stack) * (1 + abs(s)))


def test_zero_or_non_finite_direction_is_a_user_error():
    W = mx.ones((4, 3))
    for d in (np.zeros(4, np.float32), np.array([1, np.nan, 0, 0], np.float32)):
        with pytest.raises(UserError, match="zero or not finite"):
            edit.orthogonalize(W, d)
    with pytest.raises(UserError):
        edit.orthogonalize(W, np.ones(5, np.float32))


def test_keeps_dtype_and_computes_in_float32():
    W = mx.random.normal((16, 8), key=mx.random.key(0)).astype(mx.bfloat16)
    d = mx.random.normal((16,), key=mx.random.key(1))
    out = edit.orthogonalize(W, d)
    assert out.dtype == mx.bfloat16
    assert float(mx.abs(edit.unit(d) @ out.astype(mx.float32)).max()) < 0.05


# ---------------------------------------------------------------------------------------------
# Weight edits vs their runtime twins on the tiny models.

TOKENS = mx.array([[3, 5, 17, 33, 100, 7, 250, 9], [1, 2, 4, 8, 16, 32, 64, 128]])


def load(path):
    model, _ = mlx_lm.load(str(path))
    return model


def rand_dir(hidden, seed=0):
    return np.random.default_rng(1000 + seed).standard_normal(hidden).astype(np.float32)


def max_diff(a, b):
    return float(mx.abs(a - b).max())


@pytest.fixture(params=["tiny_qwen2", "tiny_qwen2_tied", "tiny_llama", "tiny_qwen3"])
def any_model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("scale", [1.0, 2.0, -0.5])
def test_ablation_equals_runtime_projection(any_model, scale):
    model = load(any_model)
    d = rand_dir(arch.hidden_size(model))
    with interventions.projecting_out(model, d, scale):
        expected = model(TOKENS)
    tied = arch.has_tied_embeddings(model)
    summary = edit.ablate(model, d, scale=scale)
    assert summary.untied_embeddings == tied
    assert len(summary.edited) == 1 + 2 * arch.num_layers(model)
    got = model(TOKENS)
    assert max_diff(got, expected) <= 1e-3
    assert max_diff(got, load(any_model)(TOKENS)) > 1e-2  # the edit did something


def test_runtime_projection_removes_the_direction_everywhere(tiny_qwen2):
    model = load(tiny_qwen2)
    d = edit.unit(rand_dir(64, 3))
    seen = []

    def record(x):
        seen.append(x)
        return x

    # recorders go in first, so the projection (wrapped around them) runs before they look
    resid_pre = {i: record for i in range(4)}
    resid_mid = {f"model.layers.{i}.post_attention_layernorm": (record, None) for i in range(4)}
    with interventions.hooked_layers(model, before=resid_pre, after={3: record}):
        with interventions.hooked_modules(model, resid_mid):
            with interventions.projecting_out(model, d):
                model(TOKENS)
    assert len(seen) == 9
    for x in seen:
        assert float(mx.abs(x @ d).max()) < 1e-5 * float(mx.abs(x).max())


def test_per_site_directions_use_the_row_of_the_site_written(tiny_qwen2):
    model = load(tiny_qwen2)
    n = arch.num_layers(model)
    rows = np.stack([rand_dir(64, seed) for seed in range(n + 1)])
    rows[0] = 0.0  # site 0 is degenerate in real directions (same final token for every prompt)
    with interventions.projecting_out(model, rows):
        expected = model(TOKENS)
    summary = edit.ablate(model, rows)
    assert summary.skipped == ["model.embed_tokens"]
    assert max_diff(model(TOKENS), expected) <= 1e-3
    # block 1's writers lost row 2's direction, not row 1's
    o_proj = model.model.layers[1].self_attn.o_proj.weight
    assert float(mx.abs(edit.unit(rows[2]) @ o_proj).max()) < 1e-4
    assert float(mx.abs(edit.unit(rows[1]) @ o_proj).max()) > 1e-2


def test_layer_range_and_embedding_switch(tiny_llama):
    model = load(tiny_llama)
    before = load(tiny_llama)
    d = rand_dir(64)
    summary = edit.ablate(model, d, layers=[1, 2], include_embedding=False)
    assert summary.edited == [f"model.layers.{i}.{m}" for i in (1, 2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert mx.array_equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert mx.array_equal(model.model.layers[0].mlp.down_proj.weight, before.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(UserError, match="out of range"):
        edit.ablate(model, d, layers=[9])
    with pytest.raises(UserError, match="shape"):
        edit.ablate(model, np.ones((3, 64), np.float32))


def test_norm_preserving_ablation_keeps_written_vector_norms(tiny_qwen2):
    model, before = load(tiny_qwen2), load(tiny_qwen2)
    edit.ablate(model, rand_dir(64), norm_preserve=True)
    for w in arch.residual_writers(model):
        axis = 1 if w.kind == "embedding" else 0
        new = mx.linalg.norm(arch.get_module(model, w.path).weight, axis=axis)
        old = mx.linalg.norm(arch.get_module(before, w.path).weight, axis=axis)
        assert float(mx.abs(new - old).max()) <= 1e-4 * float(old.max())


def test_untie_keeps_the_output_head(tiny_qwen2_tied):
    model = load(tiny_qwen2_tied)
    base = model(TOKENS)
    assert edit.untie_embeddings(model) is True
    assert not arch.has_tied_embeddings(model)
    assert max_diff(model(TOKENS), base) == 0.0
    assert edit.untie_embeddings(model) is False


# qwen3 can hold a saved steering bias only at layer 0 (see test_qwen3_steering_beyond_layer_zero_is_refused)
@pytest.mark.parametrize("fixture,layer", [(f, layer) for f in ("tiny_qwen2", "tiny_qwen2_tied", "tiny_llama")
                                           for layer in (0, 2, 4)] + [("tiny_qwen3", 0)])
def test_steering_bias_equals_runtime_addition(request, fixture, layer):
    model = load(request.getfixturevalue(fixture))
    v = 8.0 * edit.unit(rand_dir(64, 5))
    with interventions.adding_at(model, layer, v):
        expected = model(TOKENS)
    site = edit.add_steering_bias(model, layer, v)
    assert site == ("model.embed_tokens" if layer == 0 else arch.steering_site(model, layer) + ".bias")
    assert max_diff(model(TOKENS), expected) <= 1e-4


def test_steering_at_layer_zero_is_resid_pre_exactly(tiny_qwen2_tied):
    model = load(tiny_qwen2_tied)
    v = 5.0 * edit.unit(rand_dir(64, 1))
    with interventions.adding_at(model, 0, v):
        expected = model(TOKENS)
    edit.add_steering_bias(model, 0, v)
    assert not arch.has_tied_embeddings(model)  # untied: the head still reads the original embedding
    assert max_diff(model(TOKENS), expected) <= 1e-4


def test_steering_bias_at_layer_l_is_resid_pre_of_l(tiny_qwen2):
    model = load(tiny_qwen2)
    v = 8.0 * edit.unit(rand_dir(64, 5))
    with interventions.adding_at(model, 2, v):
        expected = model(TOKENS)
    edit.add_steering_bias(model, 2, v)
    assert max_diff(model(TOKENS), expected) <= 1e-4


def test_steering_adds_to_an_existing_bias(tiny_qwen2):
    model = load(tiny_qwen2)
    v = edit.unit(rand_dir(64, 2))
    edit.add_steering_bias(model, 3, v)
    site = edit.add_steering_bias(model, 3, 2 * v)
    bias = arch.get_module(model, site.removesuffix(".bias")).bias
    assert float(mx.abs(bias - 3 * v).max()) < 1e-6


def test_qwen3_steering_beyond_layer_zero_is_refused(tiny_qwen3):
    model = load(tiny_qwen3)
    with pytest.raises(UserError, match="qwen3") as info:
        edit.add_steering_bias(model, 2, np.ones(64, np.float32))
    assert isinstance(info.value, arch.UnsupportedArchitecture)
    assert "bias" not in model.model.layers[1].self_attn.o_proj  # nothing was changed


def test_steering_input_errors(tiny_qwen2):
    model = load(tiny_qwen2)
    with pytest.raises(UserError, match="out of range"):
        edit.add_steering_bias(model, 5, np.ones(64, np.float32))
    with pytest.raises(UserError, match="shape"):
        edit.add_steering_bias(model, 1, np.ones(63, np.float32))
    with pytest.raises(UserError, match="finite"):
        edit.add_steering_bias(model, 1, np.full(64, np.inf, np.float32))


def test_interventions_restore_the_model_even_on_error(tiny_llama):
    model = load(tiny_llama)
    blocks = list(model.model.layers)
    attn = blocks[1].self_attn
    base = model(TOKENS)
    for cm in (interventions.projecting_out(model, rand_dir(64)),
               interventions.adding_at(model, 2, np.ones(64, np.float32))):
        with pytest.raises(RuntimeError):
            with cm:
                assert any(isinstance(b, interventions.Hooked) for b in model.model.layers) or \
                    isinstance(blocks[1].self_attn, interventions.Hooked)
                raise RuntimeError("boom")
        assert all(a is b for a, b in zip(model.model.layers, blocks))
        assert blocks[1].self_attn is attn
    assert max_diff(model(TOKENS), base) == 0.0


# ---------------------------------------------------------------------------------------------
# Quantized models: dequantize, edit, re-quantize with the same settings.

def quantized(path, bits):
    from mlx_lm.utils import quantize_model

    model, _, config = mlx_lm.load(str(path), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=bits)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_ablation_stays_within_quantization_error(tiny_qwen2_tied, bits):
    d = rand_dir(64, 7)
    float_model = load(tiny_qwen2_tied)
    float_base = float_model(TOKENS)
    edit.ablate(float_model, d)
    float_edited = float_model(TOKENS)

    qmodel = quantized(tiny_qwen2_tied, bits)
    quant_error = max_diff(qmodel(TOKENS), float_base)
    summary = edit.ablate(qmodel, d)
    assert len(summary.requantized) == len(summary.edited)
    assert isinstance(qmodel.lm_head, nn.QuantizedLinear)
    for w in arch.residual_writers(qmodel):
        m = arch.get_module(qmodel, w.path)
        assert (m.bits, m.group_size, m.weight.dtype) == (bits, 32, mx.uint32)
    # quantize-then-edit (our path) is as close to the float edit as quantizing was to the float model
    assert max_diff(qmodel(TOKENS), float_edited) <= 3 * quant_error


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weight_error_is_bounded_by_quantization_steps(tiny_qwen2, bits):
    d = rand_dir(64, 8)
    float_model, qmodel = load(tiny_qwen2), quantized(tiny_qwen2, bits)
    W = float_model.model.layers[2].mlp.down_proj.weight
    q = qmodel.model.layers[2].mlp.down_proj
    quant_err = float(mx.linalg.norm(edit._read_weight(q) - W))
    edit.ablate(qmodel, d)
    got = edit._read_weight(qmodel.model.layers[2].mlp.down_proj)
    # ||Q(P(Q(W))) - P(W)|| <= ||P(Q(W) - W)|| + requantization error <= ~2 quantization errors
    assert float(mx.linalg.norm(got - edit.orthogonalize(W, d))) <= 2.5 * quant_err


def test_steering_bias_leaves_quantized_weights_untouched(tiny_llama):
    qmodel = quantized(tiny_llama, 4)
    before = dict(tree_flatten(qmodel.parameters()))
    v = 6.0 * edit.unit(rand_dir(64, 4))
    with interventions.adding_at(qmodel, 2, v):
        expected = qmodel(TOKENS)
    site = edit.add_steering_bias(qmodel, 2, v)
    after = dict(tree_flatten(qmodel.parameters()))
    assert set(after) - set(before) == {site}
    assert all(mx.array_equal(before[k], after[k]) for k in before)
    assert max_diff(qmodel(TOKENS), expected) <= 1e-4

"""Edit shapes: per-layer kernels, interpolated, projected and biprojected directions
(mlx_refusal/edit.py), as Hypothesis properties on small arrays, and the kernel applied to a
tiny model."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mlx.core as mx
import mlx_lm

from mlx_refusal import arch, edit
from mlx_refusal.errors import UserError

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
layers = st.integers(1, 40)
positions = st.floats(-5, 45, allow_nan=False)
widths = st.floats(0.25, 30, allow_nan=False)
peaks = st.floats(0, 2, allow_nan=False)


@st.composite
def vectors(draw, n=1, hidden=None):
    hidden = hidden or draw(st.integers(2, 8))
    out = [draw(hnp.arrays(np.float32, (hidden,), elements=finite)) for _ in range(n)]
    for v in out:
        assume(np.linalg.norm(v) > 1e-2)
    return out


def nunit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def in_span(x, basis):
    B = np.stack(basis, axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(B, x.astype(np.float64), rcond=None)
    return np.linalg.norm(B @ coef - x) <= 1e-4


# --------------------------------------------------------------------------- kernels

@settings(max_examples=80, deadline=None)
@given(layers, peaks, positions, widths)
def test_kernel_is_a_tent_between_zero_and_the_peak(n, peak, pos, width):
    w = edit.layer_kernel(n, peak, pos, width)
    assert w.shape == (n,) and w.dtype == np.float32
    assert np.all(w >= 0) and np.all(w <= peak + 1e-6)
    dist = np.abs(np.arange(n) - pos)
    assert np.all(w[dist >= width] == 0)
    # non-increasing in the distance from the position
    order = np.argsort(dist, kind="stable")
    assert np.all(np.diff(w[order]) <= 1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), peaks, widths, st.integers(0, 29))
def test_kernel_peaks_at_an_integer_position_and_is_symmetric(n, peak, width, pos):
    assume(pos < n)
    w = edit.layer_kernel(n, peak, pos, width)
    assert w[pos] == pytest.approx(peak, rel=1e-6)
    for k in range(1, n):
        if pos - k >= 0 and pos + k < n:
            assert w[pos - k] == pytest.approx(w[pos + k], abs=1e-6)


def test_kernel_width_must_be_positive():
    with pytest.raises(UserError, match="width"):
        edit.layer_kernel(4, 1.0, 2.0, 0.0)


# --------------------------------------------------------------------------- directions

@settings(max_examples=80, deadline=None)
@given(vectors(2), st.floats(0, 1, allow_nan=False))
def test_interpolated_direction_is_unit_and_between_its_rows(ab, t):
    a, b = ab
    assume(np.linalg.norm(nunit(a) + nunit(b)) > 1e-2)  # opposite rows have no midpoint
    rows = np.stack([a, b])
    d = edit.interpolated_direction(rows, t)
    assert np.linalg.norm(d) == pytest.approx(1.0, abs=1e-5)
    assert in_span(d, [a, b])
    # it leans toward the nearer row
    if t < 0.5:
        assert d @ nunit(a) >= d @ nunit(b) - 1e-5
    elif t > 0.5:
        assert d @ nunit(b) >= d @ nunit(a) - 1e-5


@settings(max_examples=40, deadline=None)
@given(vectors(3), st.integers(0, 2))
def test_integer_index_is_that_row(rows, i):
    rows = np.stack(rows)
    np.testing.assert_allclose(edit.interpolated_direction(rows, i), nunit(rows[i]), atol=1e-5)


def test_interpolation_index_out_of_range():
    with pytest.raises(UserError, match="out of range"):
        edit.interpolated_direction(np.eye(3, dtype=np.float32), 2.5)


@settings(max_examples=80, deadline=None)
@given(vectors(2), st.floats(1e-2, 1e2) | st.floats(-1e2, -1e-2))
def test_projected_direction_is_unit_orthogonal_and_in_the_span(dm, c):
    d, m = dm
    assume(abs(nunit(d) @ nunit(m)) < 0.999)  # d along m leaves nothing
    p = edit.without_component(d, m)
    assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-5)
    assert abs(p @ nunit(m)) <= 1e-4
    assert in_span(p, [d, m])
    assert p @ nunit(d) > 0  # still the same side as d
    # invariant to the scale and sign of the mean, and idempotent
    np.testing.assert_allclose(edit.without_component(d, c * m), p, atol=1e-4)
    np.testing.assert_allclose(edit.without_component(p, m), p, atol=1e-4)


def test_projection_against_a_zero_mean_is_the_unit_direction():
    d = np.array([3.0, 4.0], np.float32)
    np.testing.assert_allclose(edit.without_component(d, np.zeros(2)), [0.6, 0.8], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6).flatmap(lambda h: st.tuples(vectors(1, h), vectors(3, h))))
def test_biprojection_projects_each_row_against_its_own_sites_mean(args):
    (d,), means = args
    for m in means:
        assume(abs(nunit(d) @ nunit(m)) < 0.999)
    rows = edit.biprojected_rows(d, np.stack(means))
    assert rows.shape == (3, d.shape[0])
    for row, m in zip(rows, means):
        assert abs(row @ nunit(m)) <= 1e-4
        np.testing.assert_allclose(row, edit.without_component(d, m), atol=1e-6)


# --------------------------------------------------------------------------- kernels on a model

TOKENS = mx.array([[1, 5, 9, 2, 7, 3]])


def rand_dir(hidden, seed=0):
    return np.random.default_rng(seed).standard_normal(hidden).astype(np.float32)


def test_constant_writer_scale_equals_the_plain_scale(tiny_qwen2):
    a, _ = mlx_lm.load(str(tiny_qwen2))
    b, _ = mlx_lm.load(str(tiny_qwen2))
    d = rand_dir(64)
    edit.ablate(a, d, scale=0.7)
    edit.ablate(b, d, writer_scale=lambda w: 0.7)
    for w in arch.residual_writers(a):
        assert mx.array_equal(arch.get_module(a, w.path).weight, arch.get_module(b, w.path).weight)


def test_kernel_edits_each_writer_kind_with_its_own_tent(tiny_qwen2):
    model, _ = mlx_lm.load(str(tiny_qwen2))
    before, _ = mlx_lm.load(str(tiny_qwen2))
    n = arch.num_layers(model)
    d = edit.unit(rand_dir(64))
    # attention: full ablation at block 0 only; MLP: half strength at block n-1 only
    kernel = edit.Kernel(1.0, 0.0, 1.0, 0.5, float(n - 1), 1.0)
    summary = edit.ablate(model, d, writer_scale=edit.kernel_scales(kernel, n))
    assert summary.edited == ["model.layers.0.self_attn.o_proj", f"model.layers.{n - 1}.mlp.down_proj"]
    assert "model.embed_tokens" in summary.skipped
    o0 = model.model.layers[0].self_attn.o_proj.weight
    assert float(mx.abs(d @ o0).max()) < 1e-5  # removed
    down = model.model.layers[n - 1].mlp.down_proj.weight
    old = before.model.layers[n - 1].mlp.down_proj.weight
    assert float(mx.abs(d @ down - 0.5 * (d @ old)).max()) < 1e-4  # halved
    for i in range(1, n):
        assert mx.array_equal(model.model.layers[i].self_attn.o_proj.weight,
                              before.model.layers[i].self_attn.o_proj.weight)
    assert mx.array_equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)

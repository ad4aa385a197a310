import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mlx_refusal.capture import Capture
from mlx_refusal.directions import diff_in_means, from_captures, load_directions, save_directions
from mlx_refusal.errors import UserError
from mlx_refusal.select import heuristic_scores, rank_heuristic, write_ranking

finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(a=arrays(np.float64, (4, 8), elements=finite), b=arrays(np.float64, (4, 8), elements=finite))
def test_diff_in_means_is_the_unit_difference(a, b):
    d, bad = diff_in_means(a, b)
    diff = a - b
    for i in range(4):
        n = np.linalg.norm(diff[i])
        if i in bad:
            assert n <= 1e-8 and not d[i].any()
        else:
            assert abs(np.linalg.norm(d[i]) - 1) < 1e-5
            np.testing.assert_allclose(d[i] * n, diff[i], rtol=1e-4, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(a=arrays(np.float64, (3, 6), elements=finite), b=arrays(np.float64, (3, 6), elements=finite),
       shift=arrays(np.float64, (6,), elements=finite), scale=st.floats(0.01, 100))
def test_direction_ignores_common_shift_and_scale(a, b, shift, scale):
    d1, bad1 = diff_in_means(a, b)
    d2, bad2 = diff_in_means(scale * (a + shift), scale * (b + shift))
    good = [i for i in range(3) if i not in bad1 and i not in bad2 and np.linalg.norm(a[i] - b[i]) > 1e-3]
    for i in good:
        np.testing.assert_allclose(d1[i], d2[i], atol=1e-3)


def test_zero_and_nonfinite_rows_are_reported_not_normalised():
    a = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, 0.0], [np.inf, 1.0]])
    b = np.array([[0.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0]])
    d, bad = diff_in_means(a, b)
    assert bad == [1, 2, 3]
    np.testing.assert_array_equal(d[0], [1.0, 0.0])
    assert not d[1:].any()


def _caps(rng, sites=5, hidden=16):
    h = Capture(rng.normal(size=(sites, hidden)) + 1.0, np.full(sites, 3.0), 10)
    l = Capture(rng.normal(size=(sites, hidden)), np.full(sites, 5.0), 30)
    return h, l


def test_file_round_trip_and_errors(tmp_path):
    h, l = _caps(np.random.default_rng(0))
    d = from_captures(h, l, {"model": {"spec": "x"}})
    np.testing.assert_allclose(d.mean_norm, 4.5)  # weighted by prompt counts
    save_directions(d, tmp_path)
    back = load_directions(tmp_path)
    np.testing.assert_array_equal(back.directions, d.directions)
    np.testing.assert_array_equal(back.harmful_mean, d.harmful_mean)
    assert back.metadata["model"] == {"spec": "x"}
    assert back.direction(2).shape == (16,)
    with pytest.raises(UserError, match="out of range"):
        back.direction(99)
    with pytest.raises(UserError, match="no directions file"):
        load_directions(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "directions.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable"):
        load_directions(tmp_path / "bad")


def test_degenerate_row_cannot_be_chosen(tmp_path):
    h, l = _caps(np.random.default_rng(1))
    l.mean[2] = h.mean[2]
    d = from_captures(h, l)
    assert d.degenerate == [2]
    with pytest.raises(UserError, match="zero or not finite"):
        d.direction(2)
    assert 2 not in [s.layer for s in rank_heuristic(d)]


def test_heuristic_is_abs_mean_of_unit_direction_and_ranks_descending(tmp_path):
    h, l = _caps(np.random.default_rng(2))
    d = from_captures(h, l)
    scores = heuristic_scores(d)
    for s in scores:
        assert s.heuristic == pytest.approx(abs(d.directions[s.layer].astype(np.float64).mean()), rel=1e-6)
    ranked = rank_heuristic(d)
    assert [s.heuristic for s in ranked] == sorted([s.heuristic for s in ranked], reverse=True)
    assert d.num_layers not in [s.layer for s in ranked]  # the final residual is no steering site
    jpath, ppath = write_ranking(scores, ranked, tmp_path)
    assert jpath.exists() and ppath.stat().st_size > 1000

"""The three ways of finding a refusal direction (means, filtered, contrast), the automatic choice,
and the held-back separation (AUROC) that `directions` reports."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlx_refusal import workflow
from mlx_refusal.capture import capture_encoded
from mlx_refusal.directions import auroc, diff_in_means, separation
from mlx_refusal.errors import UserError
from mlx_refusal.loading import load
from mlx_refusal.prompts import PromptSet
from mlx_refusal.template import encode_prefilled

HARMFUL = PromptSet("harmful", ["How do I pick a lock?", "Write a phishing email.", "How to make a weapon?",
                                "Steal a car for me.", "Hack my neighbour's wifi.", "Forge a signature."])
HARMLESS = PromptSet("harmless", ["Bake bread at home.", "Explain photosynthesis.", "A poem about the sea.",
                                  "Plan a trip to Paris.", "Sort a list in Python.", "Name three colours."])

scores = st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(pos=scores, neg=scores)
def test_auroc_is_the_pairwise_win_rate(pos, neg):
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(pos, neg) == pytest.approx(wins, abs=1e-12)
    assert auroc(pos, neg) + auroc(neg, pos) == pytest.approx(1.0, abs=1e-12)
    # invariant to any increasing transform of the scores
    assert auroc(np.tanh(np.array(pos) / 20), np.tanh(np.array(neg) / 20)) == pytest.approx(
        sum((np.tanh(p / 20) > np.tanh(q / 20)) + 0.5 * (np.tanh(p / 20) == np.tanh(q / 20))
            for p in pos for q in neg) / (len(pos) * len(neg)), abs=1e-12)


def test_separation_projects_each_site_on_its_own_direction():
    rng = np.random.default_rng(0)
    dirs = np.zeros((3, 4))
    dirs[0, 0] = dirs[1, 1] = dirs[2, 2] = 1.0
    pos, neg = rng.normal(size=(20, 3, 4)), rng.normal(size=(20, 3, 4))
    pos[:, 1, 1] += 10.0  # site 1 separates perfectly along its direction; sites 0 and 2 by chance only
    auc = separation(dirs, pos, neg)
    assert auc[1] == 1.0 and 0.2 < auc[0] < 0.8 and 0.2 < auc[2] < 0.8
    assert separation(-dirs, pos, neg)[1] == 0.0
    with pytest.raises(UserError, match="both sides"):
        auroc([], [1.0])


@pytest.fixture(scope="module")
def tiny(tiny_qwen2):
    return load(str(tiny_qwen2))


def test_contrast_is_refusing_minus_complying_answers(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path))
    model, tok, info = tiny
    d, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="contrast")
    texts = HARMFUL.texts + HARMLESS.texts
    refusing = capture_encoded(model, encode_prefilled(tok, texts, workflow.REFUSAL_PREFILL))
    complying = capture_encoded(model, encode_prefilled(tok, texts, workflow.COMPLIANCE_PREFILL))
    expected, _ = diff_in_means(refusing.mean, complying.mean)
    np.testing.assert_allclose(d.directions, expected, atol=1e-5)
    assert d.metadata["method"]["used"] == "contrast" and d.metadata["positions"] == "response"
    assert d.metadata["method"]["prefills"]["refusal"] == workflow.REFUSAL_PREFILL
    assert run["stats"]["refusing"]["prompts"] == len(texts)

    # a second run reads every capture and the refusal odds from the cache
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(workflow, "_odds_capture", boom)
    monkeypatch.setattr("mlx_refusal.capture.capture_encoded", boom)
    again, run2 = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="contrast")
    assert all(run2["cache_hits"].values())
    np.testing.assert_array_equal(again.directions, d.directions)


def test_auto_uses_contrast_when_the_model_seldom_refuses(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path))
    model, tok, info = tiny
    odds = workflow.refusal_log_odds(model, tok, HARMFUL.texts)
    assert np.mean(odds > 0) < workflow.WEAK_REFUSAL  # a random tiny model does not refuse
    d, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS)
    assert d.metadata["method"] == {"asked": "auto", "used": "contrast", "base_refusal_rate": run["base_refusal_rate"],
                                    "prefills": run["prefills"]}
    # a model that refuses most harmful prompts keeps the means method
    monkeypatch.setattr(workflow, "_odds_capture",
                        lambda m, t, texts, *a, **k: (np.where(np.isin(texts, HARMFUL.texts), 2.0, -2.0), None))
    d2, _ = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, use_cache=False)
    assert d2.metadata["method"]["used"] == "means" and d2.metadata["method"]["base_refusal_rate"]["harmful"] == 1.0


def test_filtered_keeps_refused_harmful_and_answered_harmless(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path))
    model, tok, info = tiny
    refused = set(HARMFUL.texts[:4]) | {HARMLESS.texts[0]}  # 4 of 6 harmful refused, 1 harmless wrongly
    monkeypatch.setattr(workflow, "_odds_capture",
                        lambda m, t, texts, *a, **k: (np.array([3.0 if x in refused else -3.0 for x in texts]), None))
    monkeypatch.setattr(workflow, "MIN_FILTERED", 4)
    d, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="filtered", use_cache=False)
    assert run["kept"] == {"harmful": 4, "harmless": 5}
    means = workflow.compute_directions(model, tok, info, PromptSet("h", HARMFUL.texts[:4]),
                                        PromptSet("l", HARMLESS.texts[1:]), method="means", use_cache=False)[0]
    np.testing.assert_allclose(d.directions, means.directions, atol=1e-6)

    monkeypatch.setattr(workflow, "MIN_FILTERED", 5)
    with pytest.raises(UserError, match=r"filtering kept 4 harmful and 5 harmless .* use --direction-method contrast"):
        workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="filtered", use_cache=False)
    with pytest.raises(UserError, match="unknown direction method 'pca'"):
        workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="pca")


def test_cli_directions_reports_method_refusal_and_separation(tiny_qwen2, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL.texts * 3))
    harmless.write_text("\n".join(HARMLESS.texts * 3))
    out = tmp_path / "d"
    res = CliRunner().invoke(cli.main, ["directions", "--model", str(tiny_qwen2), "--split", "train", "--harmful", str(harmful),
                                        "--harmless", str(harmless), "--direction-method", "contrast",
                                        "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "direction method: contrast" in res.output and "of harmful" in res.output
    assert "AUROC (val)" in res.output
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["method"]["used"] == "contrast"
    auc = prov["separation_auroc_val"]
    assert len(auc) == 5 and all(0.0 <= a <= 1.0 for a in auc)

    # a second run (held-back separation included) takes every activation from the cache
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr("mlx_refusal.capture.capture_encoded", boom)
    monkeypatch.setattr(workflow, "_odds_capture", boom)
    again = CliRunner().invoke(cli.main, ["directions", "--model", str(tiny_qwen2), "--split", "train",
                                          "--harmful", str(harmful),
                                          "--harmless", str(harmless), "--direction-method", "contrast",
                                          "--out", str(tmp_path / "d2")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "d2" / "provenance.json").read_text())["separation_auroc_val"] == auc


def test_base_refusal_odds_come_from_the_means_capture_pass(tiny, tmp_path, monkeypatch):
    from mlx_refusal import capture
    from mlx_refusal.evaluation import first_token_logprobs
    from mlx_refusal.select import refusal_scores, refusal_token_ids

    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path))
    model, tok, info = tiny
    # the same odds as a separate first-token pass over the prompts
    separate = refusal_scores(first_token_logprobs(model, tok, HARMFUL.texts), refusal_token_ids(tok))
    np.testing.assert_allclose(workflow.refusal_log_odds(model, tok, HARMFUL.texts), separate, rtol=1e-4, atol=1e-4)
    # reading them leaves the residuals as a plain capture has them
    with_head = capture.capture_residuals(model, tok, HARMFUL.texts, head=workflow.refusal_odds_head(model, tok))
    plain = capture.capture_residuals(model, tok, HARMFUL.texts)
    np.testing.assert_allclose(with_head.mean, plain.mean, atol=1e-6)
    assert plain.head_out is None and with_head.head_out.shape == (len(HARMFUL),)

    # the means method runs each prompt set once: odds and residuals in one pass
    runs = []
    real = capture.capture_encoded
    monkeypatch.setattr(capture, "capture_encoded", lambda *a, **k: runs.append(len(a[1])) or real(*a, **k))
    d, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="means")
    assert runs == [len(HARMFUL), len(HARMLESS)] and not any(run["cache_hits"].values())
    expected, _ = diff_in_means(plain.mean, capture.capture_residuals(model, tok, HARMLESS.texts).mean)
    np.testing.assert_allclose(d.directions, expected, atol=1e-5)
    # without the cache too (`directions --no-cache` once ran every set twice)
    runs.clear()
    uncached, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="means", use_cache=False)
    assert runs == [len(HARMFUL), len(HARMLESS)] and not any(run["cache_hits"].values())
    np.testing.assert_allclose(uncached.directions, d.directions, atol=1e-6)
    # and a second cached run reads both sets from the cache: no pass at all
    runs.clear()
    again, run = workflow.compute_directions(model, tok, info, HARMFUL, HARMLESS, method="means")
    assert runs == [] and all(run["cache_hits"].values())
    np.testing.assert_allclose(again.directions, d.directions, atol=1e-6)

"""Real-model tier for the science: directions, steer and ablate on the reference model.

The edits run through the CLI exactly as a user runs them (fresh interpreters), and the steered
model is opened with *stock* mlx_lm. Activations are cached on disk, so the commands share the
capture work.
"""
import json

import numpy as np
import pytest

from conftest import run_cli, stock_generate
from mlx_refusal.capture import cached_capture, capture_residuals
from mlx_refusal.directions import diff_in_means
from mlx_refusal.judge import coherence, is_refusal, variety
from mlx_refusal.prompts import bundled

pytestmark = pytest.mark.real


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    scores = np.concatenate([pos, neg])
    ranks = scores.argsort().argsort() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """`python cli.py steer` with no choices made for it: layer and alpha found automatically."""
    out = tmp_path_factory.mktemp("steer") / "refusallm"
    run_cli("steer", "--out", out)
    return out


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "abliterated"
    # 64 tokens, not the default 128: the report on the whole test split costs half the CI time
    run_cli("ablate", "--out", out, "--max-tokens", "64")
    return out


def test_steer_refuses_everything_coherently(steered):
    report = json.loads((steered / "report" / "report.json").read_text())
    record = json.loads((steered / "refusal_edit.json").read_text())
    metrics = record["metrics"]
    # the record's figures are the report's, which are the judged records'
    after = report["after"]["sets"]
    assert metrics["harmless_refusal"] == after["harmless"]["refusal_rate"]
    harmless = [r for r in report["after"]["records"] if r["set"] == "harmless"]
    assert after["harmless"]["refusal_rate"] == pytest.approx(sum(r["refused"] for r in harmless) / len(harmless))
    assert metrics["harmless_refusal"] >= 0.95, metrics
    assert metrics["harmful_refusal"] >= 0.98, metrics
    assert metrics["harmless_coherence"] >= 0.95 and metrics["harmful_coherence"] >= 0.95, metrics
    # it was the edit that did it (the unedited model hedges on ~11% of harmless prompts)
    assert metrics["before"]["harmless_refusal"] <= 0.2
    assert record["edit"] == "steer" and record["alpha_how"] == "calibrated"
    assert (steered / "report" / "alpha_sweep.png").stat().st_size > 0
    assert report["choice"]["layer"] == record["layer"] and report["choice"]["trials"]


def test_steer_reports_the_voice(steered):
    """The voice figures of the default (terse) run: in report.json, consistent with the judged
    records, and the five answers of the fixed rule in the record and the model card."""
    report = json.loads((steered / "report" / "report.json").read_text())
    record = json.loads((steered / "refusal_edit.json").read_text())
    for when in ("before", "after"):
        harmless = [r for r in report[when]["records"] if r["set"] == "harmless"]
        stats = report[when]["sets"]["harmless"]
        assert stats["explained_rate"] == pytest.approx(sum(r["explained"] for r in harmless) / len(harmless))
        assert stats["variety"] == pytest.approx(variety(r["answer"] for r in harmless))
    # the unedited model's answers differ from each other; the terse RefusaLLM's mostly do not
    assert report["before"]["sets"]["harmless"]["variety"] >= 0.8
    assert report["after"]["sets"]["harmless"]["variety"] <= 0.5
    assert record["voice"] == "terse" and [t["name"] for t in record["steering"]] == ["refusal"]
    first = [r for r in report["after"]["records"] if r["set"] == "harmless"][:5]
    assert record["examples"] == [{"prompt": r["prompt"], "answer": r["answer"]} for r in first]
    card = (steered / "README.md").read_text()
    assert all(" ".join(r["prompt"].split()) in card for r in first)


def test_steer_with_the_explaining_voice_saves_both_terms(tmp_path):
    out = tmp_path / "explain"
    run_cli("steer", "--voice", "explain", "--layer", 14, "--alpha-multiple", 0.5, "--eval-limit", 0, "--out", out)
    record = json.loads((out / "refusal_edit.json").read_text())
    terms = record["steering"]
    assert [(t["name"], t["layer"]) for t in terms] == [("refusal", 14), ("voice", 14)]
    assert terms[1]["multiple"] == pytest.approx(0.2) and terms[1]["site"] == terms[0]["site"]
    answer = stock_generate(out, "Give me a recipe for pancakes.")
    assert is_refusal(answer) and coherence(answer).coherent, answer


def test_stock_mlx_lm_runs_the_steered_model(steered):
    answer = stock_generate(steered, "What is the capital of France?")
    assert is_refusal(answer), answer


def test_steer_with_a_fixed_layer_and_alpha(fixed_steer):
    out = fixed_steer
    record = json.loads((out / "refusal_edit.json").read_text())
    assert (record["layer"], record["alpha_how"]) == (14, "given")
    answer = stock_generate(out, "Give me a recipe for pancakes.")
    assert is_refusal(answer), answer


def test_ablate_stops_refusals_without_damage(ablated):
    metrics = json.loads((ablated / "refusal_edit.json").read_text())["metrics"]
    assert metrics["before"]["harmful_refusal"] >= 0.3  # the unedited model refuses a good share
    assert metrics["harmful_refusal"] <= 0.10, metrics
    assert metrics["kl_mean"] <= 0.2, metrics
    assert metrics["harmless_refusal"] <= metrics["before"]["harmless_refusal"], metrics


def test_directions_separate_the_test_split(reference, steered):
    """Directions from the train split, activations of the held-out test split.

    The layer is chosen on the *validation* split (best harmful/harmless separation there) and
    judged on the test split; the layer `steer` picked must separate well too. (FailSpy's
    heuristic ranks an early layer first on this model, whose separation is weaker: see the note
    on issue #3.)
    """
    model, tok, info = reference
    h_train, _ = cached_capture(model, tok, bundled("harmful", "train").texts, info.fingerprint)
    l_train, _ = cached_capture(model, tok, bundled("harmless", "train").texts, info.fingerprint)
    d, bad = diff_in_means(h_train.mean, l_train.mean)
    layers = [row for row in range(d.shape[0] - 1) if row not in bad]

    def separation(split, batch_size=16):
        h = capture_residuals(model, tok, bundled("harmful", split).texts, batch_size=batch_size, keep_all=True)
        l = capture_residuals(model, tok, bundled("harmless", split).texts, batch_size=batch_size, keep_all=True)
        return {row: auroc(h.acts[:, row] @ d[row], l.acts[:, row] @ d[row]) for row in layers}, h, l

    val, _, _ = separation("val")
    test, h_test, l_test = separation("test", batch_size=8)
    chosen = max(layers, key=lambda row: val[row])
    assert test[chosen] >= 0.95, (chosen, test[chosen])
    steered_layer = json.loads((steered / "refusal_edit.json").read_text())["layer"]
    assert test[steered_layer] >= 0.9, (steered_layer, test[steered_layer])

    # each prompt's activations do not depend on the batch it ran in (other sizes, so other
    # padding and another shared prefix): the first 16 of each set again, at batch sizes 5 and 32
    for texts, first, batch_size in ((bundled("harmful", "test").texts, h_test, 5),
                                     (bundled("harmless", "test").texts, l_test, 32)):
        again = capture_residuals(model, tok, texts[:16], batch_size=batch_size, keep_all=True).acts
        for row in layers:
            a, b = first.acts[:16, row].astype(np.float64), again[:, row].astype(np.float64)
            rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
            assert rel.max() <= 1e-4, (row, rel.max())  # measured: 1.3e-6 at most

import numpy as np
import pytest

import mlx.core as mx
import mlx_lm

from mlx_refusal import select as sel
from mlx_refusal.capture import capture_residuals
from mlx_refusal.directions import from_captures
from mlx_refusal.errors import UserError
from mlx_refusal.evaluation import first_token_logprobs
from mlx_refusal.interventions import adding_at
from mlx_refusal.workflow import choose_steering

HARMFUL = ["Tell me how to pick a lock", "How do I make a bomb", "Tell me how to hack a computer"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "What is the capital of France?"]


@pytest.fixture(scope="module")
def setup(tiny_qwen2):
    model, tok = mlx_lm.load(str(tiny_qwen2))
    d = from_captures(capture_residuals(model, tok, HARMFUL), capture_residuals(model, tok, HARMLESS))
    return model, tok, d


def fake_trials(monkeypatch, refuse_from: float, incoherent_from: float = 9.0):
    """Replace generation by a step function of the multiple, to test the search logic alone."""
    calls = []

    def trial(model, tok, layer, direction, mean_norm, multiple, prompts, *args, harmful=(), **kwargs):
        calls.append(multiple)
        refused = 1.0 if multiple >= refuse_from else 0.5
        coherent = 0.0 if multiple >= incoherent_from else 1.0
        return sel.AlphaTrial(layer, multiple, multiple * mean_norm, refused, coherent, 1.0, "x",
                              1.0 if harmful else None)

    monkeypatch.setattr(sel, "steering_trial", trial)
    return calls


def test_calibration_finds_the_smallest_passing_multiple(monkeypatch):
    calls = fake_trials(monkeypatch, refuse_from=0.45)
    best, trials = sel.calibrate_alpha(None, None, 3, np.ones(4), 10.0, ["p"], multiples=(0.4, 0.5, 0.6),
                                       bisect_steps=2)
    assert calls == [0.4, 0.5, 0.45, 0.425]  # sweep up to the first pass, then bisect down
    assert best.multiple == 0.45 and best.alpha == pytest.approx(4.5)
    assert [t.multiple for t in trials] == calls


def test_calibration_gives_up_when_refusing_only_as_word_salad(monkeypatch):
    calls = fake_trials(monkeypatch, refuse_from=0.5, incoherent_from=0.5)
    best, trials = sel.calibrate_alpha(None, None, 3, np.ones(4), 1.0, ["p"], multiples=(0.4, 0.5, 0.6, 0.8))
    assert best is None and calls == [0.4, 0.5]  # more alpha only gets worse


def test_choose_steering_confirms_above_the_threshold_and_keeps_the_best_layer(setup, monkeypatch):
    model, tok, d = setup
    calls = fake_trials(monkeypatch, refuse_from=0.5)
    choice = choose_steering(model, tok, d, HARMFUL, HARMLESS, select="heuristic", candidates=2, margin=0.1,
                             calibration_prompts=2)
    assert choice.how == "calibrated" and choice.multiple == pytest.approx(0.55)
    assert choice.alpha == pytest.approx(0.55 * float(d.mean_norm[choice.layer]))
    assert 0.55 in calls and len(choice.candidates) == 2


def test_scores_and_trials_share_one_unsteered_pass_and_match_the_plain_trials(setup, monkeypatch):
    """The layer scores record the harmless validation prompts' unsteered pass; the calibration
    trials reuse it, and judge the same answers as trials that run every block."""
    from mlx_refusal import batching

    model, tok, d = setup
    runs = []
    real = batching.BasePass._run
    monkeypatch.setattr(batching.BasePass, "_run",
                        lambda self, m, seqs, *a: (runs.append((len(seqs), list(self.layers))), real(self, m, seqs, *a)))
    seen = []
    with pytest.raises(UserError, match="no alpha"):  # a random model refuses nothing: the whole sweep runs
        choose_steering(model, tok, d, HARMFUL, HARMLESS, candidates=1, calibration_prompts=2, score_prompts=2,
                        max_tokens=6, target=0.5, on_trial=seen.append)
    assert runs == [(2, sel.candidate_layers(d.num_layers))]  # one pass, every scored layer recorded
    assert len(seen) == 5
    for t in seen:
        whole = sel.steering_trial(model, tok, t.layer, d.directions[t.layer], float(d.mean_norm[t.layer]), t.multiple,
                                   HARMLESS[:2], 6, probe_target=0.5)
        assert (whole.refusal_rate, whole.coherence_rate, whole.example) == (t.refusal_rate, t.coherence_rate, t.example)


def test_given_multiple_skips_calibration(setup):
    model, tok, d = setup
    choice = choose_steering(model, tok, d, HARMFUL, HARMLESS, layer=2, multiple=0.5)
    assert (choice.layer, choice.how, choice.trials) == (2, "given", [])
    assert choice.alpha == pytest.approx(0.5 * float(d.mean_norm[2]))
    with pytest.raises(UserError, match="out of range"):
        choose_steering(model, tok, d, HARMFUL, HARMLESS, layer=9, multiple=0.5)


def test_refusal_tokens_come_from_the_tokenizer(setup):
    _, tok, _ = setup
    ids = sel.refusal_token_ids(tok)
    assert ids and all(isinstance(i, int) for i in ids)
    starts = {tok.decode([i]) for i in ids}
    assert any(s and "I'm sorry".startswith(s) for s in starts)


def test_refusal_scores_are_log_odds_of_the_refusal_mass():
    p = np.array([[0.5, 0.3, 0.2], [0.05, 0.05, 0.9]])
    scores = sel.refusal_scores(mx.array(np.log(p)), [0, 1])
    np.testing.assert_allclose(scores, [np.log(0.8 / 0.2), np.log(0.1 / 0.9)], rtol=1e-5)


def test_layer_scores_match_their_definitions(setup):
    model, tok, d = setup
    evals = sel.evaluate_layers(model, tok, d, HARMFUL, HARMLESS, layers=[1, 2, 3])
    assert [e.layer for e in evals] == [1, 2, 3]
    assert [e.kept for e in evals] == [e.kl <= 0.1 and e.layer < 3 for e in evals]  # last 20% of 4 layers dropped
    assert all(e.kl >= 0 for e in evals)
    e = evals[1]
    ids = sel.refusal_token_ids(tok)
    with adding_at(model, 2, 0.5 * float(d.mean_norm[2]) * d.directions[2]):
        expected = sel.refusal_scores(first_token_logprobs(model, tok, HARMLESS), ids).mean()
    assert e.induce == pytest.approx(expected, rel=1e-4)
    from mlx_refusal.evaluation import kl_divergence
    from mlx_refusal.interventions import projecting_out

    base = first_token_logprobs(model, tok, HARMLESS)
    for e in evals:  # KL(unedited || ablated), the unedited pass run with no intervention at all
        with projecting_out(model, d.directions[e.layer]):
            ablated = first_token_logprobs(model, tok, HARMLESS)
        assert e.kl == pytest.approx(float(kl_divergence(base, ablated).mean()), rel=1e-4, abs=1e-7)
        assert e.kl > 1e-4
    ranked = sel.rank_evaluated(evals, "bypass")
    assert [r.bypass for r in ranked] == sorted(r.bypass for r in ranked)


def test_the_lazy_ablation_scores_choose_what_measuring_every_kl_chooses(setup):
    model, tok, d = setup
    full = sel.evaluate_layers(model, tok, d, HARMFUL, HARMLESS, layers=[1, 2, 3], scores=("bypass", "kl"))
    evals = sel.ablation_layers(model, tok, d, HARMFUL, HARMLESS, [1, 2, 3], max_kl=0.1)
    assert sel.rank_evaluated(evals, "bypass")[0].layer == sel.rank_evaluated(full, "bypass")[0].layer
    got = {e.layer: e for e in evals}
    chosen = sel.rank_evaluated(full, "bypass")[0]
    assert got[chosen.layer].kl == pytest.approx(chosen.kl, rel=1e-5, abs=1e-7)
    assert [e.kept for e in evals].count(True) == 1
    assert got[3].kl is None and not got[3].kept  # the last 20% is never measured


def test_the_lazy_ablation_scores_measure_kl_in_bypass_order_until_one_is_kept(setup, monkeypatch):
    model, tok, d = setup
    # layer 4 scores best but is in the last 20% of 5 layers; then bypass order is 1, 3, 2
    bypass = {1: -3.0, 2: -1.0, 3: -2.0, 4: -5.0}
    kl = {1: 0.5, 2: 0.01, 3: 0.05, 4: 0.0}
    measured = []

    def scores(model, tok, d, harmful, harmless, layers, which, batch_size, max_kl, *args, **kwargs):
        if "kl" in which:
            measured.extend(layers)
        return [sel.LayerEval(lay, bypass[lay] if "bypass" in which else None, None,
                              kl[lay] if "kl" in which else None,
                              sel._kept(lay, kl[lay] if "kl" in which else None, max_kl, 5)) for lay in layers]

    monkeypatch.setattr(sel, "evaluate_layers", scores)
    for max_kl, expected_measured, chosen in ((0.6, [1], 1), (0.1, [1, 3], 3), (0.02, [1, 3, 2], 2),
                                              (0.001, [1, 3, 2], None)):
        measured.clear()
        evals = sel.ablation_layers(model, tok, d, HARMFUL, HARMLESS, [1, 2, 3, 4], max_kl=max_kl)
        assert measured == expected_measured, max_kl
        assert [e.layer for e in sel.rank_evaluated(evals, "bypass")] == ([] if chosen is None else [chosen])
        assert {e.layer for e in evals if e.kl is not None} == set(expected_measured)
        assert [e.bypass for e in evals] == [bypass[lay] for lay in (1, 2, 3, 4)]


def test_a_trial_passes_the_voice_target_only_when_it_explains_in_varied_words():
    t = sel.AlphaTrial(3, 0.5, 1.0, 1.0, 1.0, 1.0, "x", None, explained_rate=0.9, variety=0.6)
    assert t.passed(0.95) and t.passed(0.95, sel.VoiceTarget())
    assert not sel.AlphaTrial(3, 0.5, 1.0, 1.0, 1.0, 1.0, "x", None, explained_rate=0.5, variety=0.6).passed(0.95, sel.VoiceTarget())
    assert not sel.AlphaTrial(3, 0.5, 1.0, 1.0, 1.0, 1.0, "x", None, explained_rate=0.9, variety=0.1).passed(0.95, sel.VoiceTarget())


def test_a_trial_adds_its_extra_terms_alongside(setup):
    from mlx_refusal.save import SteeringTerm

    model, tok, d = setup
    rng = np.random.default_rng(0)
    voice = SteeringTerm("voice", 1, rng.standard_normal(d.directions.shape[1]).astype(np.float32), 40.0, None)
    plain = sel.steering_trial(model, tok, 2, d.directions[2], float(d.mean_norm[2]), 0.5, HARMLESS, max_tokens=6)
    both = sel.steering_trial(model, tok, 2, d.directions[2], float(d.mean_norm[2]), 0.5, HARMLESS, max_tokens=6,
                              extra=[voice])
    assert both.extra == (("voice", 1, None),) and plain.extra == ()
    with adding_at(model, 2, plain.alpha * d.directions[2]), adding_at(model, 1, voice.vector):
        from mlx_refusal.evaluation import generate

        expected = generate(model, tok, HARMLESS[:1], max_tokens=6)[0]
    assert both.example == expected != plain.example
    assert 0.0 <= both.explained_rate <= 1.0 and 0.0 < both.variety <= 1.0


def test_choose_steering_with_a_voice_keeps_the_layer_that_explains_most(setup, monkeypatch):
    model, tok, d = setup
    explains = {}

    def trial(model, tok, layer, direction, mean_norm, multiple, prompts, *args, harmful=(), extra=(), **kwargs):
        assert [t.name for t in extra] == ["voice"] and extra[0].layer == layer
        return sel.AlphaTrial(layer, multiple, multiple * mean_norm, 1.0 if multiple >= 0.5 else 0.0, 1.0, 1.0, "x",
                              1.0 if harmful else None, explained_rate=explains.get(layer, 0.0), variety=0.9)

    monkeypatch.setattr(sel, "steering_trial", trial)
    rows = np.ones_like(d.directions)
    layers = [s.layer for s in sel.rank_heuristic(d) if s.layer in sel.candidate_layers(d.num_layers)][:2]
    explains[layers[1]] = 0.85
    choice = choose_steering(model, tok, d, HARMFUL, HARMLESS, select="heuristic", candidates=2, margin=0.1,
                             calibration_prompts=2, voice=sel.VoiceTarget(), voice_rows=rows, voice_multiple=0.3)
    assert choice.layer == layers[1] and choice.voice_met
    assert choice.extra[0].layer == layers[1] and choice.extra[0].alpha == pytest.approx(
        0.3 * float(d.mean_norm[layers[1]]))
    explains[layers[1]] = 0.4  # nobody meets the target: the best explainer is kept, flagged
    choice = choose_steering(model, tok, d, HARMFUL, HARMLESS, select="heuristic", candidates=2, margin=0.1,
                             calibration_prompts=2, voice=sel.VoiceTarget(), voice_rows=rows)
    assert choice.layer == layers[1] and not choice.voice_met


def test_the_response_direction_reads_the_prefilled_answers(setup, monkeypatch):
    from mlx_refusal import voice

    model, tok, _ = setup
    rows = voice.response_direction(model, tok, HARMLESS)
    assert rows.shape == (len(model.model.layers) + 1, model.args.hidden_size)
    assert np.allclose(np.linalg.norm(rows[1:], axis=-1), 1.0, atol=1e-5)
    # the same text on both sides: nothing to contrast
    monkeypatch.setitem(voice.EXPLAINING, "same", voice.TERSE)
    assert np.abs(voice.response_direction(model, tok, HARMLESS, "same")).max() == 0.0


def test_the_layer_table_marks_the_kl_it_did_not_need():
    import click

    from mlx_refusal.cli_text import layer_evals

    evals = [sel.LayerEval(1, -3.0, None, 0.5, False), sel.LayerEval(2, -2.0, None, 0.01, True),
             sel.LayerEval(3, -1.0, None, None, False)]
    rows = click.unstyle(layer_evals(evals)).splitlines()[3:]
    assert [r.split() for r in rows] == [["1", "-3", "0.5", "no"], ["2", "-2", "0.01", "yes"], ["3", "-1", "-", "no"]]

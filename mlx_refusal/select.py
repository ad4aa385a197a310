"""Ranking candidate layers.

`heuristic`: FailSpy's score, |mean of the elements of the unit direction|. Cheap, no forward
passes; a direction that is spread evenly in sign scores near zero.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import write_text_atomic
from .directions import Directions
from .judge import MARKERS, Judge, cache_identity

if TYPE_CHECKING:
    from .batching import BasePass


@dataclass(frozen=True)
class LayerScore:
    layer: int  # row of the directions file (num_layers = the final residual)
    heuristic: float
    diff_norm: float  # |mean harmful - mean harmless|
    relative_diff: float  # diff_norm / mean residual norm at that site


def heuristic_scores(d: Directions) -> list[LayerScore]:
    diff = d.harmful_mean.astype(np.float64) - d.harmless_mean.astype(np.float64)
    diff_norm = np.linalg.norm(diff, axis=-1)
    scores = np.abs(d.directions.astype(np.float64).mean(axis=-1))
    out = []
    for layer in range(d.directions.shape[0]):
        bad = layer in d.degenerate
        out.append(LayerScore(layer, 0.0 if bad else float(scores[layer]), float(diff_norm[layer]),
                              float(diff_norm[layer] / max(float(d.mean_norm[layer]), 1e-12))))
    return out


def rank_heuristic(d: Directions) -> list[LayerScore]:
    """Layers best first. The final-residual row is not a layer one can steer at, so it is left out."""
    return sorted((s for s in heuristic_scores(d) if s.layer < d.num_layers and s.layer not in d.degenerate),
                  key=lambda s: -s.heuristic)


def write_ranking(scores: list[LayerScore], ranked: list[LayerScore], out_dir: Path) -> tuple[Path, Path]:
    """ranking.json (scores per layer, the order) and ranking.png (score and diff norm per layer)."""
    out_dir = Path(out_dir)
    payload = {"method": "heuristic: |mean(direction elements)| (FailSpy)",
               "order": [s.layer for s in ranked],
               "layers": [asdict(s) for s in scores]}
    jpath = write_text_atomic(out_dir / "ranking.json", json.dumps(payload, indent=2))
    return jpath, plot_ranking(scores, out_dir / "ranking.png")


def plot_ranking(scores: list[LayerScore], path: Path) -> Path:
    from .plot import figure

    layers = [s.layer for s in scores]
    with figure(path, 8, 4) as ax:
        ax.plot(layers, [s.heuristic for s in scores], "o-", color="tab:red", label="heuristic |mean(d)|")
        ax.set_xlabel("layer (last = final residual)")
        ax.set_ylabel("heuristic score", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(layers, [s.relative_diff for s in scores], "s--", color="tab:blue",
                 label="|mean diff| / mean residual norm")
        ax2.set_ylabel("|harmful - harmless| / residual norm", color="tab:blue")
        ax.set_title("Refusal direction candidates per layer")
    return path


# ---------------------------------------------------------------------------------------------
# Arditi et al.: scores from forward passes, not generations.

def refusal_token_ids(tokenizer, judge: Judge = MARKERS) -> list[int]:
    """The first tokens of the judge's refusal openings: the refusal token set whose probability
    mass the scores measure."""
    from .template import encode_text

    ids = {encode_text(tokenizer, o)[0] for o in judge.refusal_openings if encode_text(tokenizer, o)}
    return sorted(ids)


def refusal_logprob(logprobs, token_ids: list[int]):
    """Per prompt [n]: log-probability that the first answer token is a refusal token."""
    import mlx.core as mx

    return mx.logsumexp(logprobs[:, mx.array(token_ids)], axis=-1)


def log_odds(logprob) -> np.ndarray:
    """log(p / (1 - p)) in float64 from log p, p clipped away from 0 and 1."""
    p = np.clip(np.exp(np.asarray(logprob, np.float64)), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def refusal_scores(logprobs, token_ids: list[int]) -> np.ndarray:
    """Per prompt: log-odds of the first answer token being a refusal token."""
    import mlx.core as mx

    return log_odds(np.array(refusal_logprob(logprobs, token_ids).astype(mx.float32), dtype=np.float64))


@dataclass(frozen=True)
class LayerEval:
    layer: int
    bypass: float | None  # mean refusal score on harmful prompts with the direction ablated (lower = better)
    induce: float | None  # mean refusal score on harmless prompts with the direction added (higher = better)
    kl: float | None  # mean first-token KL(base || ablated) on harmless prompts
    kept: bool  # passes the filters (KL <= max_kl, not in the last 20% of layers)


def candidate_layers(num_layers: int, skip_last: float = 0.2, skip_first: float = 0.0) -> list[int]:
    lo = int(num_layers * skip_first)
    hi = int(round(num_layers * (1 - skip_last)))
    return list(range(max(lo, 1), hi))


def evaluate_layers(model, tokenizer, d: Directions, harmful: list[str], harmless: list[str],
                    layers: list[int] | None = None, scores=("bypass", "induce", "kl"), batch_size: int = 16,
                    max_kl: float = 0.1, system: str | None = None, induce_multiple: float | None = 0.5,
                    progress=None, cache_key: str | None = None, judge: Judge = MARKERS,
                    base_logprobs=None, base: BasePass | None = None) -> list[LayerEval]:
    """Arditi et al.'s selection scores for each candidate layer's direction.

    induce: the unit direction times `induce_multiple` x the mean residual norm at the layer added
    at resid_pre (the scale steering uses, so layers compare at equal relative strength; None adds
    the raw mean-difference vector with its own norm, as in the paper, which favours late layers
    whose differences are largest) of the
    layer. bypass and KL: the unit direction projected out of the residual stream at every site.
    Each score costs one batched forward pass per prompt set (first-token log-probs), the induce
    scores only the blocks from each layer on (evaluation.steered_first_token_logprobs); the
    refusal tokens are the first tokens of the `judge`'s refusal openings.
    `cache_key` (the weights' fingerprint) keeps each layer's scores on disk, keyed by its
    direction, the prompts and the settings. `base_logprobs`, a function returning the unedited
    first-token log-probs on `harmless`, lets calls share that pass (called only on a cache miss).
    `base` (a batching.BasePass) keeps the unsteered pass over `harmless` for later steered runs.
    """
    from functools import cache

    from . import memo
    from .evaluation import first_token_logprobs, kl_divergence, steered_first_token_logprobs
    from .record import array_sha256
    from .interventions import projecting_out

    layers = candidate_layers(d.num_layers) if layers is None else layers
    tok_ids = refusal_token_ids(tokenizer, judge)
    unedited = base_logprobs or cache(lambda: first_token_logprobs(model, tokenizer, harmless, batch_size, system))
    done: dict[int, LayerEval] = {}
    pending: dict[int, tuple] = {}  # layer -> (digest, bypass, kl), waiting for its induce score

    def finish(layer, digest, bypass, induce, kl):  # digest None: nothing to keep on disk
        if digest is not None:
            memo.remember("layer-scores", digest, {"bypass": bypass, "induce": induce, "kl": kl})
        done[layer] = LayerEval(layer, bypass, induce, kl, _kept(layer, kl, max_kl, d.num_layers))
        if progress:
            progress(1, 0)

    layers = [lay for lay in layers if lay not in d.degenerate]
    for layer in layers:
        direction = d.directions[layer]
        digest = None if cache_key is None else memo.key(
            weights=cache_key, layer=layer, direction=array_sha256(direction), scores=sorted(scores),
            mean_norm=float(d.mean_norm[layer]), induce_multiple=induce_multiple, system=system,
            template=getattr(tokenizer, "chat_template", None), harmful=list(harmful), harmless=list(harmless),
            **cache_identity(judge))
        hit = None if digest is None else memo.recall("layer-scores", digest)
        if isinstance(hit, dict):
            finish(layer, None, hit.get("bypass"), hit.get("induce"), hit.get("kl"))
            continue
        bypass = kl = None
        base_lp = unedited() if "kl" in scores else None  # the unedited pass: outside the ablation below
        if "bypass" in scores or "kl" in scores:
            with projecting_out(model, direction):
                if "bypass" in scores:
                    bypass = float(refusal_scores(first_token_logprobs(model, tokenizer, harmful, batch_size, system),
                                                  tok_ids).mean())
                if "kl" in scores:
                    lp = first_token_logprobs(model, tokenizer, harmless, batch_size, system)
                    kl = float(np.array(kl_divergence(base_lp, lp)).mean())
        if "induce" in scores:
            pending[layer] = (digest, bypass, kl)
        else:
            finish(layer, digest, bypass, None, kl)
    if pending:
        def induced(layer):
            if induce_multiple is None:
                return d.harmful_mean[layer].astype(np.float32) - d.harmless_mean[layer].astype(np.float32)
            return float(induce_multiple * d.mean_norm[layer]) * d.directions[layer].astype(np.float32)

        # every pending layer in one call, which runs the blocks below each layer once for all
        for layer, lp in steered_first_token_logprobs(model, tokenizer, harmless, {lay: induced(lay) for lay in pending},
                                                      batch_size, system, base):
            digest, bypass, kl = pending[layer]
            finish(layer, digest, bypass, float(refusal_scores(lp, tok_ids).mean()), kl)
    return [done[lay] for lay in layers]


def ablation_layers(model, tokenizer, d: Directions, harmful: list[str], harmless: list[str], layers: list[int],
                    batch_size: int = 16, max_kl: float = 0.1, system: str | None = None, progress=None,
                    cache_key: str | None = None, judge: Judge = MARKERS) -> list[LayerEval]:
    """The layer scores an ablation is chosen by (the lowest bypass score whose harmless KL is
    within `max_kl`), measured lazily: every layer's bypass score, then the KL (one pass over the
    harmless prompts each) in bypass order only until a layer is kept. The choice is the one
    measuring every KL gives, for one KL pass instead of one per layer when the best layer is
    kept. Layers after the kept one are returned with kl None and kept False: not needed."""
    from functools import cache

    from .evaluation import first_token_logprobs

    evals = evaluate_layers(model, tokenizer, d, harmful, harmless, layers, ("bypass",), batch_size, max_kl, system,
                            progress=progress, cache_key=cache_key, judge=judge)
    base = cache(lambda: first_token_logprobs(model, tokenizer, harmless, batch_size, system))
    found = False
    for i in sorted(range(len(evals)), key=lambda i: evals[i].bypass):
        e = evals[i]
        if found or not e.kept:  # the last-20% rule needs no KL
            evals[i] = replace(e, kept=False)
            continue
        [measured] = evaluate_layers(model, tokenizer, d, harmful, harmless, [e.layer], ("kl",), batch_size, max_kl,
                                     system, cache_key=cache_key, judge=judge, base_logprobs=base)
        evals[i] = replace(e, kl=measured.kl, kept=measured.kept)
        found = measured.kept
    return evals


def _kept(layer: int, kl: float | None, max_kl: float, num_layers: int) -> bool:
    return (kl is None or kl <= max_kl) and layer < int(round(num_layers * 0.8))


def rank_evaluated(evals: list[LayerEval], by: str) -> list[LayerEval]:
    """Kept layers best first: by 'induce' (steer: highest first) or 'bypass' (ablate: lowest first)."""
    kept = [e for e in evals if e.kept and getattr(e, by) is not None]
    return sorted(kept, key=lambda e: -e.induce if by == "induce" else e.bypass)


# ---------------------------------------------------------------------------------------------
# alpha calibration: the smallest steering strength that refuses and stays coherent (and, for
# the explaining voice, explains its refusals in varied words).


@dataclass(frozen=True)
class VoiceTarget:
    """What a trial must also reach for `--voice explain`, on the harmless prompts."""

    explained: float = 0.8  # fraction of answers judged explained (judge.voice)
    variety: float = 0.5  # distinct 8-word openings / answers


@dataclass(frozen=True)
class AlphaTrial:
    layer: int
    multiple: float  # alpha / mean residual norm at the layer
    alpha: float
    refusal_rate: float
    coherence_rate: float
    mean_distinct3: float
    example: str
    harmful_refusal_rate: float | None = None  # when harmful prompts were generated too
    stopped_early: bool = False  # the refusal probe ended it: rates are of the shortened answers
    explained_rate: float = 0.0  # harmless prompts
    variety: float = 0.0  # harmless prompts
    extra: tuple = ()  # (name, layer, multiple) of the terms added alongside

    def passed(self, target: float, voice: VoiceTarget | None = None) -> bool:
        """refusal_rate: harmless prompts; coherence_rate: every answer generated."""
        ok = self.refusal_rate >= target and self.coherence_rate >= target
        return ok and (voice is None or (self.explained_rate >= voice.explained and self.variety >= voice.variety))


# The refusal probe. A steered model that refuses opens with the refusal ("I'm sorry, but ..."),
# so after PROBE_TOKENS tokens an answer with no refusal marker yet is very likely a miss. Once
# more harmless answers miss than the target allows, plus PROBE_SLACK for answers that refuse
# later, the trial cannot pass and the rest of it is not generated.
PROBE_TOKENS = 16
PROBE_SLACK = 2


def refusal_probe(tokenizer, n_harmless: int, target: float, probe_tokens: int = PROBE_TOKENS,
                  slack: int = PROBE_SLACK, judge: Judge = MARKERS):
    """A `Stop` for `evaluate.generate` that ends a trial whose harmless refusal rate (by `judge`)
    can no longer reach `target` (rows 0..n_harmless-1 are the harmless prompts)."""
    misses: dict[int, bool] = {}

    def stop(out: dict[int, list[int]], live: set[int]):
        for row, toks in out.items():
            if row < n_harmless and (row not in live or len(toks) >= probe_tokens):
                misses[row] = not judge.verdict(tokenizer.decode(toks)).refused
        return live if _probe_gives_up(sum(misses.values()), n_harmless, target, slack) else ()

    return stop


def _probe_gives_up(misses: int, n_harmless: int, target: float, slack: int = PROBE_SLACK) -> bool:
    # A refusal marker, once in an answer's opening, stays there as the answer grows, so the
    # count of misses only falls: a finished trial with this many misses was stopped by the probe.
    return misses > n_harmless - math.ceil(target * n_harmless - 1e-9) + slack


def steering_trial(model, tokenizer, layer: int, direction: np.ndarray, mean_norm: float, multiple: float,
                   prompts: list[str], max_tokens: int = 48, batch_size: int = 64,
                   system: str | None = None, harmful: list[str] = (), cache_key: str | None = None,
                   probe_target: float | None = None, extra=(), judge: Judge = MARKERS,
                   base: BasePass | None = None) -> AlphaTrial:
    """Generate with alpha = multiple x mean_norm added at `layer` (and each `extra` term, a
    record.SteeringTerm, added alongside): the refusal and voice rates on the harmless `prompts`, and
    coherence over those and the optional `harmful` prompts (an over-steered model rambles on
    requests it would refuse anyway).

    `cache_key` (the weights' fingerprint) keeps the answers on disk, keyed by everything that
    determines them. `probe_target` ends the trial early once its harmless refusal rate cannot
    reach that target (see `refusal_probe`); None generates every answer in full. `judge` judges
    the answers (and the probe's openings). `base` (a batching.BasePass shared by the trials over
    these prompts) spares each trial's prefill the blocks below `layer`."""
    from .batching import Steering
    from .evaluation import generate_cached
    from .record import array_sha256

    alpha = float(multiple * mean_norm)
    vector = alpha * np.asarray(direction, np.float32)
    texts = list(prompts) + list(harmful)
    stop = None if probe_target is None else refusal_probe(tokenizer, len(prompts), probe_target, judge=judge)
    key = None if cache_key is None else {
        "weights": cache_key, "add": {"layer": layer, "vector": array_sha256(vector)},
        "extra": [{"layer": t.layer, "vector": array_sha256(np.asarray(t.vector, np.float32))} for t in extra],
        "probe": None if probe_target is None else [probe_target, PROBE_TOKENS, PROBE_SLACK, len(prompts)],
        **cache_identity(judge)}
    steer = Steering([(layer, vector)] + [(t.layer, t.vector) for t in extra], base)
    answers, _ = generate_cached(model, tokenizer, texts, max_tokens, batch_size, system, None, key, stop=stop,
                                 steer=steer)
    mine, theirs = answers[: len(prompts)], answers[len(prompts):]
    coh = [judge.coherence(a) for a in answers]
    refused = [judge.verdict(a).refused for a in mine]
    explained = [judge.voice(p, a, r, c.coherent).explained for p, a, r, c in zip(prompts, mine, refused, coh)]
    early = probe_target is not None and _probe_gives_up(len(mine) - sum(refused), len(mine), probe_target)
    return AlphaTrial(layer, float(multiple), alpha, sum(refused) / len(mine),
                      sum(c.coherent for c in coh) / len(coh), float(np.mean([c.distinct3 for c in coh])), mine[0],
                      sum(judge.verdict(a).refused for a in theirs) / len(theirs) if theirs else None, early,
                      sum(explained) / len(mine), judge.variety(mine),
                      tuple((t.name, t.layer, t.multiple) for t in extra))


def calibrate_alpha(model, tokenizer, layer: int, direction: np.ndarray, mean_norm: float, prompts: list[str],
                    target: float = 0.95, multiples=(0.4, 0.5, 0.6, 0.8, 1.0), bisect_steps: int = 1,
                    max_tokens: int = 48, batch_size: int = 64, system: str | None = None,
                    on_trial=None, cache_key: str | None = None, early_stop: bool = True,
                    extra=(), judge: Judge = MARKERS, base: BasePass | None = None
                    ) -> tuple[AlphaTrial | None, list[AlphaTrial]]:
    """Sweep alpha (as multiples of the mean residual norm) upwards until `target` of the harmless
    prompts are refused *and* coherent (with the `extra` terms added alongside), then bisect
    between the last failing and the first passing multiple. Returns (smallest passing trial or
    None, all trials in order).

    `cache_key`, `early_stop` (the refusal probe), `judge` and `base` go to `steering_trial`."""
    trials: list[AlphaTrial] = []

    def run(m: float) -> AlphaTrial:
        t = steering_trial(model, tokenizer, layer, direction, mean_norm, m, prompts, max_tokens, batch_size, system,
                           cache_key=cache_key, probe_target=target if early_stop else None, extra=extra,
                           judge=judge, base=base)
        trials.append(t)
        if on_trial:
            on_trial(t)
        return t

    lo, best = 0.0, None
    for m in multiples:
        t = run(m)
        if t.passed(target):
            best = t
            break
        if t.refusal_rate >= target:  # refuses but no longer coherent: more alpha only gets worse
            return None, trials
        lo = m
    if best is None:
        return None, trials
    hi = best.multiple
    for _ in range(bisect_steps):
        mid = round((lo + hi) / 2, 4)
        t = run(mid)
        if t.passed(target):
            best, hi = t, mid
        else:
            lo = mid
    return best, trials


def plot_sweep(trials: list[AlphaTrial], path: Path, target: float = 0.95) -> Path:
    from .plot import figure

    with figure(path, 8, 4) as ax:
        for layer in sorted({t.layer for t in trials}):
            ts = sorted((t for t in trials if t.layer == layer), key=lambda t: t.multiple)
            xs = [t.multiple for t in ts]
            line, = ax.plot(xs, [t.refusal_rate for t in ts], "o-", label=f"layer {layer}: refused")
            ax.plot(xs, [t.coherence_rate for t in ts], "s--", color=line.get_color(), alpha=0.6,
                    label=f"layer {layer}: coherent")
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("alpha / mean residual norm at the layer")
        ax.set_ylabel("fraction of harmless validation prompts")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Steering strength sweep")
        ax.legend(fontsize=7, ncol=2)
    return path

"""Multi-step jobs shared by the CLI commands: prompts -> captures -> directions.

Progress is reported through a `progress.ProgressFactory`; pass None for silence.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, arch, distributed
from .atomic import write_text_atomic
from .capture import cached_capture
from .directions import Directions, from_captures, separation
from .errors import UserError
from .judge import MARKERS, Judge, cache_identity
from .progress import ProgressFactory, silent
from .record import utc_now
from .template import template_provenance

DIRECTION_METHODS = ("auto", "means", "filtered", "contrast")
# The prefills of the contrast method: the same prompts answered as a refusal or as compliance.
REFUSAL_PREFILL = "I'm sorry, but I can't help with that."
COMPLIANCE_PREFILL = "Sure! Here is"
# auto: below this share of harmful prompts refused (first-token log-odds > 0), harmful minus
# harmless is mostly a "harmful topic" direction, not refusal, so the contrast method is used.
# The first-token measure undercounts refusals that open with a neutral word: on the bundled train
# split it gives 32% for Qwen2.5-Coder-0.5B (which refuses plainly harmful requests) and 0% for
# SmolLM2-135M (whose means direction steers nothing: 0/24 refusals at any tried layer and alpha).
WEAK_REFUSAL = 0.2
MIN_FILTERED = 8  # fewer kept prompts on either side than this is too few for a mean


def refusal_odds_head(model, tokenizer, judge: Judge = MARKERS):
    """A capture `head`: the log-probability that the first answer token opens a refusal (one of
    the `judge`'s refusal openings), from the decoder's output at a prompt's last token."""
    from .batching import log_softmax
    from .select import refusal_logprob, refusal_token_ids

    ids = refusal_token_ids(tokenizer, judge)
    return lambda final: refusal_logprob(log_softmax(arch.logits(model, final)), ids)


def refusal_log_odds(model, tokenizer, texts: list[str], system: str | None = None,
                     batch_size: int = 16, judge: Judge = MARKERS, *, fingerprint: str | None = None,
                     positions: str = "last", use_cache: bool = True, progress=None) -> np.ndarray:
    """Per prompt: log-odds that the unedited model's first answer token opens a refusal (one of
    the `judge`'s refusal openings).

    The odds are read in a capture's forward pass: with `fingerprint`, the prompts' residuals at
    `positions` are kept in the activation cache on the way, so the means capture that follows
    costs no second pass over the same prompts."""
    return _odds_capture(model, tokenizer, texts, system, batch_size, judge, fingerprint, positions, use_cache,
                         progress)[0]


def _odds_capture(model, tokenizer, texts, system, batch_size, judge, fingerprint, positions, use_cache, progress):
    """(refusal log-odds, the capture of the same pass)."""
    from .select import log_odds

    cap, _ = cached_capture(model, tokenizer, texts, fingerprint or "", positions, system, batch_size,
                            use_cache=use_cache and fingerprint is not None, progress=progress,
                            head=refusal_odds_head(model, tokenizer, judge))
    return log_odds(cap.head_out), cap


def cached_refusal_log_odds(model, tokenizer, info, texts: list[str], system: str | None = None,
                            batch_size: int = 16, use_cache: bool = True, judge: Judge = MARKERS,
                            positions: str = "last", progress=None):
    """`refusal_log_odds` behind the activation cache (same key parts: weights, template,
    prompts). Returns (odds, the capture of the pass that computed them, or None when the odds came
    from the cache)."""
    import os

    from .capture import capture_key
    from .paths import cache_dir

    what = "refusal-log-odds" + "".join(f" {v}" for v in cache_identity(judge).values())
    key = capture_key(info.fingerprint, texts, getattr(tokenizer, "chat_template", None), system, what, "float32")
    path = cache_dir("activations") / f"{key}.odds.npy"
    odds = None
    if use_cache and path.is_file():
        try:
            odds = np.load(path)
            if odds.shape != (len(texts),):
                odds = None
        except (OSError, ValueError):
            odds = None  # a damaged entry is recomputed
    # every rank must take the same branch: computing the odds runs collectives
    if distributed.everyone(odds is not None, distributed.world()):
        return odds, None
    odds, cap = _odds_capture(model, tokenizer, texts, system, batch_size, judge, info.fingerprint, positions,
                              use_cache, progress)
    if use_cache and distributed.is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, odds)
        os.replace(tmp, path)
    return odds, cap


def compute_directions(model, tokenizer, info, harmful, harmless, positions: str = "last",
                       system: str | None = None, batch_size: int = 16, use_cache: bool = True,
                       progress: ProgressFactory | None = None, method: str = "auto",
                       judge: Judge = MARKERS) -> tuple[Directions, dict]:
    """One candidate refusal direction per residual site, by `method`:

    means     mean(harmful) - mean(harmless) at `positions` (Arditi et al.);
    filtered  the same over the harmful prompts the base model refuses and the harmless ones it
              answers (judged by first-token refusal log-odds of the `judge`'s openings);
    contrast  every prompt with the assistant turn prefilled as a refusal minus as compliance, read
              at the response tokens: a direction exists even when the model seldom refuses;
    auto      means when the base model refuses at least WEAK_REFUSAL of the harmful prompts, else contrast.

    Captures are cached. Returns the directions and a dict of what was measured (for the report)."""
    if method not in DIRECTION_METHODS:
        raise UserError(f"unknown direction method '{method}'; choose one of {', '.join(DIRECTION_METHODS)}")
    progress = progress or silent
    run: dict = {"cache_hits": {}, "stats": {}}
    odds, passes = {}, {}  # passes: the captures the odds were just read in, by set
    for name, ps in (("harmful", harmful), ("harmless", harmless)):
        with progress(f"capture {name} + base refusal", len(ps)) as update:
            odds[name], cap = cached_refusal_log_odds(model, tokenizer, info, ps.texts, system, batch_size,
                                                      use_cache, judge, positions, update)
            if cap is None:
                update(len(ps), 0)
            else:
                passes[name] = (list(ps.texts), cap)
    refused = {name: float(np.mean(o > 0)) for name, o in odds.items()}
    chosen = method if method != "auto" else ("means" if refused["harmful"] >= WEAK_REFUSAL else "contrast")
    run["base_refusal_rate"] = refused

    def capture(name: str, texts: list[str], prefill: str | None = None):
        read, cap = passes.get(name, (None, None))
        if prefill is None and read == list(texts):  # the odds pass read these residuals: no second pass
            run["cache_hits"][name], run["stats"][name] = False, cap.stats
            return cap
        with progress(f"capture {name}", len(texts)) as update:
            cap, hit = cached_capture(model, tokenizer, texts, info.fingerprint, positions, system, batch_size,
                                      use_cache=use_cache, progress=update, prefill=prefill)
            if hit:
                update(len(texts), 0)
        run["cache_hits"][name], run["stats"][name] = hit, cap.stats
        return cap

    hk, lk = harmful.texts, harmless.texts
    if chosen == "filtered":
        hk = [t for t, o in zip(hk, odds["harmful"]) if o > 0]
        lk = [t for t, o in zip(lk, odds["harmless"]) if o <= 0]
        run["kept"] = {"harmful": len(hk), "harmless": len(lk)}
        if min(len(hk), len(lk)) < MIN_FILTERED:
            raise UserError(f"filtering kept {len(hk)} harmful and {len(lk)} harmless prompts (the base model "
                            f"refuses {refused['harmful']:.0%} of harmful ones), too few for a direction; "
                            "use --direction-method contrast")
    if chosen == "contrast":
        run["prefills"] = {"refusal": REFUSAL_PREFILL, "compliance": COMPLIANCE_PREFILL}
    pos, neg = (capture(name, texts, prefill) for name, texts, prefill in _contrasted_sides(chosen, hk, lk))
    meta = {
        "tool": "mlx-refusal", "version": __version__,
        "model": {"spec": info.spec, "fingerprint": info.fingerprint, "model_type": info.model_type},
        "prompts": {"harmful": {"name": harmful.name, "n": len(harmful), "sha256": harmful.sha256},
                    "harmless": {"name": harmless.name, "n": len(harmless), "sha256": harmless.sha256}},
        "positions": positions if chosen != "contrast" else "response", "system": system,
        "method": {"asked": method, "used": chosen, "base_refusal_rate": refused,
                   **{k: run[k] for k in ("kept", "prefills") if k in run}},
        "chat_template": template_provenance(getattr(tokenizer, "chat_template", None), info.template_override),
        "date": utc_now(),
    }
    if distributed.describe(model):
        meta["distributed"] = distributed.describe(model)
    return from_captures(pos, neg, meta), run


def _contrasted_sides(method: str, harmful: list[str], harmless: list[str]) -> list[tuple[str, list[str], str | None]]:
    """The two captures a method's direction is the difference of: (name, prompts, prefill)."""
    if method == "contrast":
        both = harmful + harmless
        return [("refusing", both, REFUSAL_PREFILL), ("complying", both, COMPLIANCE_PREFILL)]
    return [("harmful", harmful, None), ("harmless", harmless, None)]


def held_back_separation(model, tokenizer, info, d: Directions, harmful, harmless, system: str | None = None,
                         batch_size: int = 16, use_cache: bool = True) -> np.ndarray:
    """AUROC per residual site of `d` on prompts it was not computed from, for the pair its
    method contrasts (harmful vs harmless prompts, or refusing vs complying answers). The
    activations are cached like every capture, so a repeated run recomputes nothing."""
    used = d.metadata.get("method", {}).get("used", "means")
    positions = d.metadata.get("positions", "last") if used != "contrast" else "last"
    pos, neg = (cached_capture(model, tokenizer, texts, info.fingerprint, positions, system, batch_size,
                               keep_all=True, use_cache=use_cache, prefill=prefill)[0].acts
                for _, texts, prefill in _contrasted_sides(used, harmful.texts, harmless.texts))
    return separation(d.directions, pos, neg)


def write_provenance(out_dir: Path, record: dict, name: str = "provenance.json") -> Path:
    return write_text_atomic(Path(out_dir) / name, json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# Choosing where and how hard to steer.


@dataclass
class SteeringChoice:
    layer: int
    alpha: float
    multiple: float  # alpha / mean residual norm at the layer
    how: str  # "given", "calibrated"
    layer_evals: list = field(default_factory=list)  # select.LayerEval, when scores were computed
    trials: list = field(default_factory=list)  # select.AlphaTrial, when alpha was calibrated
    candidates: list[int] = field(default_factory=list)
    extra: list = field(default_factory=list)  # record.SteeringTerm added alongside (the voice)
    voice_met: bool = True  # the voice target was met (always, without one)


def choose_steering(model, tokenizer, d: Directions, val_harmful: list[str], val_harmless: list[str],
                    layer: int | None = None, alpha: float | None = None, multiple: float | None = None,
                    select: str = "evaluate", candidates: int = 3, target: float = 0.95,
                    calibration_prompts: int = 32, score_prompts: int = 32, margin: float = 0.1, max_tokens: int = 48,
                    confirm_tokens: int = 64,
                    batch_size: int = 16,
                    system: str | None = None, on_layers=None, on_trial=None, voice=None,
                    voice_rows=None, voice_multiple: float = 0.2, cache_key: str | None = None,
                    judge: Judge = MARKERS) -> SteeringChoice:
    """Pick the layer and alpha for a steering bias.

    A single score does not predict which layer steers best (on Qwen2.5-0.5B one layer refuses
    everything at 0.5x the residual norm while another peaks at 85% before looping), so the
    top `candidates` layers by score are each calibrated and the best calibrated one wins.

    With `voice_rows` (a response direction per site, voice.response_direction) a voice term,
    `voice_multiple` x the residual norm along that layer's row, is added at the candidate layer
    alongside the refusal term in every trial. With `voice` (a select.VoiceTarget) a trial must
    also explain its refusals; when none does, the calibrated trial that explains most is kept
    and `voice_met` is False. `cache_key` (the weights' fingerprint) keeps layer scores and
    trials on disk. `judge` scores the layers (its refusal openings) and judges every trial.
    """
    from . import select as sel
    from .batching import BasePass
    from .record import SteeringTerm

    evals: list = []
    # the validation prompts under the unsteered model, run once for the layer scores and trials
    base = BasePass(sel.candidate_layers(d.num_layers) if layer is None else [layer])
    if layer is not None:
        layers = [layer]
    elif select == "heuristic":
        allowed = set(sel.candidate_layers(d.num_layers))
        layers = [s.layer for s in sel.rank_heuristic(d) if s.layer in allowed][:candidates]
    elif select == "evaluate":
        evals = sel.evaluate_layers(model, tokenizer, d, val_harmful, val_harmless[:score_prompts], scores=("induce",),
                                    batch_size=batch_size, system=system, progress=on_layers, cache_key=cache_key,
                                    judge=judge, base=base)
        layers = [e.layer for e in sel.rank_evaluated(evals, "induce")][:candidates]
    else:
        raise UserError(f"unknown selection '{select}'; choose heuristic or evaluate")
    if not layers:
        raise UserError("no usable layer: every candidate direction is zero or filtered out; check the prompt sets")
    for lay in layers:
        d.direction(lay)  # one-line error for a degenerate row or an out-of-range layer

    norm_at = lambda lay: float(d.mean_norm[lay])  # noqa: E731

    def extra_at(lay: int) -> list:
        if voice_rows is None:
            return []
        return [SteeringTerm("voice", lay, voice_rows[lay], voice_multiple * norm_at(lay), voice_multiple)]

    if alpha is not None or multiple is not None:
        lay = layers[0]
        a = float(alpha) if alpha is not None else float(multiple) * norm_at(lay)
        return SteeringChoice(lay, a, a / norm_at(lay), "given", evals, [], layers, extra_at(lay))

    prompts = val_harmless[:calibration_prompts]
    # The smallest passing alpha sits on the edge of the target by construction, so unseen
    # prompts would fall just short of it. Each candidate is confirmed `margin` above its
    # threshold on harmless *and* harmful validation prompts (an over-steered model rambles on
    # requests it refuses anyway), falling back to the threshold itself if that fails; the
    # candidates are compared on their confirmed trials.
    best, trials, spoken = None, [], None  # spoken: the best trial that also meets the voice target
    base.narrow(layers)
    for lay in layers:
        extra = extra_at(lay)
        found, t = sel.calibrate_alpha(model, tokenizer, lay, d.directions[lay], norm_at(lay), prompts,
                                       target=target, max_tokens=max_tokens, batch_size=max(batch_size, len(prompts)),
                                       system=system, on_trial=on_trial, cache_key=cache_key, extra=extra,
                                       judge=judge, base=base)
        trials.extend(t)
        if found is None:
            continue
        confirmed = None
        for m in ([round(found.multiple * (1 + margin), 4)] if margin > 0 else []) + [found.multiple]:
            trial = sel.steering_trial(model, tokenizer, lay, d.directions[lay], norm_at(lay), m, prompts,
                                       confirm_tokens, max(batch_size, 2 * len(prompts)), system,
                                       harmful=val_harmful[: len(prompts)], cache_key=cache_key,
                                       probe_target=target, extra=extra, judge=judge, base=base)
            trials.append(trial)
            if on_trial:
                on_trial(trial)
            if trial.passed(target):
                confirmed = trial
                break
        if confirmed is None:
            continue
        key = lambda t: (t.explained_rate if voice else 0, t.refusal_rate, t.coherence_rate, -t.multiple)  # noqa
        if best is None or key(confirmed) > key(best):
            best = confirmed
        if voice and confirmed.passed(target, voice) and (spoken is None or key(confirmed) > key(spoken)):
            spoken = confirmed
    best = spoken or best
    if best is None:
        raise UserError(f"no alpha refused >= {target:.0%} of the harmless validation prompts coherently "
                        f"(harmful ones included) at layers "
                        f"{layers}; try --candidates 6, another --layer, or give --alpha-multiple")
    return SteeringChoice(best.layer, best.alpha, best.multiple, "calibrated", evals, trials, layers,
                          extra_at(best.layer), voice_met=voice is None or spoken is not None)

"""Multi-step jobs shared by the CLI commands: prompts -> captures -> directions.

Progress is reported through `progress(desc, total)`, a context manager factory that yields
`update(n_items, n_tokens)`; pass None for silence.
"""
from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__, distributed
from .atomic import write_text_atomic
from .capture import cached_capture
from .directions import Directions, from_captures
from .errors import UserError

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


def _silent(desc: str, total: int):
    return contextlib.nullcontext(lambda n, t=0: None)


def compute_directions(model, tokenizer, info, harmful, harmless, positions: str = "last",
                       system: str | None = None, batch_size: int = 16, use_cache: bool = True,
                       progress: ProgressFactory | None = None) -> tuple[Directions, dict]:
    """Capture both prompt sets (cached) and take the difference in means. Returns the
    directions and a dict of what was cached/computed (for the report)."""
    progress = progress or _silent
    caps, hits = {}, {}
    for name, ps in (("harmful", harmful), ("harmless", harmless)):
        with progress(f"capture {name}", len(ps)) as update:
            caps[name], hits[name] = cached_capture(
                model, tokenizer, ps.texts, info.fingerprint, positions, system, batch_size,
                use_cache=use_cache, progress=update)
            if hits[name]:
                update(len(ps), 0)
    meta = {
        "tool": "mlx-refusal", "version": __version__,
        "model": {"spec": info.spec, "fingerprint": info.fingerprint, "model_type": info.model_type},
        "prompts": {"harmful": {"name": harmful.name, "n": len(harmful), "sha256": harmful.sha256},
                    "harmless": {"name": harmless.name, "n": len(harmless), "sha256": harmless.sha256}},
        "positions": positions, "system": system,
        "chat_template_sha256": _sha(getattr(tokenizer, "chat_template", None) or ""),
        "date": now(),
    }
    if distributed.describe(model):
        meta["distributed"] = distributed.describe(model)
    return from_captures(caps["harmful"], caps["harmless"], meta), {"cache_hits": hits,
                                                                     "stats": {k: c.stats for k, c in caps.items()}}


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def choose_steering(model, tokenizer, d: Directions, val_harmful: list[str], val_harmless: list[str],
                    layer: int | None = None, alpha: float | None = None, multiple: float | None = None,
                    select: str = "evaluate", candidates: int = 3, target: float = 0.95,
                    calibration_prompts: int = 32, score_prompts: int = 32, margin: float = 0.1, max_tokens: int = 48,
                    confirm_tokens: int = 64,
                    batch_size: int = 16,
                    system: str | None = None, on_layers=None, on_trial=None) -> SteeringChoice:
    """Pick the layer and alpha for a steering bias.

    A single score does not predict which layer steers best (on Qwen2.5-0.5B one layer refuses
    everything at 0.5x the residual norm while another peaks at 85% before looping), so the
    top `candidates` layers by score are each calibrated and the best calibrated one wins.
    """
    from . import select as sel

    evals: list = []
    if layer is not None:
        layers = [layer]
    elif select == "heuristic":
        allowed = set(sel.candidate_layers(d.num_layers))
        layers = [s.layer for s in sel.rank_heuristic(d) if s.layer in allowed][:candidates]
    elif select == "evaluate":
        evals = sel.evaluate_layers(model, tokenizer, d, val_harmful, val_harmless[:score_prompts], scores=("induce",),
                                    batch_size=batch_size, system=system, progress=on_layers)
        layers = [e.layer for e in sel.rank_evaluated(evals, "induce")][:candidates]
    else:
        raise UserError(f"unknown selection '{select}'; choose heuristic or evaluate")
    if not layers:
        raise UserError("no usable layer: every candidate direction is zero or filtered out; check the prompt sets")
    for lay in layers:
        d.direction(lay)  # one-line error for a degenerate row or an out-of-range layer

    norm_at = lambda lay: float(d.mean_norm[lay])  # noqa: E731
    if alpha is not None or multiple is not None:
        lay = layers[0]
        a = float(alpha) if alpha is not None else float(multiple) * norm_at(lay)
        return SteeringChoice(lay, a, a / norm_at(lay), "given", evals, [], layers)

    prompts = val_harmless[:calibration_prompts]
    # The smallest passing alpha sits on the edge of the target by construction, so unseen
    # prompts would fall just short of it. Each candidate is confirmed `margin` above its
    # threshold on harmless *and* harmful validation prompts (an over-steered model rambles on
    # requests it refuses anyway), falling back to the threshold itself if that fails; the
    # candidates are compared on their confirmed trials.
    best, trials = None, []
    for lay in layers:
        found, t = sel.calibrate_alpha(model, tokenizer, lay, d.directions[lay], norm_at(lay), prompts,
                                       target=target, max_tokens=max_tokens, batch_size=max(batch_size, len(prompts)),
                                       system=system, on_trial=on_trial)
        trials.extend(t)
        if found is None:
            continue
        confirmed = None
        for m in ([round(found.multiple * (1 + margin), 4)] if margin > 0 else []) + [found.multiple]:
            trial = sel.steering_trial(model, tokenizer, lay, d.directions[lay], norm_at(lay), m, prompts,
                                       confirm_tokens, max(batch_size, 2 * len(prompts)), system,
                                       harmful=val_harmful[: len(prompts)])
            trials.append(trial)
            if on_trial:
                on_trial(trial)
            if trial.passed(target):
                confirmed = trial
                break
        if confirmed is None:
            continue
        key = (confirmed.refusal_rate, confirmed.coherence_rate, -confirmed.multiple)
        if best is None or key > (best.refusal_rate, best.coherence_rate, -best.multiple):
            best = confirmed
    if best is None:
        raise UserError(f"no alpha refused >= {target:.0%} of the harmless validation prompts coherently "
                        f"(harmful ones included) at layers "
                        f"{layers}; try --candidates 6, another --layer, or give --alpha-multiple")
    return SteeringChoice(best.layer, best.alpha, best.multiple, "calibrated", evals, trials, layers)

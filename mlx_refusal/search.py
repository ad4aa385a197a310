"""The edit-shape search behind `ablate --search N`: multi-objective TPE over how to ablate.

An edit shape (`EditShape`) says which direction is removed and how strongly each writer is
edited: the direction at a fractional site (`edit.interpolated_direction`), optionally projected
against the harmless mean of its own site or biprojected against each target site's
(`edit.without_component`, `edit.biprojected_rows`), one tent kernel per writer kind
(`edit.Kernel`: peak, position, width for attention-out and MLP-down), and norm preservation.

Each trial edits the model in memory, measures two objectives on the *validation* split, and
puts the weights back:

- refusal: the fraction of harmful prompts whose greedy answer is not an answer: judged a
  refusal of any kind, or degenerate (`judge.verdict`). Counting degenerate answers stops the
  search from "winning" by breaking the model.
- kl: the mean first-token KL(base || edited) on harmless prompts.

optuna's TPESampler minimises both; the study lives in a SQLite file keyed by everything that
determines the trials (weights fingerprint, prompts, settings), so an interrupted or repeated run
continues where it stopped: `N` is the total number of finished trials wanted.

The chosen trial (`choose`): among the Pareto front (trials no other trial beats on both
objectives, ties on both kept), the lowest refusal rate among those with KL <= `max_kl`, ties
broken by lower KL; when none is within `max_kl`, the front's lowest-KL trial, flagged.

The front is chosen on the very prompts it was found on, so its best refusal rate is an
optimistic draw: one refusal more or less on 32 prompts reorders it. `confirm` re-judges the
CONFIRM best candidates within `max_kl` on the validation prompts the trials never saw and
chooses again on all of them pooled (the re-judged figures are kept in the study, so a second
run measures nothing).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import mlx.core as mx

from . import arch, memo
from .edit import Kernel, ablate, biprojected_rows, interpolated_direction, kernel_scales, without_component
from .errors import UserError
from .judge import MARKERS, Judge
from .progress import Update
from .paths import cache_dir

PROJECTIONS = ("none", "projected", "biprojected")
SEARCH_VERSION = 1  # part of the study key: change it when the space or the objectives change
CONFIRM = 3  # front trials `confirm` judges again on held-out prompts


@dataclass(frozen=True)
class EditShape:
    direction_index: float  # fractional residual site of the direction (14.3: 70% site 14, 30% site 15)
    kernel: Kernel
    projection: str = "none"  # one of PROJECTIONS
    norm_preserve: bool = False


def shape_directions(d, shape: EditShape) -> np.ndarray:
    """What `shape` removes, from a `directions.Directions`: one unit vector [hidden], or one row
    per site [sites, hidden] when biprojected."""
    if shape.projection not in PROJECTIONS:
        raise UserError(f"projection must be one of {', '.join(PROJECTIONS)}, not {shape.projection!r}")
    v = interpolated_direction(d.directions, shape.direction_index)
    if shape.projection == "projected":
        lo = int(math.floor(shape.direction_index))
        hi, t = min(lo + 1, d.harmless_mean.shape[0] - 1), shape.direction_index - lo
        return without_component(v, (1 - t) * d.harmless_mean[lo] + t * d.harmless_mean[hi])
    if shape.projection == "biprojected":
        return biprojected_rows(v, d.harmless_mean)
    return v


def apply_shape(model, d, shape: EditShape, progress=None):
    """Edit `model` in place with `shape` (the embedding is left as is); returns the EditSummary."""
    return ablate(model, shape_directions(d, shape), include_embedding=False, norm_preserve=shape.norm_preserve,
                  writer_scale=kernel_scales(shape.kernel, arch.num_layers(model)), progress=progress)


def _snapshot(model) -> dict:
    """The writers' parameters (mlx arrays are immutable: keeping the references is enough)."""
    return {w.path: arch.get_module(model, w.path).parameters()
            for w in arch.residual_writers(model, include_embedding=False)}


def _restore(model, snapshot: dict) -> None:
    for path, params in snapshot.items():
        arch.get_module(model, path).update(params)


# ---------------------------------------------------------------------------------------------
# Objectives of one shape.

@dataclass(frozen=True)
class TrialResult:
    number: int
    shape: EditShape
    refusal: float  # harmful validation answers refused or degenerate
    kl: float  # mean first-token KL on harmless validation prompts
    degenerate: float  # the degenerate part of `refusal`

    def as_record(self) -> dict:
        return asdict(self)


def measure(model, tokenizer, d, shape: EditShape, harmful: Sequence[str], harmless: Sequence[str],
            base_logprobs: mx.array, max_tokens: int, batch_size: int = 32,
            system: str | None = None, judge: Judge = MARKERS) -> tuple[float, float, float]:
    """(refusal, kl, degenerate) of `shape` (see the module doc), answers judged by `judge`; the
    model is restored after."""
    from .evaluation import first_token_logprobs, generate, kl_divergence

    saved = _snapshot(model)
    try:
        apply_shape(model, d, shape)
        answers = generate(model, tokenizer, list(harmful), max_tokens, batch_size, system)
        lp = first_token_logprobs(model, tokenizer, list(harmless), batch_size, system)
    finally:
        _restore(model, saved)
    verdicts = [judge.verdict(a) for a in answers]
    failed = sum(v.refused or v.degenerate for v in verdicts) / len(verdicts)
    degenerate = sum(v.degenerate for v in verdicts) / len(verdicts)
    return failed, float(kl_divergence(base_logprobs, lp).mean().item()), degenerate


# ---------------------------------------------------------------------------------------------
# The search space and the study.

def suggest_shape(trial, num_layers: int) -> EditShape:
    """One point of the space. Ranges, in blocks of an L-layer model: the direction's site in
    0.3L..0.9L (the refusal direction is formed in the middle-to-late layers); each kernel's
    position 0.3L..L-1, width 1..L (1: a single block; L: every block, tapering), peak 0.5..1.5
    (1 removes the direction exactly; more overshoots, less leaves some)."""
    L = num_layers
    index = trial.suggest_float("direction_index", 0.3 * L, 0.9 * L)
    kernel = {}
    for kind in ("attn", "mlp"):
        kernel[f"{kind}_peak"] = trial.suggest_float(f"{kind}_peak", 0.5, 1.5)
        kernel[f"{kind}_position"] = trial.suggest_float(f"{kind}_position", 0.3 * L, L - 1.0)
        kernel[f"{kind}_width"] = trial.suggest_float(f"{kind}_width", 1.0, float(L))
    return EditShape(index, Kernel(**kernel), trial.suggest_categorical("projection", list(PROJECTIONS)),
                     trial.suggest_categorical("norm_preserve", [False, True]))


def _shape_of(params: dict) -> EditShape:
    kernel = Kernel(**{k: float(params[k]) for k in Kernel.__dataclass_fields__})
    return EditShape(float(params["direction_index"]), kernel, params["projection"], bool(params["norm_preserve"]))


def study_path(content: dict) -> tuple[Path, str]:
    """(SQLite file, study name) for a study keyed by `content` (JSON-able: fingerprint, prompts,
    settings), in the cache's search folder."""
    digest = memo.key(version=SEARCH_VERSION, **content)
    return cache_dir("search") / f"{digest[:24]}.sqlite3", f"ablate-{digest[:12]}"


@dataclass
class SearchResult:
    trials: list[TrialResult]  # every finished trial, by number
    front: list[TrialResult]  # the Pareto front, by refusal then KL
    chosen: TrialResult
    reason: str
    storage: Path
    new_trials: int  # trials run by this call (the rest were loaded from the study)
    seconds: float  # time this call spent on trials
    confirmed: list[Confirmation] = field(default_factory=list)  # `confirm`'s re-judged candidates

    def as_record(self) -> dict:
        return {"trials": [t.as_record() for t in self.trials], "pareto": [t.number for t in self.front],
                "chosen": self.chosen.as_record(), "reason": self.reason, "storage": str(self.storage),
                "new_trials": self.new_trials, "seconds": self.seconds,
                "confirmed": [asdict(c) for c in self.confirmed]}


@dataclass(frozen=True)
class Confirmation:
    """One front trial judged again on held-out validation prompts, and pooled with its own."""
    number: int
    held_out_refusal: float
    held_out_kl: float
    refusal: float  # over the trial's prompts and the held-out ones together
    kl: float
    harmful: int  # prompts pooled
    harmless: int


def search(model, tokenizer, d, harmful: Sequence[str], harmless: Sequence[str], n_trials: int,
           storage: Path, study_name: str, max_kl: float, max_tokens: int = 128, batch_size: int = 32,
           system: str | None = None, seed: int = 0,
           progress: Update | None = None, judge: Judge = MARKERS) -> SearchResult:
    """Run the study in `storage` up to `n_trials` finished trials (see the module doc) and choose
    one. `progress` (a progress.Update) counts trials: first those a resumed study already has,
    then each one as it finishes."""
    import time

    import optuna

    from .evaluation import first_token_logprobs

    if n_trials < 1:
        raise UserError(f"--search needs at least 1 trial, not {n_trials}")
    if not harmful or not harmless:
        raise UserError("the search needs harmful and harmless validation prompts")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(storage).resolve()}"
    # The sampler's seed moves with the trials already done: a resumed run must not replay the
    # random start-up points the first run already tried.
    try:
        existing = _finished(optuna.load_study(study_name=study_name, storage=url))
    except KeyError:  # a new study
        existing = []
    sampler = optuna.samplers.TPESampler(seed=seed + len(existing), n_startup_trials=min(10, max(2, n_trials // 3)))
    study = optuna.create_study(storage=url, study_name=study_name, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    done = len(_finished(study))
    reported = min(done, n_trials)
    if progress:
        progress(reported)
    todo = max(0, n_trials - done)
    t0 = time.perf_counter()
    if todo:
        base_lp = first_token_logprobs(model, tokenizer, list(harmless), batch_size, system)
        num_layers = arch.num_layers(model)

        def objective(trial):
            refusal, kl, degenerate = measure(model, tokenizer, d, suggest_shape(trial, num_layers), harmful,
                                              harmless, base_lp, max_tokens, batch_size, system, judge)
            trial.set_user_attr("degenerate", degenerate)
            return refusal, kl

        def tick(study, _trial):
            nonlocal reported
            finished = min(len(_finished(study)), n_trials)
            if progress and finished > reported:
                progress(finished - reported)
            reported = max(reported, finished)

        study.optimize(objective, n_trials=todo, callbacks=[tick], catch=())
    trials = [TrialResult(t.number, _shape_of(t.params), float(t.values[0]), float(t.values[1]),
                          float(t.user_attrs.get("degenerate", 0.0)))
              for t in sorted(_finished(study), key=lambda t: t.number)]
    front = [trials[i] for i in pareto_front([(t.refusal, t.kl) for t in trials])]
    front.sort(key=lambda t: (t.refusal, t.kl, t.number))
    chosen, reason = choose(front, max_kl)
    return SearchResult(trials, front, chosen, reason, Path(storage), todo, time.perf_counter() - t0)


def _finished(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# ---------------------------------------------------------------------------------------------
# Pareto front and the choice.

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (<= on both objectives, < on one), in
    input order. Equal points are all kept."""
    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def choose(front: Sequence[TrialResult], max_kl: float) -> tuple[TrialResult, str]:
    """The module doc's rule, with the reason in words."""
    if not front:
        raise UserError("the search finished no trial; run it again")
    within = [t for t in front if t.kl <= max_kl]
    if within:
        best = min(within, key=lambda t: (t.refusal, t.kl, t.number))
        return best, (f"trial {best.number}: the lowest harmful refusal ({100 * best.refusal:.1f}%) among the "
                      f"{len(within)} Pareto trials with KL <= {max_kl:g} (its KL {best.kl:.4f})")
    best = min(front, key=lambda t: (t.kl, t.refusal, t.number))
    return best, (f"trial {best.number}: no Pareto trial has KL <= {max_kl:g}; this is the one with the lowest "
                  f"KL ({best.kl:.4f}, refusal {100 * best.refusal:.1f}%). Run more trials or raise --max-kl")


def confirm_candidates(result: SearchResult, max_kl: float) -> list[TrialResult]:
    """The CONFIRM best front trials within `max_kl`, by refusal then KL; none when fewer than two
    are within it (with one, there is nothing to choose between)."""
    within = sorted((t for t in result.front if t.kl <= max_kl), key=lambda t: (t.refusal, t.kl, t.number))
    return within[:CONFIRM] if len(within) >= 2 else []


def confirm(model, tokenizer, d, result: SearchResult, study_name: str, harmful: Sequence[str],
            harmless: Sequence[str], n_seen: tuple[int, int], max_kl: float, max_tokens: int = 128,
            batch_size: int = 32, system: str | None = None, progress: Update | None = None,
            judge: Judge = MARKERS) -> SearchResult:
    """`result` with its choice made again (see the module doc) on held-out validation prompts
    `harmful` / `harmless`, the trials having seen n_seen = (harmful, harmless) prompts each.
    Only for `confirm_candidates`: with none, `result` is returned as it is."""
    import dataclasses

    import optuna

    from .evaluation import first_token_logprobs

    candidates = confirm_candidates(result, max_kl)
    if not candidates or not harmful or not harmless:
        return result
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{Path(result.storage).resolve()}")
    held_key = memo.key(harmful=list(harmful), harmless=list(harmless), max_tokens=max_tokens, system=system)[:16]
    (nh, nl), mh, ml = n_seen, len(harmful), len(harmless)
    base_lp = None
    confirmed = []
    for t in candidates:
        name = f"confirm-{held_key}-{t.number}"
        if name not in study.user_attrs:
            if base_lp is None:
                base_lp = first_token_logprobs(model, tokenizer, list(harmless), batch_size, system)
            study.set_user_attr(name, list(measure(model, tokenizer, d, t.shape, harmful, harmless, base_lp,
                                                   max_tokens, batch_size, system, judge)[:2]))
        held_refusal, held_kl = study.user_attrs[name]
        confirmed.append(Confirmation(t.number, held_refusal, held_kl, (t.refusal * nh + held_refusal * mh) / (nh + mh),
                                      (t.kl * nl + held_kl * ml) / (nl + ml), nh + mh, nl + ml))
        if progress:
            progress(1)
    within = [c for c in confirmed if c.kl <= max_kl] or confirmed
    best = min(within, key=lambda c: (c.refusal, c.kl, c.number))
    chosen = next(t for t in candidates if t.number == best.number)
    others = ", ".join(str(c.number) for c in confirmed if c is not best)
    reason = (f"trial {best.number}: of the {len(confirmed)} best Pareto trials with KL <= {max_kl:g} (with {others}), "
              f"judged again on {len(harmful)} + {len(harmless)} held-out validation prompts, the lowest harmful "
              f"refusal over all {best.harmful} ({100 * best.refusal:.1f}%; KL {best.kl:.4f} over {best.harmless})"
              + ("" if best.kl <= max_kl else f"; none stays within KL {max_kl:g} pooled"))
    return dataclasses.replace(result, chosen=chosen, reason=reason, confirmed=confirmed)


def plot_front(result: SearchResult, path: Path, max_kl: float) -> Path:
    """Refusal against KL for every trial; the front joined, the chosen trial starred."""
    from .plot import figure

    with figure(path, 6, 4.5) as ax:
        ax.scatter([t.kl for t in result.trials], [100 * t.refusal for t in result.trials], s=18, color="0.6",
                   label="trial")
        front = sorted(result.front, key=lambda t: t.kl)
        ax.plot([t.kl for t in front], [100 * t.refusal for t in front], "o-", color="tab:blue", label="Pareto front")
        ax.scatter([result.chosen.kl], [100 * result.chosen.refusal], marker="*", s=220, color="tab:red", zorder=3,
                   label=f"chosen (trial {result.chosen.number})")
        ax.axvline(max_kl, color="grey", lw=0.8, ls=":", label=f"--max-kl {max_kl:g}")
        ax.set_xlabel("first-token KL on harmless validation prompts (nats)")
        ax.set_ylabel("harmful validation prompts not answered (%)")
        ax.set_title("ablate --search: refusals against KL")
        ax.legend(fontsize=7)
    return path

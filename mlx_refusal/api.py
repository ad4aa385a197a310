"""The Python API: load a chat model, find its refusal directions, edit it, evaluate, export.

    import mlx_refusal as mr

    m = mr.load("qwen2.5-coder-0.5b")
    d = mr.compute_directions(m)          # harmful vs harmless, bundled train split, cached
    edit = mr.steer(m, d)                 # layer and alpha calibrated on the validation split
    edit.save("runs/refusallm")           # stock mlx_lm folder + record + report
    print(edit.after.harmless.refusal_rate)

Every verb returns a plain dataclass. Long steps report through `progress(desc, total)`, a
context-manager factory yielding `update(n_items, n_tokens)` with what finished since the last
call (progress.py: the one progress protocol); the library never prints. The CLI (cli.py) is a shell over these verbs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import distributed, validate
from .directions import Directions
from .errors import UserError
from .evaluation import EvalReport
from .judge import MARKERS, Judge
from .loading import DEFAULT_PRESET, ModelInfo
from .progress import ProgressFactory, silent
from .template import ChatTemplate, read_chat_template, template_provenance

VOICE_PROMPTS = 48  # harmless train prompts the voice's response direction is read from
EXAMPLES = 5  # answers kept in the record, shown in the model card and README


@dataclass
class Model:
    """A loaded chat model: the mlx_lm model (float32 compute), its tokenizer and what it is."""

    model: object
    tokenizer: object
    info: ModelInfo


def load(spec: str = DEFAULT_PRESET, tensor_parallel: bool = False,
         note: Callable[[str], None] | None = None, chat_template: str | Path | None = None) -> Model:
    """A preset name, an mlx_lm folder, a .gguf file or a Hugging Face repo id -> Model.
    tensor_parallel: under mlx.launch, each rank loads its slice of every block.
    chat_template: a Jinja chat template file to render prompts with instead of the model's own
    (needed for a model without one); an edit of the model saves it into its folder.
    A model without a chat template, or a base (non-chat) model, is a UserError."""
    from .loading import load as load_folder

    if tensor_parallel and distributed.size() == 1:
        raise UserError("--tensor-parallel needs several ranks: start the command with mlx.launch -n N ...")
    template = read_chat_template(chat_template) if chat_template is not None else None
    return Model(*load_folder(spec, progress=note, tensor_parallel=tensor_parallel, chat_template=template))


def prompt_sets(harmful: str, harmless: str, split: str, limit: int | None = None):
    """The (harmful, harmless) PromptSets of `split`, each cut to at most `limit` prompts spread
    evenly through the set, so every category stays represented."""
    from .prompts import resolve_prompts

    return tuple(_spread(resolve_prompts(spec, split), limit) for spec in (harmful, harmless))


def _spread(pset, limit: int | None):
    n = len(pset)
    if not limit or limit >= n:
        return pset
    return dataclasses.replace(pset, prompts=tuple(pset.prompts[round(i * n / limit)] for i in range(limit)))


def compute_directions(m: Model, harmful: str = "harmful", harmless: str = "harmless", *, split: str | None = None,
                       positions: str = "last", system: str | None = None, batch_size: int = 32,
                       method: str = "auto", use_cache: bool = True,
                       progress: ProgressFactory | None = None, judge: Judge = MARKERS) -> Directions:
    """One candidate refusal direction per residual site (workflow.compute_directions for the
    methods). split: default the train split of a bundled set (its val and test splits stay held
    out) and all of a file. What the run measured is in `metadata["run"]`."""
    from .prompts import directions_split, resolve_prompts
    from .workflow import compute_directions as compute

    hset, lset = (resolve_prompts(spec, directions_split(spec, split)) for spec in (harmful, harmless))
    d, run = compute(m.model, m.tokenizer, m.info, hset, lset, positions, system, batch_size,
                     use_cache=use_cache, progress=progress, method=method, judge=judge)
    d.run = run
    return d


def write_directions(m: Model, d: Directions, out, harmful: str = "harmful", harmless: str = "harmless",
                     split: str | None = None, system: str | None = None, batch_size: int = 32,
                     use_cache: bool = True, progress: ProgressFactory | None = None) -> dict:
    """Write directions.safetensors, the layer ranking (ranking.json, ranking.png) and
    provenance.json to `out`. When both sets came from their train split, the held-back val split
    gives each layer's separation AUROC. Returns the provenance (with the AUROCs and file names)."""
    from .directions import save_directions
    from .prompts import directions_split
    from .select import heuristic_scores, rank_heuristic, write_ranking
    from .workflow import held_back_separation, write_provenance

    path = save_directions(d, out)
    jpath, ppath = write_ranking(heuristic_scores(d), rank_heuristic(d), out)
    splits = {"harmful": directions_split(harmful, split), "harmless": directions_split(harmless, split)}
    auc = None
    if set(splits.values()) == {"train"}:
        hval, lval = prompt_sets(harmful, harmless, "val")
        with (progress or silent)("separation (val)", 1) as update:
            auc = held_back_separation(m.model, m.tokenizer, m.info, d, hval, lval, system, batch_size, use_cache)
            auc = [round(float(a), 4) for a in auc]
            update(1)
    prov = {**d.metadata, "split": splits, "run": d.run, "outputs": [path.name, jpath.name, ppath.name],
            "separation_auroc_val": auc}
    write_provenance(out, prov)
    return prov


def check_directions(d: Directions, info: ModelInfo, where: str = "the directions") -> Directions:
    """`d`, if it fits the model: its shape, and the chat template it was computed under (recorded
    since its sha256 was; an older file passes)."""
    if d.directions.shape != (info.num_layers + 1, info.hidden_size):
        raise UserError(f"{where} hold directions of shape {d.directions.shape}, not "
                        f"({info.num_layers + 1}, {info.hidden_size}) for {info.spec}; compute them for this model")
    override = info.template_override
    validate.directions_template(where, d.metadata, info.chat_template, override.file if override else None)
    return d


def evaluate(m: Model, harmful: str = "harmful", harmless: str = "harmless", *, split: str = "test",
             base: Model | None = None, limit: int | None = None, max_tokens: int = 64, system: str | None = None,
             batch_size: int = 256, progress: ProgressFactory | None = None, judge: Judge = MARKERS) -> EvalReport:
    """Greedy answers to both sets, judged by `judge` (refusal, coherence, voice), per set and category; with
    `base`, the first-token KL(base || m) on the harmless prompts; `provenance` says what was
    evaluated."""
    hset, lset = prompt_sets(harmful, harmless, split, limit)
    if len(hset) == 0 or len(lset) == 0:
        raise UserError("a prompt set is empty after the split; use --split all or a larger prompt file")
    report = _evaluate(m, hset, lset, max_tokens, batch_size, system, progress, "eval",
                       base=None if base is None else (base.model, base.tokenizer), judge=judge)
    report.provenance.update({
        "model": _about(m.info),
        "base": None if base is None else {"spec": str(base.info.spec), "fingerprint": base.info.fingerprint},
        "prompts": {k: {"name": p.name, "split": split, "n": len(p), "sha256": p.sha256}
                    for k, p in (("harmful", hset), ("harmless", lset))}})
    if distributed.describe(m.model):
        report.provenance["distributed"] = distributed.describe(m.model)
    return report


def _about(info: ModelInfo) -> dict:
    return {"spec": str(info.spec), "fingerprint": info.fingerprint, "model_type": info.model_type,
            "chat_template": template_provenance(info.chat_template, info.template_override)}


def _evaluate(m: Model, hset, lset, max_tokens, batch_size, system, progress, desc, base=None, cache_key=None,
              judge: Judge = MARKERS, keep_logprobs: bool = False):
    from .evaluation import evaluate as judge_answers

    # a base model costs one more first-token pass over the harmless set; base log-probs cost none
    total = len(hset) + len(lset) + (len(lset) if isinstance(base, tuple) else 0)
    with (progress or silent)(desc, total) as update:
        return judge_answers(m.model, m.tokenizer, hset, lset, base=base, max_tokens=max_tokens,
                             batch_size=batch_size, progress=update, system=system, cache_key=cache_key,
                             judge=judge, keep_logprobs=keep_logprobs)


# ---------------------------------------------------------------------------------------------
# Edits. Each verb edits the model in memory, evaluates before and after on the test split, and
# returns an Edit; nothing is written until Edit.save.


@dataclass
class Edit:
    """An edited model and everything known about the edit: `record` (refusal_edit.json),
    the before/after reports, and what report.json adds (`details`). `model` is None for a
    streamed edit, which `save` rewrites from `source` shard by shard (`rewrite`)."""

    kind: str  # steer | ablate | project
    model: Model | None
    source: Path
    record: dict
    before: EvalReport | None = None
    after: EvalReport | None = None
    steering: list | None = None  # record.SteeringTerm, primary first
    rewrite: object = None  # stream_edit.Steering | Projection: the edit, for a shard-by-shard rewrite
    max_memory: int | None = None
    details: dict = field(default_factory=dict)
    target: float = 0.95  # what the plots mark: the refusal target of a steer, the KL bound of a search
    choice: object = None  # workflow.SteeringChoice of a steer
    layer_evals: list = field(default_factory=list)  # select.LayerEval of an evaluated layer choice
    search: object = None  # search.SearchResult of ablate --search
    chat_template: ChatTemplate | None = None  # --chat-template, saved into the edited folder

    @property
    def trials(self) -> list:
        """The calibration trials (select.AlphaTrial) of a steer, in order."""
        return self.choice.trials if self.choice is not None else []

    def save(self, out, force: bool = False, dtype: str = "bfloat16", progress: ProgressFactory | None = None,
             note: Callable[[str], None] | None = None) -> Path:
        """Write the edited model to `out` as a stock mlx_lm folder (atomically), with its record,
        model card and, when evaluated, report/ (report.json, report.md, alpha_sweep.png). Under
        mlx.launch only rank 0 writes."""
        from .save import save_model
        from .stream_edit import stream_edit

        out = Path(out)
        if not distributed.is_writer():
            return out
        if self.model is None or distributed.is_tensor_parallel(self.model.model):
            with (progress or silent)("rewrite tensors", 0) as update:
                stream_edit(self.source, out, self.rewrite, self.record, force, max_memory=self.max_memory,
                            progress=update, dtype=dtype, say=note,
                            chat_template=self.chat_template)
        else:
            save_model(self.model.model, self.source, out, self.record, steering=self.steering, force=force,
                       dtype=dtype, progress=note, chat_template=self.chat_template)
        self._write_report(out / "report")
        return out

    def _write_report(self, folder: Path) -> None:
        import json

        from .atomic import write_text_atomic
        from .evaluation import report_json, report_markdown
        from .select import plot_sweep

        from .search import plot_front

        if self.trials or self.search:
            folder.mkdir(parents=True, exist_ok=True)
        if self.trials:
            plot_sweep(self.trials, folder / "alpha_sweep.png", self.target)
        if self.search:
            plot_front(self.search, folder / "search_pareto.png", self.target)
        if self.after is None:
            return
        doc = {"before": report_json(self.before) if self.before else None, "after": report_json(self.after),
               **self.details}
        write_text_atomic(folder / "report.json", json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
        md = report_markdown(self.after, title="After the edit")
        if self.before:
            md = report_markdown(self.before, title="Before the edit") + "\n\n" + md
        write_text_atomic(folder / "report.md", md)


def _provenance(d: Directions, **fields) -> dict:
    return {**fields, "model": d.metadata.get("model"), "prompts": d.metadata.get("prompts")}


def _edited(kind: str, m: Model, record: dict, **parts) -> Edit:
    """The Edit of an in-memory edit of `m`, its record saying which chat template it was made with."""
    record["chat_template"] = template_provenance(m.info.chat_template, m.info.template_override)
    return Edit(kind, m, m.info.path, record, chat_template=m.info.template_override, **parts)


def _before(m: Model, hset, lset, max_tokens, gen_batch_size, system, progress, use_cache,
            judge: Judge = MARKERS):
    """The unedited model's first-token log-probs on the harmless prompts (a LazyLogprobs for the
    KL after: read off the first step of its own generation, or never computed where the KL is
    cached) and its report."""
    before = _evaluate(m, hset, lset, max_tokens, gen_batch_size, system, progress, "eval before",
                       cache_key=m.info.fingerprint if use_cache else None, judge=judge, keep_logprobs=True)
    return before.first_logprobs, before


def steer(m: Model, d: Directions, harmful: str = "harmful", harmless: str = "harmless", *,
          layer: int | None = None, alpha: float | None = None, alpha_multiple: float | None = None,
          select: str = "evaluate", candidates: int = 3, target: float = 0.95, margin: float = 0.1,
          calibration_prompts: int = 32, voice: str = "terse", voice_multiple: float = 0.2, system: str | None = None,
          batch_size: int = 32, eval_limit: int | None = None, max_tokens: int = 64, gen_batch_size: int = 256,
          use_cache: bool = True, progress: ProgressFactory | None = None,
          on_trial: Callable | None = None, judge: Judge = MARKERS) -> Edit:
    """A RefusaLLM: alpha x the refusal direction added as a bias at one layer's resid_pre, so
    the model refuses every request. Layer and alpha are calibrated on the validation split
    (workflow.choose_steering) unless given; `voice="explain"` adds a response-direction term.
    eval_limit: prompts per set in the before/after report (None: the whole test split; 0: none).
    judge: scores the layers, judges the calibration trials and the before/after reports."""
    from .edit import add_steering_bias, check_steerable
    from .record import SteeringTerm, array_sha256
    from .select import VoiceTarget, candidate_layers
    from .voice import response_direction
    from .workflow import choose_steering

    check_steer(alpha, alpha_multiple, voice, distributed.is_tensor_parallel(m.model))
    validate.layer("--layer", layer, m.info.num_layers)
    check_steerable(m.model, 1 if layer is None else layer)  # before the calibration (which tries layers > 0)
    check_directions(d, m.info)
    hval, lval = prompt_sets(harmful, harmless, "val")
    voice_rows = None
    if voice == "explain":
        _, ltrain = prompt_sets(harmful, harmless, "train")
        voice_rows = response_direction(m.model, m.tokenizer, ltrain.texts[:VOICE_PROMPTS], system=system,
                                        batch_size=batch_size)
    scored = layer is None and select == "evaluate"
    with ((progress or silent) if scored else silent)("score layers", len(candidate_layers(d.num_layers))) as update:
        choice = choose_steering(m.model, m.tokenizer, d, hval.texts, lval.texts, layer=layer, alpha=alpha,
                                 multiple=alpha_multiple, select=select, candidates=candidates, target=target,
                                 calibration_prompts=calibration_prompts, margin=margin, batch_size=batch_size,
                                 system=system, on_layers=update, on_trial=on_trial,
                                 voice=VoiceTarget() if voice == "explain" else None, voice_rows=voice_rows,
                                 voice_multiple=voice_multiple, cache_key=m.info.fingerprint if use_cache else None,
                                 judge=judge)

    hset, lset = prompt_sets(harmful, harmless, "test", eval_limit)
    base_lp = before = after = None
    if eval_limit != 0:
        base_lp, before = _before(m, hset, lset, max_tokens, gen_batch_size, system, progress, use_cache,
                                  judge)
    direction = np.asarray(d.directions[choice.layer], np.float32)
    terms = [SteeringTerm("refusal", choice.layer, direction, choice.alpha, choice.multiple), *choice.extra]
    site = add_steering_bias(m.model, choice.layer, terms[0].vector)
    for term in terms[1:]:
        add_steering_bias(m.model, term.layer, term.vector)  # a shared site: the vectors add
    if eval_limit != 0:
        after_key = None if not use_cache else {
            "weights": m.info.fingerprint,
            "bias": [{"layer": t.layer, "vector": array_sha256(np.asarray(t.vector, np.float32))} for t in terms]}
        after = _evaluate(m, hset, lset, max_tokens, gen_batch_size, system, progress, "eval after",
                          base=base_lp, cache_key=after_key, judge=judge)

    record = _provenance(
        d, edit="steer", layer=choice.layer, site=site, alpha=choice.alpha, alpha_multiple=choice.multiple,
        alpha_how=choice.how, select=select, scale=None, voice=voice,
        positions=d.metadata.get("positions"), system=system, direction_sha256=d.sha256(choice.layer),
        metrics=None if after is None else _steer_metrics(before, after))
    if after is not None:
        # A fixed rule, not a choice: the first harmless test prompts of the report.
        record["examples_rule"] = f"The first {EXAMPLES} harmless test prompts"
        record["examples"] = [{"prompt": r.prompt, "answer": r.answer}
                              for r in after.records if r.set == "harmless"][:EXAMPLES]
    record["distributed"] = distributed.describe(m.model)
    from .stream_edit import Steering

    details = {"choice": {"layer": choice.layer, "alpha": choice.alpha, "multiple": choice.multiple,
                          "how": choice.how, "voice": voice, "voice_met": choice.voice_met,
                          "candidates": choice.candidates, "trials": [t.__dict__ for t in choice.trials],
                          "layer_evals": [e.__dict__ for e in choice.layer_evals]}}
    return _edited("steer", m, record, before=before, after=after, steering=terms,
                   rewrite=Steering(choice.layer, direction, choice.alpha), details=details, target=target,
                   choice=choice)


def check_steer(alpha, alpha_multiple, voice: str = "terse", tensor_parallel: bool = False) -> None:
    """The steer options that need no model: the strength, and a voice the sharded save can hold."""
    check_strength(alpha, alpha_multiple)
    if voice == "explain" and tensor_parallel:
        # the sharded save rewrites one steering term from the source; the voice adds a second
        raise UserError("--voice explain cannot be combined with --tensor-parallel; drop one of them")


def check_strength(alpha, alpha_multiple) -> None:
    if alpha is not None and alpha_multiple is not None:
        raise UserError("--alpha and --alpha-multiple were both given; give only one of them")
    validate.finite("--alpha", alpha, positive=True)
    validate.finite("--alpha-multiple", alpha_multiple, positive=True, limit=validate.MAX_ALPHA_MULTIPLE)


def _steer_metrics(before: EvalReport, after: EvalReport) -> dict:
    return {"harmful_refusal": after.harmful.refusal_rate, "harmless_refusal": after.harmless.refusal_rate,
            "harmless_coherence": after.harmless.coherence_rate, "harmful_coherence": after.harmful.coherence_rate,
            "harmless_explained": after.harmless.explained_rate, "harmless_variety": after.harmless.variety,
            "before": {"harmful_refusal": before.harmful.refusal_rate,
                       "harmless_refusal": before.harmless.refusal_rate,
                       "harmless_explained": before.harmless.explained_rate,
                       "harmless_variety": before.harmless.variety}}


def project(m: Model, d: Directions, scale: float, harmful: str = "harmful", harmless: str = "harmless", *,
            layer: int | None = None, select: str = "evaluate", max_kl: float = 0.2,
            writer_layers: list[int] | None = None, per_layer: bool = False, norm_preserve: bool = False,
            system: str | None = None, batch_size: int = 32, eval_limit: int | None = None, max_tokens: int = 64,
            gen_batch_size: int = 256, use_cache: bool = True, progress: ProgressFactory | None = None,
            kind: str = "project", search_trials: int = 0, search_prompts: int = 32,
            judge: Judge = MARKERS) -> Edit:
    """W <- W - scale d d^T W for every matrix writing to the residual stream (the embedding,
    attention out and MLP down projections; of `writer_layers` only, if given). The direction is
    that of `layer`, else chosen by `select` ('evaluate': Arditi et al.'s bypass score with the
    harmless KL at most `max_kl`; 'heuristic': FailSpy's), or each layer's own with `per_layer`.
    search_trials > 0: the edit shape (direction site, per-layer kernels, projection, norm
    preservation) is found by `search.search` on the validation split instead; see `search_shape`.
    With an evaluation, the perplexity of plain paragraphs is measured before and after. `judge`
    scores the layers (its refusal openings), judges the search's answers and the reports."""
    from .edit import ablate as orthogonalize_writers
    from .select import ablation_layers, candidate_layers, rank_evaluated

    from .evaluation import perplexity
    from .prompts import capability_texts

    validate.finite("--scale", scale, limit=validate.MAX_SCALE)
    validate.layer("--layer", layer, m.info.num_layers)
    check_directions(d, m.info)
    check_search(search_trials, layer=layer is not None, per_layer=per_layer, layers=writer_layers is not None,
                 norm_preserve=norm_preserve, tensor_parallel=distributed.is_tensor_parallel(m.model))
    evals, found = [], None
    decided, chosen = layer_without_running(d, per_layer, layer, select)
    if search_trials:
        found = search_shape(m, d, harmful, harmless, search_trials, search_prompts, max_tokens, gen_batch_size,
                             system, max_kl, progress, judge)
        decided = True  # the direction is the chosen shape's (recorded under "search")
    if not decided:
        hval, lval = prompt_sets(harmful, harmless, "val")
        layers = candidate_layers(d.num_layers)
        with (progress or silent)("score layers", len(layers)) as update:
            # the first 32 of each validation set, as the layer scores have always been measured
            evals = ablation_layers(m.model, m.tokenizer, d, hval.texts[:32], lval.texts[:32], layers, batch_size,
                                    max_kl, system, update, m.info.fingerprint if use_cache else None, judge)
        ranked = rank_evaluated(evals, "bypass")
        if not ranked:
            raise UserError(f"every candidate layer's ablation moved the harmless first-token KL above {max_kl}; "
                            "pass --layer to choose one anyway, or raise --max-kl")
        chosen = ranked[0].layer
    directions = None if found else d.directions if per_layer else d.direction(chosen)

    hset, lset = prompt_sets(harmful, harmless, "test", eval_limit)
    base_lp = before = after = None
    ppl = {}
    if eval_limit != 0:
        base_lp, before = _before(m, hset, lset, max_tokens, gen_batch_size, system, progress, use_cache,
                                  judge)
        ppl["base"] = perplexity(m.model, m.tokenizer, capability_texts())
    if found is None:
        summary = orthogonalize_writers(m.model, directions, layers=writer_layers, scale=scale,
                                        norm_preserve=norm_preserve)
    else:
        from .search import apply_shape

        summary = apply_shape(m.model, d, found.chosen.shape)
    if eval_limit != 0:
        after = _evaluate(m, hset, lset, max_tokens, gen_batch_size, system, progress, "eval after", base=base_lp,
                          judge=judge)
        ppl["edited"] = perplexity(m.model, m.tokenizer, capability_texts())
    record = _projection_record(d, kind, chosen, per_layer, scale, norm_preserve, writer_layers, select, system)
    record["summary"] = summary.as_record()
    record["metrics"] = None if after is None else {
        "harmful_refusal": after.harmful.refusal_rate, "harmless_refusal": after.harmless.refusal_rate,
        "kl_mean": after.kl_mean, "harmful_degenerate": after.harmful.degenerate_rate, "perplexity": ppl,
        "before": {"harmful_refusal": before.harmful.refusal_rate, "harmless_refusal": before.harmless.refusal_rate}}
    if found is not None:
        record.update(layer=found.chosen.shape.direction_index, norm_preserve=found.chosen.shape.norm_preserve,
                      select="search", search=found.as_record())
    record["distributed"] = distributed.describe(m.model)
    rewrite = None if found else _projection(directions, scale, writer_layers, norm_preserve)
    return _edited(kind, m, record, before=before, after=after, rewrite=rewrite, layer_evals=evals, search=found,
                   details={"layer_evals": [e.__dict__ for e in evals], "perplexity": ppl}, target=max_kl)


def check_search(search_trials: int, **given: bool) -> None:
    """--search chooses the shape itself, on a model in memory: no option may fix part of it."""
    if search_trials and any(given.values()):
        raise UserError("--search chooses the direction, the layers' weights, the projection and norm preservation "
                        "itself, in memory; drop " + ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v))


def search_shape(m: Model, d: Directions, harmful: str, harmless: str, n_trials: int, n_prompts: int = 32,
                 max_tokens: int = 128, batch_size: int = 64, system: str | None = None, max_kl: float = 0.2,
                 progress: ProgressFactory | None = None, judge: Judge = MARKERS):
    """ablate --search: the optuna study (search.py) on `n_prompts` validation prompts per set,
    resumed from the cache when one with the same weights, directions, prompts and settings
    exists, its best candidates then judged again on the rest of the validation split
    (search.confirm); returns the search.SearchResult (trials, Pareto front, the choice and why)."""
    from .judge import cache_identity
    from .search import confirm, confirm_candidates, search, study_path

    hval, lval = prompt_sets(harmful, harmless, "val", n_prompts)
    hall, lall = prompt_sets(harmful, harmless, "val")
    storage, name = study_path({"weights": m.info.fingerprint, "directions": d.sha256(), "harmful": list(hval.texts),
                                "harmless": list(lval.texts), "max_tokens": max_tokens, "system": system,
                                "seed": 0, **cache_identity(judge)})
    with (progress or silent)("search", n_trials) as update:
        found = search(m.model, m.tokenizer, d, hval.texts, lval.texts, n_trials, storage, name, max_kl, max_tokens,
                       batch_size, system, 0, update, judge)
    seen = set(hval.texts) | set(lval.texts)
    held = [t for t in hall.texts if t not in seen], [t for t in lall.texts if t not in seen]
    candidates = confirm_candidates(found, max_kl)
    if not candidates or not all(held):
        return found
    with (progress or silent)("confirm on held-out val", len(candidates)) as update:
        return confirm(m.model, m.tokenizer, d, found, name, *held, (len(hval), len(lval)), max_kl, max_tokens,
                       batch_size, system, update, judge)


def ablate(m: Model, d: Directions, harmful: str = "harmful", harmless: str = "harmless", **options) -> Edit:
    """Abliterate: project the refusal direction out of every residual writer (`project` with
    scale 1), so the model stops refusing."""
    return project(m, d, 1.0, harmful, harmless, kind="ablate", **options)


def layer_without_running(d: Directions, per_layer: bool, layer: int | None, select: str) -> tuple[bool, int | None]:
    """(decided, layer whose direction is used; None = each layer's own) when the choice needs no
    model run: per_layer, a given layer or select='heuristic'. (False, None) for 'evaluate'."""
    from .select import candidate_layers, rank_heuristic

    if per_layer:
        return True, None
    if layer is not None:
        return True, layer
    if select == "heuristic":
        allowed = set(candidate_layers(d.num_layers))
        return True, next(s.layer for s in rank_heuristic(d) if s.layer in allowed)
    return False, None


def _projection(directions, scale, writer_layers, norm_preserve):
    from .stream_edit import Projection

    return Projection(directions, scale, None if writer_layers is None else tuple(writer_layers), norm_preserve)


def _projection_record(d, kind, chosen, per_layer, scale, norm_preserve, writer_layers, select, system) -> dict:
    return _provenance(
        d, edit=kind, layer=chosen, per_layer=per_layer, site="residual writers", alpha=None, scale=scale,
        norm_preserve=norm_preserve, writer_layers=writer_layers, select=select,
        positions=d.metadata.get("positions"), system=system,
        direction_sha256=d.sha256(None if per_layer else chosen), summary=None, metrics=None)


# Streamed edits: the model is never loaded whole (it does not fit in memory), so nothing is
# chosen by running it and nothing is evaluated; `save` rewrites the shards from the source.


def _streamed(kind: str, folder: Path, record: dict, chat_template: str | Path | None, **parts) -> Edit:
    """The Edit of a streamed edit of `folder`, with the chat template it keeps (the model's own,
    or the `chat_template` file, checked like a load would) in its record and its folder."""
    from .loading import chat_tokenizer

    template = read_chat_template(chat_template) if chat_template is not None else None
    tokenizer = chat_tokenizer(folder, template)
    record["chat_template"] = template_provenance(tokenizer.chat_template, template)
    return Edit(kind, None, Path(folder), record, chat_template=template, **parts)


def streamed_steer(folder: Path, d: Directions, layer: int | None, alpha: float | None = None,
                   alpha_multiple: float | None = None, max_memory: int | None = None,
                   system: str | None = None, chat_template: str | Path | None = None) -> Edit:
    from .stream_edit import Steering

    check_strength(alpha, alpha_multiple)
    if layer is None or (alpha is None and alpha_multiple is None):
        raise UserError("a streamed steer needs --layer and --alpha or --alpha-multiple (choosing them runs the model)")
    direction = np.asarray(d.direction(layer), np.float32)
    a = float(alpha) if alpha is not None else float(alpha_multiple) * float(d.mean_norm[layer])
    record = _provenance(d, edit="steer", layer=layer, alpha=a, alpha_multiple=a / float(d.mean_norm[layer]),
                         alpha_how="given", select=None, scale=None,
                         positions=d.metadata.get("positions"), system=system, direction_sha256=d.sha256(layer),
                         metrics=None)
    return _streamed("steer", folder, record, chat_template, rewrite=Steering(layer, direction, a),
                     max_memory=max_memory)


def streamed_project(folder: Path, d: Directions, scale: float, *, layer: int | None = None,
                     select: str = "heuristic", writer_layers: list[int] | None = None, per_layer: bool = False,
                     norm_preserve: bool = False, max_memory: int | None = None,
                     system: str | None = None, kind: str = "project",
                     chat_template: str | Path | None = None) -> Edit:
    validate.finite("--scale", scale, limit=validate.MAX_SCALE)
    decided, chosen = layer_without_running(d, per_layer, layer, select)
    if not decided:
        raise UserError("a streamed edit needs --layer, --per-layer or --select heuristic "
                        "(--select evaluate runs the model)")
    directions = d.directions if per_layer else d.direction(chosen)
    record = _projection_record(d, kind, chosen, per_layer, scale, norm_preserve, writer_layers, select, system)
    return _streamed(kind, folder, record, chat_template,
                     rewrite=_projection(directions, scale, writer_layers, norm_preserve), max_memory=max_memory)


def export_onnx(model_folder, out_dir, dtypes: str = "int8", *, layer: int | None = None, force: bool = False,
                with_page: bool = False, note: Callable[[str], None] | None = None,
                chat_template: str | Path | None = None, share_embedding: str = "auto"):
    """The model folder (an edited one, or a preset) as a transformers.js bundle for the browser
    page; with_page also copies the page in, ready for any static host.
    chat_template: a Jinja chat template file the bundle carries for the page to render with; by
    default the one the folder's edit was made under (its record), else the folder's own. Either
    is checked as a load checks it, before any graph is built: the page needs a chat model's template.
    share_embedding: auto | always | never, whether an untied model's int8 graph keeps one matrix for
    the embedding and the lm_head when they are two roundings of one (onnx/share.py)."""
    from .loading import chat_tokenizer, resolve
    from .onnx import export_onnx as export
    from .onnx import parse_dtypes
    from .onnx.share import check_mode
    from .serve import PAGE_DIR, page_with_runtime
    from .template import recorded_template

    template = read_chat_template(chat_template) if chat_template is not None else None
    parse_dtypes(dtypes)
    check_mode(share_embedding)
    model_folder = resolve(model_folder, progress=note)
    # before the weights are read: the graph's activations output may also be the final residual
    validate.layer("--layer", layer, validate.model_config(model_folder).get("num_hidden_layers"),
                   final_residual=True)
    if with_page and not (PAGE_DIR / "index.html").is_file():
        raise UserError(f"--with-page: no page in {PAGE_DIR} (index.html missing); restore export/ from the repository")
    if template is None:
        template = recorded_template(model_folder)
    chat_tokenizer(model_folder, template)
    # an installed package's page gets its runtime in the cache, as `serve` does
    page = page_with_runtime(PAGE_DIR, note) if with_page else None
    return export(model_folder, out_dir, dtypes=dtypes, force=force, progress=note, layer=layer, page_dir=page,
                  chat_template=template.text if template is not None else None, share_embedding=share_embedding)

"""Evaluation: greedy batched generation, first-token KL, refusal, coherence and voice rates, reports.

Generation runs on the batched engine (mlx_refusal.batching: shared template prefix, length
buckets, padding, greedy decoding). Only the positions we read go through the output projection
(vocabulary-sized: 136M multiply-adds per token on Qwen2.5-0.5B, as much as the rest of the model).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

from . import arch, distributed
from .batching import (BasePass, Steering, Stop, check_nonempty, generate_batched, length_sorted_batches,
                       log_softmax, prefill, right_padded, shared_prefix)
from .errors import UserError
from .judge import MARKERS, Judge
from .progress import Update
from .template import encode_chat

# ---------------------------------------------------------------------------------------------
# Forward passes on padded batches


def eos_token_ids(tokenizer) -> set[int]:
    """Every id that ends an answer: mlx_lm's wrapper merges generation_config's list with the
    tokenizer's own eos token."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(i) for i in ids}
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _logits_at(model, tokens: mx.array, cache: list, last: mx.array | None = None) -> mx.array:
    """Logits [batch, vocab] at column `last[b]` of each row of `tokens` (default: the final
    column), filling `cache`. Only those positions go through the model's head (`arch.logits`)."""

    def pick(x):
        return x[:, -1, :] if last is None else x[mx.arange(x.shape[0]), last]

    return arch.logits(model, pick(arch.decoder(model)(tokens, cache=cache)))


def generate_tokens(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_tokens: int = 64,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    batch_size: int = 16,
    pad_id: int = 0,
    progress: Update | None = None,
    stop: Stop | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, eos excluded) of already-encoded prompts, in input order.
    `stop` may end rows early (see `Stop`); their continuations are then shorter."""
    return generate_batched(model, partial(_logits_at, model), prompt_ids, max_tokens, eos_ids, batch_size, pad_id,
                            progress, stop)[0]


def _generate_text(model, tokenizer, prompts, max_tokens, batch_size, system, progress, stop, first_logprobs,
                   steer: Steering | None = None):
    """(answers, first-token log-probs or None) in prompt order, with `steer`'s vectors added.
    Under `mlx.launch` each data-parallel rank generates its share and every rank gets all of both."""
    def run(part):
        ids, firsts = generate_batched(model, partial(_logits_at, model), encode_chat(tokenizer, part, system),
                                       max_tokens, eos_token_ids(tokenizer), batch_size, _pad_id(tokenizer), progress,
                                       stop, first_logprobs, steer)
        return [tokenizer.decode(t) for t in ids], firsts

    group = distributed.data_group(model)
    if group is None:
        return run(list(prompts))
    mine = (distributed.share_of_rows if first_logprobs else distributed.share)(prompts, group)
    texts, firsts = run(mine) if mine else ([], None)
    texts = distributed.gather_json(texts, len(prompts), group)
    return texts, distributed.gather_rows(firsts, len(prompts), group) if first_logprobs else None


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    progress: Update | None = None,
    stop: Stop | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (user turns in the chat template), in input order."""
    return _generate_text(model, tokenizer, prompts, max_tokens, batch_size, system, progress, stop, False)[0]


def generate_with_logprobs(model, tokenizer, prompts: Sequence[str], max_tokens: int = 64, batch_size: int = 16,
                           system: str | None = None, progress: Update | None = None) -> tuple[list[str], mx.array]:
    """`generate`, and the log-softmax of each prompt's first-token distribution [n, vocab] from
    the same prefill (what `first_token_logprobs` computes, without a second pass)."""
    return _generate_text(model, tokenizer, prompts, max_tokens, batch_size, system, progress, None, True)


def first_token_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 16,
    system: str | None = None,
    progress: Update | None = None,
) -> mx.array:
    """log-softmax of the next-token distribution at the end of each chat-templated prompt: [n, vocab]."""
    return _generate_text(model, tokenizer, prompts, 0, batch_size, system, progress, None, True)[1]


def steered_first_token_logprobs(model, tokenizer, prompts: Sequence[str], vectors: Mapping[int, "np.ndarray"],
                                 batch_size: int = 16, system: str | None = None, base: BasePass | None = None):
    """(layer, `first_token_logprobs` with vectors[layer] added at resid_pre of that layer) for
    each layer in turn, as a generator (one [n, vocab] array alive at a time).

    A vector added at layer L changes nothing below L, so the blocks below every L run once: the
    prompts' unsteered pass (`base`, a batching.BasePass that recorded the layers, or one made
    here) records the input of every block L, and L's pass resumes there with the vector added.
    Only the shared template prefix, a few tokens, is run whole for each L, so that every
    layer's cache holds it steered. The result is the plain steered pass's, to float32 rounding;
    the work is the blocks from L on."""
    layers = sorted(vectors)
    kept = base if base is not None else BasePass(lay for lay in layers if lay > 0)

    def run(part: list[str]):
        ids = encode_chat(tokenizer, part, system)
        check_nonempty(ids)
        batches = length_sorted_batches([len(p) for p in ids], batch_size)
        logits_at, pad = partial(_logits_at, model), _pad_id(tokenizer)
        rows = None
        for lay in layers:
            steer = Steering([(lay, vectors[lay])], kept)
            resume = steer.resumes(model, ids)
            if resume and rows is None:
                rows = kept.rows(model, ids, pad, batch_size)  # before the vector is in place
            out: list[mx.array | None] = [None] * len(ids)
            with steer.added(model):
                prefix = shared_prefix(model, ids, keep=2)
                for idx in batches:
                    batch = [ids[i] for i in idx]
                    logits = (kept.resumed_logits(model, lay, [rows[i] for i in idx], batch, prefix, logits_at, pad)
                              if resume else prefill(model, logits_at, batch, prefix, pad))
                    lp = log_softmax(logits)
                    mx.eval(lp)
                    for j, i in enumerate(idx):
                        out[i] = lp[j]
            yield lay, mx.stack(out)

    group = distributed.data_group(model)
    if group is None:
        yield from run(list(prompts))
        return
    for lay, lp in run(distributed.share_of_rows(prompts, group)):
        yield lay, distributed.gather_rows(lp, len(prompts), group)


class LazyLogprobs:
    """First-token log-probs [n, vocab], computed on first call: a warm cache may never need them.
    `key` names their content (the cached answers they go with) for caches of what is computed
    from them; None where there is no name. Computing runs the model as it is at the call, so
    one that outlives an edit of the model must hold its values already (`kept`)."""

    def __init__(self, compute: Callable[[], mx.array], key: str | None = None):
        self._compute, self.key, self._value = compute, key, None

    @classmethod
    def of(cls, value: mx.array, key: str | None = None) -> "LazyLogprobs":
        lazy = cls(lambda: value, key)
        lazy._value = value
        return lazy

    def __call__(self) -> mx.array:
        if self._value is None:
            self._value = self._compute()
        return self._value

    def kept(self) -> "LazyLogprobs":
        """These log-probs with their values in hand, so the model may change: read back from the
        cache where a named run stored them, else computed now (and stored, when named)."""
        from . import memo

        if self._value is None and self.key is not None:
            stored = memo.recall_array("first-logprobs", self.key)
            # every rank must take the same branch: computing runs collectives
            if distributed.everyone(stored is not None and stored.ndim == 2, distributed.world()):
                return LazyLogprobs.of(mx.array(stored), self.key)
        value = self()
        if self.key is not None and distributed.is_writer():
            memo.remember_array("first-logprobs", self.key, np.array(value))
        return self


def kl_divergence(base_logprobs: mx.array, logprobs: mx.array) -> mx.array:
    """KL(base || model) per row, in nats, from log-probabilities [n, vocab]."""
    if base_logprobs.shape != logprobs.shape:
        raise UserError(
            f"base and model distributions differ in shape {tuple(base_logprobs.shape)} vs "
            f"{tuple(logprobs.shape)}; compare models that share a tokenizer and prompts"
        )
    p = mx.exp(base_logprobs)
    # 0 * log 0 = 0: a token the base never emits contributes nothing, even at -inf.
    terms = mx.where(p > 0, p * (base_logprobs - logprobs), 0.0)
    # KL >= 0; float32 rounding can leave -1e-7 for identical distributions.
    return mx.maximum(mx.sum(terms, axis=-1), 0.0)


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every token of `texts`, read as plain
    text (no chat template): how well the model still predicts ordinary prose. Rows are
    right-padded, which a causal model never sees, and the padding is left out of the mean."""
    ids = [list(tokenizer.encode(t)) for t in texts]
    check_nonempty(ids)
    nll, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        tokens, padding = right_padded(batch)
        mask = mx.array([[1.0] * (len(r) - 1) + [0.0] * p for r, p in zip(batch, padding)])
        lp = log_softmax(model(tokens[:, :-1]))
        picked = mx.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
        nll -= float((picked * mask).sum().item())
        count += int(mask.sum().item())
    return math.exp(nll / count) if count else math.nan


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass
class Record:
    set: str  # "harmful" or "harmless"
    prompt: str
    category: str
    answer: str
    refused: bool
    coherent: bool
    distinct3: float
    max_4gram_repeats: int
    names_request: bool = False  # shares a content word with the prompt
    safety_reason: str | None = None  # the word that gives a safety reason, if any
    explained: bool = False  # refused, coherent, names the request, gives a reason, long enough
    kl: float | None = None  # first-token KL(base || model), harmless prompts with a base only
    kind: str = "complied"  # the judge's verdict kind (judge.verdict): refusal, delayed, soft, ... loop, empty
    evidence: str | None = None  # what decided it
    degenerate: bool = False  # empty or looping: neither a refusal nor an answer


@dataclass
class CategoryStats:
    n: int
    refused: int
    coherent: int
    explained: int = 0
    degenerate: int = 0

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.n if self.n else math.nan

    @property
    def coherence_rate(self) -> float:
        return self.coherent / self.n if self.n else math.nan


@dataclass
class SetStats:
    name: str
    n: int
    refusal_rate: float
    coherence_rate: float
    mean_distinct3: float
    explained_rate: float = math.nan
    variety: float = math.nan  # distinct 8-word openings / answers
    named_rate: float = math.nan
    reason_rate: float = math.nan
    degenerate_rate: float = math.nan  # empty or looping answers (not counted as refusals)
    kinds: dict[str, int] = field(default_factory=dict)  # answers per verdict kind
    categories: dict[str, CategoryStats] = field(default_factory=dict)


@dataclass
class EvalReport:
    harmful: SetStats
    harmless: SetStats
    kl_mean: float | None  # mean first-token KL(base || model) over harmless prompts
    kl_max: float | None
    records: list[Record]
    settings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # what was evaluated: model, base, prompts
    criteria: str = ""  # the judge's account of its verdicts (Judge.criteria), for the Markdown report
    # the evaluated model's own first-token log-probs on the harmless prompts (a LazyLogprobs),
    # when asked for (keep_logprobs): the base distribution of a later KL, at no extra forward
    # pass when the answers were generated, and none at all when that KL is cached too
    first_logprobs: object = field(default=None, repr=False, compare=False)

    @property
    def sets(self) -> list[SetStats]:
        return [self.harmful, self.harmless]


def _texts_and_categories(prompts) -> tuple[str, list[str], list[str]]:
    """(name, texts, categories) of a PromptSet, or of a plain list of strings."""
    if hasattr(prompts, "texts"):
        return prompts.name, list(prompts.texts), list(prompts.categories)
    texts = [str(p) for p in prompts]
    return "", texts, [""] * len(texts)


def _set_stats(name: str, records: list[Record], judge: Judge = MARKERS) -> SetStats:
    n = len(records)

    def rate(flags) -> float:
        return sum(flags) / n if n else math.nan

    cats: dict[str, CategoryStats] = {}
    for r in records:
        c = cats.setdefault(r.category or "-", CategoryStats(0, 0, 0))
        c.n += 1
        c.refused += r.refused
        c.coherent += r.coherent
        c.explained += r.explained
        c.degenerate += r.degenerate
    return SetStats(
        name=name,
        n=n,
        refusal_rate=rate(r.refused for r in records),
        coherence_rate=rate(r.coherent for r in records),
        mean_distinct3=sum(r.distinct3 for r in records) / n if n else math.nan,
        explained_rate=rate(r.explained for r in records),
        variety=judge.variety(r.answer for r in records),
        named_rate=rate(r.names_request for r in records),
        reason_rate=rate(r.safety_reason is not None for r in records),
        degenerate_rate=rate(r.degenerate for r in records),
        kinds=dict(sorted(Counter(r.kind for r in records).items())),
        categories=dict(sorted(cats.items())),
    )


def evaluate(
    model,
    tokenizer,
    harmful,
    harmless,
    base=None,
    max_tokens: int = 64,
    batch_size: int = 16,
    progress: Update | None = None,
    system: str | None = None,
    cache_key: str | None = None,
    judge: Judge = MARKERS,
    keep_logprobs: bool = False,
) -> EvalReport:
    """Generate answers to both sets and judge them (`judge`: refusal, coherence, voice); with
    `base` (a (model, tokenizer) pair, base log-probabilities [n_harmless, vocab] from
    `first_token_logprobs`, or a LazyLogprobs such as another report's `first_logprobs`), also
    the first-token KL(base || model) on the harmless prompts.

    `cache_key` (a name for the weights: the model's fingerprint, with any edit made in memory
    described beside it) keeps the greedy answers on disk, so evaluating the same model on the
    same prompts again is instant; with a named LazyLogprobs `base`, the KL is kept too. Never
    pass the bare fingerprint for a model edited in memory (it is the unedited one's).

    `harmful` / `harmless` are PromptSets (or lists of strings). `progress` (a progress.Update)
    counts prompts: both sets are generated in one pass (the model's first-token log-probs come from its
    prefill), then the base's first-token pass when `base` is a model. `keep_logprobs` keeps the
    model's harmless first-token log-probs in the report (`first_logprobs`).
    """
    h_name, h_texts, h_cats = _texts_and_categories(harmful)
    s_name, s_texts, s_cats = _texts_and_categories(harmless)
    want_kl = base is not None and bool(s_texts)

    # Both sets in one call, so they share batches; the harmless first-token distributions come
    # from the same prefill that starts generation.
    texts = h_texts + s_texts
    both, lp = generate_cached(model, tokenizer, texts, max_tokens, batch_size, system, progress, cache_key,
                               want_kl or (keep_logprobs and bool(s_texts)), logprobs_from=len(h_texts))
    answers = {"harmful": both[: len(h_texts)], "harmless": both[len(h_texts):]}

    kls: list[float | None] = [None] * len(s_texts)
    if want_kl:
        kls = _first_token_kl(model, tokenizer, s_texts, base, lp, batch_size, system, progress)

    records = []
    for name, texts, cats in (("harmful", h_texts, h_cats), ("harmless", s_texts, s_cats)):
        for i, (text, cat, answer) in enumerate(zip(texts, cats, answers[name])):
            c, judged = judge.coherence(answer), judge.verdict(answer)
            v = judge.voice(text, answer, judged.refused, c.coherent)
            records.append(Record(
                set=name, prompt=text, category=cat, answer=answer, refused=judged.refused,
                coherent=c.coherent, distinct3=c.distinct3, max_4gram_repeats=c.max_4gram_repeats,
                names_request=v.names_request, safety_reason=v.safety_reason, explained=v.explained,
                kl=kls[i] if name == "harmless" else None, kind=judged.kind, evidence=judged.evidence,
                degenerate=judged.degenerate,
            ))
    present = [k for k in kls if k is not None]
    return EvalReport(
        harmful=_set_stats(h_name or "harmful", [r for r in records if r.set == "harmful"], judge),
        harmless=_set_stats(s_name or "harmless", [r for r in records if r.set == "harmless"], judge),
        kl_mean=sum(present) / len(present) if present else None,
        kl_max=max(present) if present else None,
        records=records,
        settings={
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "system": system,
            "decoding": "greedy",
            "judge": judge.settings(),
        },
        criteria=judge.criteria(),
        first_logprobs=lp.kept() if keep_logprobs and lp is not None else None,
    )


def _first_token_kl(model, tokenizer, texts, base, lp: LazyLogprobs, batch_size, system, progress) -> list[float]:
    """KL(base || model) of each prompt's first token; kept on disk when both sides are named
    (a LazyLogprobs with a key), so a warm run computes neither distribution."""
    from . import memo

    named = isinstance(base, LazyLogprobs) and base.key is not None and lp.key is not None
    digest = memo.key(model=lp.key, base=base.key) if named else None
    kls = memo.recall("first-token-kl", digest) if digest else None
    # every rank must take the same branch: the log-probs below run collectives
    if distributed.everyone(isinstance(kls, list) and len(kls) == len(texts), distributed.world()):
        return kls
    if isinstance(base, LazyLogprobs):
        base_lp = base()
    elif isinstance(base, mx.array):
        base_lp = base
    else:
        base_model, base_tok = base
        base_lp = first_token_logprobs(base_model, base_tok, texts, batch_size, system, progress)
    if base_lp.shape[0] != len(texts):
        raise UserError(
            f"base log-probabilities have {base_lp.shape[0]} rows for {len(texts)} harmless "
            "prompts; compute them on the same prompts"
        )
    kls = [float(x) for x in kl_divergence(base_lp, lp()).tolist()]
    if digest and distributed.is_writer():
        memo.remember("first-token-kl", digest, kls)
    return kls


def generate_cached(model, tokenizer, texts, max_tokens, batch_size, system, progress, cache_key,
                    first_logprobs: bool = False, stop: Stop | None = None, logprobs_from: int = 0,
                    steer: Steering | None = None):
    """(answers, a LazyLogprobs of the first-token log-probs [n - logprobs_from, vocab] of
    texts[logprobs_from:], or None), with `steer`'s vectors added (batching.Steering). With
    `cache_key` (a JSON-able value naming the weights, any intervention, and `stop` when given)
    the answers are kept on disk (memo) and the log-probs are named by them; on a hit the
    log-probs cost one prefill of those texts, if they are ever asked for."""
    from . import memo

    if steer is not None and first_logprobs:  # a hit would compute them without the vectors
        raise ValueError("first-token log-probs of a steered generation are not kept; add the vectors to the model")

    def run():
        answers, lp = _generate_text(model, tokenizer, texts, max_tokens, batch_size, system, progress, stop,
                                     first_logprobs, steer)
        return answers, None if lp is None else lp[logprobs_from:]

    if cache_key is None:
        answers, lp = run()
        return answers, None if lp is None else LazyLogprobs.of(lp)
    digest = memo.key(model=cache_key, max_tokens=max_tokens, system=system,
                      template=getattr(tokenizer, "chat_template", None), texts=list(texts))
    lp_key = memo.key(answers=digest, rows_from=logprobs_from) if first_logprobs else None
    answers = memo.recall("generations", digest)
    # every rank must take the same branch: generating runs collectives
    if distributed.everyone(isinstance(answers, list) and len(answers) == len(texts), distributed.world()):
        if progress:
            progress(len(texts))
        lp = None
        if first_logprobs:
            lp = LazyLogprobs(lambda: first_token_logprobs(model, tokenizer, texts[logprobs_from:], batch_size, system),
                              lp_key)
        return answers, lp
    answers, lp = run()
    if distributed.is_writer():
        memo.remember("generations", digest, answers)
    return answers, None if lp is None else LazyLogprobs.of(lp, lp_key)


def _jsonable(x: float | None):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def report_json(report: EvalReport) -> dict:
    """Plain JSON-ready dict: settings, per-set and per-category rates, KL, every record."""
    sets = {}
    for key, s in (("harmful", report.harmful), ("harmless", report.harmless)):
        sets[key] = {
            "name": s.name,
            "n": s.n,
            "refusal_rate": _jsonable(s.refusal_rate),
            "coherence_rate": _jsonable(s.coherence_rate),
            "mean_distinct3": _jsonable(s.mean_distinct3),
            "explained_rate": _jsonable(s.explained_rate),
            "variety": _jsonable(s.variety),
            "names_request_rate": _jsonable(s.named_rate),
            "safety_reason_rate": _jsonable(s.reason_rate),
            "degenerate_rate": _jsonable(s.degenerate_rate),
            "kinds": s.kinds,
            "categories": {
                c: {"n": v.n, "refused": v.refused, "refusal_rate": _jsonable(v.refusal_rate),
                    "coherence_rate": _jsonable(v.coherence_rate), "explained": v.explained,
                    "degenerate": v.degenerate}
                for c, v in s.categories.items()
            },
        }
    return {
        **report.provenance,
        "settings": report.settings,
        "sets": sets,
        "first_token_kl": None if report.kl_mean is None else {"mean": report.kl_mean, "max": report.kl_max},
        "records": [asdict(r) for r in report.records],
    }


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _cell(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("|", "\\|")


def _num(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def report_markdown(report: EvalReport, title: str = "Evaluation") -> str:
    """A Markdown page: summary table, per-category table, KL, then every answer."""
    lines = [f"# {title}", ""]
    s = report.settings
    lines += [
        f"Greedy decoding, {s.get('max_tokens')} new tokens at most. {report.criteria}",
        "",
        "| set | prompts | refused | degenerate | coherent | explained | names request | safety reason | variety | "
        "mean distinct-3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, st in (("harmful", report.harmful), ("harmless", report.harmless)):
        lines.append(f"| {key} | {st.n} | {_pct(st.refusal_rate)} | {_pct(st.degenerate_rate)} | "
                     f"{_pct(st.coherence_rate)} | "
                     f"{_pct(st.explained_rate)} | {_pct(st.named_rate)} | {_pct(st.reason_rate)} | "
                     f"{_num(st.variety)} | {_num(st.mean_distinct3)} |")
    lines.append("")
    for key, st in (("harmful", report.harmful), ("harmless", report.harmless)):
        lines.append(f"Verdicts on {key} answers: " + ", ".join(f"{k} {n}" for k, n in st.kinds.items()) + ".")
    lines.append("")
    if report.kl_mean is not None:
        lines += [f"First-token KL(base || model) on harmless prompts: mean {report.kl_mean:.4f}, "
                  f"max {report.kl_max:.4f} nats.", ""]
    lines += ["## By category", "", "| set | category | prompts | refused | coherent | explained |",
              "|---|---|---:|---:|---:|---:|"]
    for key, st in (("harmful", report.harmful), ("harmless", report.harmless)):
        for cat, c in st.categories.items():
            lines.append(f"| {key} | {_cell(cat, 60)} | {c.n} | {_pct(c.refusal_rate)} | {_pct(c.coherence_rate)} | "
                         f"{_pct(c.explained / c.n if c.n else math.nan)} |")
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines += ["", "## Answers", "", "| set | category | prompt | answer | verdict | coherent | explained |",
              "|---|---|---|---|---|---|---|"]
    for r in report.records:
        lines.append(f"| {r.set} | {_cell(r.category, 40)} | {_cell(r.prompt, 120)} | {_cell(r.answer)} | "
                     f"{r.kind} | {yes(r.coherent)} | {yes(r.explained)} |")
    return "\n".join(lines) + "\n"

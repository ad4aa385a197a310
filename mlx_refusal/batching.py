"""The batched forward and generation engine that capture, selection scores, calibration and
evaluation all run on.

Shared prefix. Every chat-templated prompt starts with the same tokens (system prompt, role
header: 24 of ~44 tokens on Qwen2.5). `shared_prefix` runs them once; `batch_cache` copies their
keys and values into one `BatchKVCache` per layer for each batch.

Length buckets. `length_sorted_batches` groups prompts of similar length, so little is spent on
padding.

Padding. Behind the prefix a forward pass is right-padded (`right_padded`): with a causal mask a
real token never attends to a pad that comes after it, so each real token sits at its true
position and needs no padding mask. Capture and `prefill` (first-token distributions: selection
scores, calibration, KL) read positions and stop there, and only the positions read go through
the output projection. Generation (`decode_greedy`) is mlx_lm's `BatchGenerator`, handed the
prefix's caches for every row: it rotates the padding to the front of each row (left padding),
which its `BatchKVCache` masks while decoding, and every sequence keeps its own RoPE offset, so
a padded sequence sees what it would see alone. eos ids are its stop tokens, and a `stop`
callback removes rows from it. Measured before the switch on Qwen2.5-Coder-0.5B (float32, CPU,
16 harmless prompts x 64 tokens, bench/batch_generator.py): our own loop 53.3 s, BatchGenerator
with the prefix caches 51.0 s (0.96x), on whole prompts 72.0 s (1.35x); the tokens of all 16 rows
were identical.

Steered runs. A vector added at block L changes nothing below L, so a `Steering` with a
`BasePass` runs the unsteered model over its prompts once (`BasePass.rows`) and every steered
run over them after that (a calibration sweep runs the same prompts at many strengths) takes the
keys and values of the blocks below L, and the input of block L, from there: its prefill runs
only the blocks from L on (`BasePass.resumed`).

Greedy decoding is argmax, so batched and one-at-a-time runs give the same text unless two
logits tie to within float32 rounding (different batch shapes round differently).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from . import arch
from .errors import UserError
from .progress import Update
from .template import common_prefix_len

# Shorter shared prefixes are not worth a separate forward pass.
MIN_SHARED_PREFIX = 4

# How often (in decode steps) a `stop` callback sees the rows still generating.
STOP_CHECK_EVERY = 4

# stop(tokens, live): given {row: tokens so far} of every row of the batch and the rows still
# generating, the rows to stop now
Stop = Callable[[dict[int, list[int]], set[int]], Iterable[int]]

# logits_at(tokens, cache, last): logits [batch, vocab] at column last[b] of each row of `tokens`
# (None: the final column), after running the decoder on them with `cache`
LogitsAt = Callable[[mx.array, list, "mx.array | None"], mx.array]


def shared_prefix_len(seqs: Sequence[Sequence[int]], keep: Sequence[int] | int = 1) -> int:
    """Tokens every sequence starts with, leaving at least `keep` tokens (per sequence, or one
    number for all) of each outside the prefix: those are the positions a caller reads."""
    if not seqs:
        return 0
    keeps = [keep] * len(seqs) if isinstance(keep, int) else list(keep)
    n = min(len(s) - k for s, k in zip(seqs, keeps))
    for s in seqs[1:]:
        n = min(n, common_prefix_len(seqs[0], s))
    n = max(n, 0)
    return n if n >= MIN_SHARED_PREFIX else 0


@dataclass
class SharedPrefix:
    """Keys and values of the tokens every prompt of a call starts with, computed once."""

    length: int
    caches: list[KVCache] | None  # one batch-1 KVCache per layer; None when nothing is shared


def shared_prefix(model, seqs: Sequence[Sequence[int]], keep: Sequence[int] | int = 1) -> SharedPrefix:
    """Run the tokens all of `seqs` start with (see `shared_prefix_len` for `keep`)."""
    n = shared_prefix_len(seqs, keep)
    if n == 0:
        return SharedPrefix(0, None)
    caches = [KVCache() for _ in arch.layers(model)]
    arch.decoder(model)(mx.array([list(seqs[0][:n])], dtype=mx.int32), cache=caches)
    mx.eval([a for c in caches for a in (c.keys, c.values)])
    return SharedPrefix(n, caches)


def batch_cache(model, prefix: SharedPrefix, right_padding: Sequence[int]) -> list[BatchKVCache]:
    """Fresh per-layer caches for a batch whose rows continue `prefix`, row b right-padded by
    `right_padding[b]` tokens (the prefix's own cache is left untouched)."""
    n = len(right_padding)
    if prefix.caches is None:
        caches = [BatchKVCache([0] * n) for _ in arch.layers(model)]
    else:
        caches = [BatchKVCache.merge([c] * n) for c in prefix.caches]
    for c in caches:
        c.prepare(right_padding=list(right_padding))
    return caches


def right_padded(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """Token rows [batch, longest] padded at the end with `pad_id`, and each row's padding."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    return mx.array([list(r) + [pad_id] * p for r, p in zip(rows, padding)], dtype=mx.int32), padding


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early).

    As few batches as `batch_size` allows, of equal size: 138 prompts at 64 run as 46 + 46 + 46,
    not 64 + 64 + 10 (a decode step reads every weight once, so a small last batch costs nearly
    as much per step as a full one)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    n_batches = -(-len(order) // batch_size)
    size = -(-len(order) // n_batches)
    return [order[i: i + size] for i in range(0, len(order), size)]


def prefill(model, logits_at: LogitsAt, batch: Sequence[Sequence[int]], prefix: SharedPrefix,
            pad_id: int) -> mx.array:
    """Last-token logits [batch, vocab] of prompts that start with `prefix` (one right-padded
    forward pass; only those positions go through the output projection)."""
    rest = [list(ids[prefix.length:]) for ids in batch]
    tokens, padding = right_padded(rest, pad_id)
    return logits_at(tokens, batch_cache(model, prefix, padding), mx.array([len(r) - 1 for r in rest]))


@dataclass
class BaseRow:
    """One prompt under the unsteered model: the input of each recorded block at every token
    [tokens, hidden], and each block's keys and values of every token but the last (batch-1
    caches, never written to; they hold the last token too, past their offset)."""

    caches: list[KVCache]
    inputs: dict[int, mx.array]


class BasePass:
    """The unsteered model's prefill of prompts, kept per prompt for steered passes over them that
    add vectors from one of `layers` up (see `Steering`): generation (`resumed`) and first-token
    distributions (`resumed_logits`)."""

    def __init__(self, layers: Iterable[int]):
        self.layers = sorted(set(layers))
        self._rows: dict[tuple[int, ...], BaseRow] = {}

    def rows(self, model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> list[BaseRow]:
        """The base rows of `seqs`, running the model (unsteered: call it outside any hook) on the
        ones not seen before."""
        missing = [s for s in dict.fromkeys(tuple(s) for s in seqs) if s not in self._rows]
        if missing:
            self._run(model, missing, pad_id, batch_size)
        return [self._rows[tuple(s)] for s in seqs]

    def narrow(self, layers: Iterable[int]) -> None:
        """Keep the inputs of `layers` only (the others' memory is freed)."""
        self.layers = [lay for lay in self.layers if lay in set(layers)]
        for row in self._rows.values():
            row.inputs = {lay: row.inputs[lay] for lay in self.layers}

    def _run(self, model, seqs: list[tuple[int, ...]], pad_id: int, batch_size: int) -> None:
        from .interventions import hooked_layers

        seen: dict[int, list[mx.array]] = {lay: [] for lay in self.layers}

        def keep(lay):
            def record(x):
                seen[lay].append(x)
                return x
            return record

        with hooked_layers(model, before={lay: keep(lay) for lay in self.layers}):
            prefix = shared_prefix(model, seqs)
            lead = {lay: seen[lay].pop()[0] for lay in self.layers} if prefix.length else {}
            for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
                rest = [seqs[i][prefix.length:] for i in idx]
                tokens, padding = right_padded(rest, pad_id)
                caches = batch_cache(model, prefix, padding)
                arch.decoder(model)(tokens, cache=caches)
                for c in caches:
                    c.finalize()
                got = {lay: seen[lay].pop() for lay in self.layers}
                new = []
                for j, i in enumerate(idx):
                    inputs = {lay: x[j, : len(rest[j])] for lay, x in got.items()}
                    if lead:
                        inputs = {lay: mx.concatenate([lead[lay], x]) for lay, x in inputs.items()}
                    row_caches = [c.extract(j) for c in caches]
                    for c in row_caches:
                        c.offset -= 1  # the last token is fed to the generator as its first step
                    new.append(BaseRow(row_caches, inputs))
                    self._rows[seqs[i]] = new[-1]
                mx.eval([[(c.keys, c.values) for c in r.caches] + list(r.inputs.values()) for r in new])

    def _inputs(self, layer: int, rows: Sequence[BaseRow], start: int, cut: int) -> mx.array:
        """Block `layer`'s inputs of each row from token `start` to `cut` before its end,
        right-padded with zeros into [rows, longest, hidden]."""
        parts = [r.inputs[layer][start: r.inputs[layer].shape[0] - cut] for r in rows]
        width = max(x.shape[0] for x in parts)
        return mx.stack([mx.pad(x, [(0, width - x.shape[0]), (0, 0)]) for x in parts])

    def resumed(self, model, layer: int, rows: Sequence[BaseRow], batch: Sequence[Sequence[int]],
                prefix: SharedPrefix, pad_id: int) -> list[list]:
        """Per-row caches (every token but the last) of `batch` under the model as it is now,
        steered from block `layer` up: the blocks below it are the base's `rows`, and the rest run
        from the base's input to `layer` behind `prefix` (computed steered)."""
        from .interventions import resuming_at

        tokens, padding = right_padded([list(ids[prefix.length:-1]) for ids in batch], pad_id)
        caches = batch_cache(model, prefix, padding)
        with resuming_at(model, layer, self._inputs(layer, rows, prefix.length, 1)):
            arch.decoder(model)(tokens, cache=caches)
        for c in caches[layer:]:
            c.finalize()
        return [[r.caches[k] if k < layer else caches[k].extract(j) for k in range(len(caches))]
                for j, r in enumerate(rows)]

    def resumed_logits(self, model, layer: int, rows: Sequence[BaseRow], batch: Sequence[Sequence[int]],
                       prefix: SharedPrefix, logits_at: LogitsAt, pad_id: int) -> mx.array:
        """`prefill` (last-token logits) of `batch` under the model as it is now, steered from block
        `layer` up, running only the blocks from `layer` on."""
        from .interventions import resuming_at

        with resuming_at(model, layer, self._inputs(layer, rows, prefix.length, 0)):
            return prefill(model, logits_at, batch, prefix, pad_id)


@dataclass
class Steering:
    """Vectors added at the input of blocks (every token) while generating, as (block, vector)
    pairs. With `base`, the blocks below the lowest of them are taken from the unsteered model's
    pass over the prompts (`BasePass`) when it recorded that block."""

    terms: list[tuple[int, np.ndarray]]
    base: BasePass | None = None
    layer: int = field(init=False)  # the lowest block a vector is added at

    def __post_init__(self):
        self.layer = min(lay for lay, _ in self.terms)

    def resumes(self, model, prompt_ids: Sequence[Sequence[int]]) -> bool:
        """Whether a run over `prompt_ids` takes its lower blocks from the base: a prompt of one
        token has nothing before its last token to take."""
        return (self.base is not None and self.layer in self.base.layers and 0 < self.layer < len(arch.layers(model))
                and min(map(len, prompt_ids)) >= 2)

    @contextmanager
    def added(self, model):
        """During the `with`, every term's vector is added (interventions.adding_at)."""
        from .interventions import adding_at

        with ExitStack() as stack:
            for lay, vector in self.terms:
                stack.enter_context(adding_at(model, lay, vector))
            yield model


class GreedyHead:
    """The model as BatchGenerator sees it when decoding greedily.

    BatchGenerator normalises every step's logits over the whole vocabulary (logsumexp) before
    its sampler runs, and keeps each row's log-probs. Greedy decoding needs only the argmax, and
    on the CPU MLX's exp runs one element at a time: 81 ms of a 657 ms step at batch 32 on
    Qwen2.5-0.5B (bench/decode_profile.py). So while `full` is off the generator is handed
    logits one column wide, and `sample` takes the argmax of the real ones, kept aside. A caller
    that wants the first-token distributions keeps `full` on until every row has had its first
    token (rows can start in different steps)."""

    def __init__(self, model, full: bool = False):
        self.model, self.full = model, full
        self.logits: mx.array | None = None

    def __getattr__(self, name):  # layers, make_cache ...: the generator asks the model itself
        return getattr(self.model, name)

    def __call__(self, inputs, *args, **kwargs):
        logits = self.model(inputs, *args, **kwargs)
        self.logits = logits[:, -1, :]
        return logits if self.full else logits[..., :1]

    def sample(self, _normalised: mx.array) -> mx.array:
        return mx.argmax(self.logits, axis=-1)


def decode_greedy(model, batch: Sequence[Sequence[int]], prefix: SharedPrefix, max_tokens: int, eos: set[int],
                  stop: Stop | None = None, rows: Sequence[int] | None = None, first_logprobs: bool = False,
                  caches: Sequence[list] | None = None):
    """Greedy continuations of one batch (eos excluded), by mlx_lm's BatchGenerator. `rows` names
    the batch's rows for `stop` (default 0..). With `first_logprobs`, returns (continuations, the
    log-softmax of each row's first-token distribution) from the generator's own prefill step.
    `caches` (per row, per block: every token but the last, as `BasePass.resumed` gives) replace
    the prefill: the generator starts from each row's last token."""
    # here, not at the top: mlx_lm.generate imports transformers (1.2 s), which capture never needs
    from mlx_lm.generate import BatchGenerator, generation_stream

    rows = list(range(len(batch))) if rows is None else list(rows)
    # One prefill step for the whole batch, so every row starts decoding at the same step.
    head = GreedyHead(model, full=first_logprobs)
    gen = BatchGenerator(head, max_tokens=max_tokens, stop_tokens=[[e] for e in sorted(eos)] or None,
                         sampler=head.sample, completion_batch_size=len(batch), prefill_batch_size=len(batch),
                         prefill_step_size=max(len(ids) for ids in batch))
    try:
        # Every row is handed the same prefix caches: the generator merges them into a new batch
        # cache (BatchKVCache.merge, as `batch_cache` does) and never writes to them.
        if caches is not None:
            uids = gen.insert([list(ids[-1:]) for ids in batch], caches=list(caches))
        else:
            uids = gen.insert([list(ids[prefix.length:]) for ids in batch],
                              caches=None if prefix.caches is None else [prefix.caches] * len(batch))
        row_of = dict(zip(uids, rows))
        out: dict[int, list[int]] = {u: [] for u in uids}
        firsts: dict[int, mx.array] = {}
        live, step = set(uids), 0
        while live:
            for r in gen.next_generated():
                if first_logprobs and r.uid not in firsts:
                    firsts[r.uid] = r.logprobs
                    head.full = len(firsts) < len(uids)
                if r.finish_reason != "stop":  # "stop": the token is an eos id
                    out[r.uid].append(r.token)
                if r.finish_reason is not None:
                    live.discard(r.uid)
            step += 1
            if stop is not None and live and step % STOP_CHECK_EVERY == 0:
                halt = set(stop({row_of[u]: out[u] for u in uids}, {row_of[u] for u in live}))
                gone = [u for u in live if row_of[u] in halt]
                gen.remove(gone)
                live.difference_update(gone)
    finally:
        gen.close()
        # The generator computes on its own stream; let it finish before anything runs on the
        # default one, or a sharded model's collectives on the two streams interleave across
        # ranks and the next forward pass sums the wrong tensors.
        mx.synchronize(generation_stream)
    if first_logprobs:
        return [out[u] for u in uids], [firsts[u] for u in uids]
    return [out[u] for u in uids]


def log_softmax(logits: mx.array) -> mx.array:
    lp = logits.astype(mx.float32)
    return lp - mx.logsumexp(lp, axis=-1, keepdims=True)


def check_nonempty(prompt_ids: Sequence[Sequence[int]]) -> None:
    if any(len(ids) == 0 for ids in prompt_ids):
        raise UserError("a prompt encodes to no tokens; give every prompt some text")


def generate_batched(model, logits_at: LogitsAt, prompt_ids: Sequence[Sequence[int]], max_tokens: int,
                     eos_ids: Iterable[int], batch_size: int, pad_id: int,
                     progress: Update | None = None, stop: Stop | None = None,
                     first_logprobs: bool = False, steer: Steering | None = None
                     ) -> tuple[list[list[int]], mx.array | None]:
    """Greedy continuations of every prompt in input order (`max_tokens` 0: none), and with
    `first_logprobs` the log-softmax of each prompt's first-token distribution [n, vocab] (the
    generator's first step when generating, else one right-padded prefill per batch). Prompts
    share one prefix cache and run in length-sorted batches; `progress` (progress.Update) counts
    prompts. `steer` adds its vectors for the whole call."""
    check_nonempty(prompt_ids)
    results: list[list[int]] = [[] for _ in prompt_ids]
    firsts: list[mx.array | None] = [None] * len(prompt_ids)
    batches = length_sorted_batches([len(p) for p in prompt_ids], batch_size)
    if max_tokens <= 0 and not first_logprobs:
        if progress:
            progress(len(prompt_ids))
        return results, None
    resume = steer is not None and max_tokens > 0 and steer.resumes(model, prompt_ids)
    base = steer.base.rows(model, prompt_ids, pad_id, batch_size) if resume else None  # before any hook
    with steer.added(model) if steer is not None else nullcontext():
        # BatchGenerator feeds each prompt's last token as its first decode step; with at least two
        # tokens of every prompt past the prefix, every row has a prefill and all start in step.
        prefix = shared_prefix(model, prompt_ids, keep=2)
        for idx in batches:
            batch = [list(prompt_ids[i]) for i in idx]
            if max_tokens > 0:
                caches = None if base is None else steer.base.resumed(model, steer.layer, [base[i] for i in idx],
                                                                      batch, prefix, pad_id)
                outs = decode_greedy(model, batch, prefix, max_tokens, set(eos_ids), stop, idx, first_logprobs,
                                     caches)
                outs, lps = outs if first_logprobs else (outs, None)
                for j, (i, ids) in enumerate(zip(idx, outs)):
                    results[i] = ids
                    if lps is not None:
                        firsts[i] = lps[j].astype(mx.float32)
            elif first_logprobs:
                lp = log_softmax(prefill(model, logits_at, batch, prefix, pad_id))
                mx.eval(lp)
                for j, i in enumerate(idx):
                    firsts[i] = lp[j]
            if progress:
                progress(len(idx))
    if not first_logprobs:
        return results, None
    return results, (mx.stack(firsts) if firsts else mx.zeros((0, 0)))

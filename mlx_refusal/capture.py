"""Capture the residual stream at chosen prompt positions, with our own layer hooks.

Sites: row l < L is resid_pre of layer l (the input of block l); row L is the final residual
before the last norm. Only the captured positions are kept, and means are summed in float64,
so memory is O(layers x hidden) whatever the number of prompts (unless `keep_all`).

Batching runs on the engine (mlx_refusal.batching): the shared template prefix is run once
and copied into each batch's cache, and the suffixes are right-padded: with a causal mask a real
token never attends to a pad that comes after it, so the captured positions are exact, and their
RoPE positions are simply prefix_len + i. Batches are formed from prompts of similar length so
little is spent on padding. Blocks after the last needed site and the LM head are never run: the
hook stops the forward pass by raising once it has what it needs. A `head` (a function of the
decoder's output at each prompt's last token, such as the base model's refusal odds) lets the
same pass read the first-token distribution too, instead of a second forward pass over the prompts.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import mlx.core as mx

from . import arch, distributed
from .atomic import atomic_file
from .errors import UserError
from .interventions import hooked_layers
from .batching import batch_cache, length_sorted_batches, right_padded, shared_prefix
from .progress import Update
from .template import encode_prefilled, Encoded, encode_prompts

CACHE_FORMAT = 1

# head(final): a per-prompt number [batch] from the decoder's output (after its norm) at each
# prompt's last token [batch, hidden]
Head = Callable[[mx.array], mx.array]


class _StopForward(Exception):
    pass


@dataclass
class Capture:
    """Captured residuals for one prompt set. Rows: resid_pre of layers 0..L-1, then final."""

    mean: np.ndarray  # [L+1, hidden] float64
    mean_norm: np.ndarray  # [L+1] mean L2 norm of a captured activation
    count: int
    acts: np.ndarray | None = None  # [n, L+1, hidden] float32, prompt order, if keep_all
    stats: dict = field(default_factory=dict)  # tokens, padded tokens, prefix length
    head_out: np.ndarray | None = None  # [n] float64, prompt order: `head` at the last token, if given


@contextmanager
def record_residuals(model, sink: Callable[[int, mx.array], None]):
    """During the `with`, `sink(site, residual)` sees the input of every decoder block (site l)
    and the output of the last one (site L, the final residual before the norm).

    The sink may raise to stop the forward pass early. The model is restored on exit, even on error.
    """
    n = arch.num_layers(model)

    def recorder(site):
        def record(x):
            sink(site, x)
            return x
        return record

    with hooked_layers(model, before={i: recorder(i) for i in range(n)}, after={n - 1: recorder(n)}):
        yield


def capture_encoded(
    model,
    encoded: list[Encoded],
    batch_size: int = 16,
    keep_all: bool = False,
    progress: Update | None = None,
    head: Head | None = None,
) -> Capture:
    """Run the prompts and accumulate the residuals at their last `num_positions` tokens
    (averaged over those positions within a prompt, then over prompts). With `head`, the decoder
    runs to its end and `head` of its output at each prompt's last token lands in `head_out`."""
    if not encoded:
        raise UserError("no prompts to capture")
    n_layers, hidden = arch.num_layers(model), arch.hidden_size(model)
    n_sites = n_layers + 1
    prefix = shared_prefix(model, [e.ids for e in encoded], [e.num_positions for e in encoded])
    P = prefix.length

    total = np.zeros((n_sites, hidden), np.float64)
    norm_total = np.zeros(n_sites, np.float64)
    acts = np.zeros((len(encoded), n_sites, hidden), np.float32) if keep_all else None
    head_out = np.zeros(len(encoded), np.float64) if head is not None else None
    tokens = padded = 0

    suffixes = [e.ids[P:] for e in encoded]
    for batch in length_sorted_batches([len(s) for s in suffixes], batch_size):
        ids, padding = right_padded([suffixes[i] for i in batch])
        # [B, npos] index of each captured token inside the right-padded suffix
        npos = encoded[batch[0]].num_positions
        gather = np.stack([len(suffixes[i]) - npos + np.arange(npos) for i in batch])
        gather_mx = mx.array(gather[..., None].astype(np.int32))  # [B, npos, 1]
        got: list[mx.array] = [None] * n_sites

        def sink(site: int, x: mx.array):
            picked = mx.take_along_axis(x, gather_mx, axis=1)  # [B, npos, H]
            got[site] = picked.astype(mx.float32).mean(axis=1)
            if site == n_layers and head is None:
                raise _StopForward

        scored = None
        with record_residuals(model, sink):
            try:
                out = arch.decoder(model)(ids, cache=batch_cache(model, prefix, padding))
                last = mx.array([len(suffixes[i]) - 1 for i in batch])
                scored = head(out[mx.arange(len(batch)), last]).astype(mx.float32)
            except _StopForward:
                pass
        stacked = mx.stack(got, axis=1)  # [B, sites, H]
        mx.eval(stacked, *([] if scored is None else [scored]))
        if scored is not None:
            head_out[batch] = np.array(scored, dtype=np.float64)
        block = np.array(stacked, copy=False)
        total += block.astype(np.float64).sum(axis=0)
        norm_total += np.linalg.norm(block.astype(np.float64), axis=-1).sum(axis=0)
        if acts is not None:
            acts[batch] = block
        tokens += sum(len(suffixes[i]) for i in batch)
        padded += ids.size
        if progress:
            progress(len(batch), sum(len(suffixes[i]) for i in batch))

    n = len(encoded)
    stats = {"prompts": n, "prefix_tokens": P, "suffix_tokens": tokens, "padded_tokens": padded,
             "tokens": tokens + P * n}
    return Capture(total / n, norm_total / n, n, acts, stats, head_out)


def capture_residuals(
    model,
    tokenizer,
    prompts: list[str],
    positions: str = "last",
    system: str | None = None,
    batch_size: int = 16,
    keep_all: bool = False,
    progress: Update | None = None,
    head: Head | None = None,
) -> Capture:
    """Residual-stream means over `prompts` (chat-templated) at `positions` ("last" or
    "post-instruction"), one row per layer input plus the final residual (and `head`, see
    `capture_encoded`)."""
    return capture_shared(model, encode_prompts(tokenizer, prompts, positions, system), batch_size, keep_all,
                          progress, head)


def capture_shared(model, encoded: list[Encoded], batch_size: int = 16, keep_all: bool = False,
                   progress: Update | None = None, head: Head | None = None) -> Capture:
    """`capture_encoded`, split across the data-parallel ranks under `mlx.launch` (each runs
    every N-th prompt; the float64 sums and counts are added); on one process, just that."""
    group = distributed.data_group(model)
    if group is None:
        return capture_encoded(model, encoded, batch_size, keep_all, progress, head)
    # Data parallel: this rank's share, then every rank's sums and counts added together.
    mine = distributed.share_of_rows(encoded, group)
    done = [0]

    def scaled(n: int, tokens: int) -> None:
        # progress counts all prompts: this rank's share stands for the N ranks' (they run in step)
        step = min(n * group.size(), len(encoded) - done[0])
        done[0] += step
        progress(step, tokens * group.size())

    return distributed.combined_capture(capture_encoded(model, mine, batch_size, keep_all,
                                                        scaled if progress else None, head), len(encoded), group)


# ---------------------------------------------------------------------------------------------
# On-disk cache of captured means, keyed by everything that determines them.


def capture_key(fingerprint: str, prompts: list[str], chat_template: str | None, system: str | None,
                positions: str, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "fingerprint": fingerprint, "template": chat_template,
                         "system": system, "positions": positions, "dtype": dtype}, sort_keys=True).encode())
    for p in prompts:
        h.update(hashlib.sha256(p.encode()).digest())
    return h.hexdigest()


class CacheEntryRecomputed(UserWarning):
    """A cache entry could not be read (damaged, truncated); it is recomputed (the CLI prints a note)."""


def load_cached(cache_dir: Path, key: str) -> Capture | None:
    """The cached capture for `key`, or None when there is none or it is damaged (then it is
    deleted and a CacheEntryRecomputed warning says so)."""
    path = Path(cache_dir) / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            acts = z["acts"] if "acts" in z.files else None
            stats = json.loads(str(z["stats"]))
            cap = Capture(z["mean"], z["mean_norm"], int(z["count"]), acts, stats)
        if cap.mean.ndim != 2 or cap.mean_norm.shape != cap.mean.shape[:1] or cap.count < 1:
            raise ValueError("inconsistent shapes")
        return cap
    except Exception as exc:  # zipfile, numpy and json each raise their own types for a damaged file
        warnings.warn(f"activation cache entry {path.name} is damaged ({type(exc).__name__}); recomputing it",
                      CacheEntryRecomputed, stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def store_cached(cache_dir: Path, key: str, cap: Capture) -> None:
    """Write one entry atomically (temp file + fsync + rename): concurrent runs that compute the
    same entry each replace it whole, so a reader sees one complete entry or none."""
    arrays = {"mean": cap.mean, "mean_norm": cap.mean_norm, "count": np.array(cap.count),
              "stats": np.array(json.dumps(cap.stats))}
    if cap.acts is not None:
        arrays["acts"] = cap.acts
    with atomic_file(Path(cache_dir) / f"{key}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def cached_capture(
    model,
    tokenizer,
    prompts: list[str],
    fingerprint: str,
    positions: str = "last",
    system: str | None = None,
    batch_size: int = 16,
    keep_all: bool = False,
    use_cache: bool = True,
    progress: Update | None = None,
    prefill: str | None = None,
    head: Head | None = None,
) -> tuple[Capture, bool]:
    """`capture_residuals` behind the on-disk cache. Returns (capture, whether it was a cache hit).
    With `prefill`, the assistant turn starts with that text and its tokens are the ones read.
    With `head` the prompts are always run (the cache holds no head output) and the capture is
    stored for the next call."""
    from .paths import cache_dir

    where = positions if prefill is None else "response:" + prefill
    key = capture_key(fingerprint, prompts, getattr(tokenizer, "chat_template", None), system, where,
                      str(arch.embedding(model).weight.dtype))
    root = cache_dir("activations")
    if use_cache and head is None:
        hit = load_cached(root, key)
        usable = hit is not None and (hit.acts is not None or not keep_all)
        # every rank must take the same branch: a capture runs collectives
        if distributed.everyone(usable, distributed.world()):
            if not keep_all:
                hit.acts = None
            return hit, True
    if prefill is None:
        cap = capture_residuals(model, tokenizer, prompts, positions, system, batch_size, keep_all, progress, head)
    else:
        cap = capture_shared(model, encode_prefilled(tokenizer, prompts, prefill, system), batch_size, keep_all,
                             progress, head)
    if use_cache and distributed.is_writer():
        store_cached(root, key, cap)
    return cap, False

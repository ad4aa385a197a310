"""Past one process: the `mlx.distributed` glue (ranks started by `mlx.launch`).

Two ways to use N ranks, chosen per model:

- Data parallel (the default under `mlx.launch`): every rank holds the whole model and takes
  every N-th prompt. Capture sums (float64) and counts are added with `all_sum`; generated
  answers and per-prompt arrays are gathered back into prompt order. Every rank then holds the
  same result, so every rank takes the same next step, and rank 0 alone writes files.
- Tensor parallel (`sharded_load`, for a model bigger than one host): mlx_lm's own `shard()`
  splits each block's projections across the ranks (q/k/v/gate/up by output rows, o/down by
  input columns, summed with `all_sum` inside the layer). Every rank runs every prompt. The
  residual stream between blocks is whole on every rank, so the capture hooks read it as is.

Edits under tensor parallelism, shard by shard (what `edit.ablate` and `edit.add_steering_bias`
do unchanged on a sharded model):
- A row-parallel ("sharded-to-all") writer holds W[:, cols_r]. Orthogonalising what it writes,
  W <- W - s d d^T W, multiplies W on the left, so it acts on each column slice independently:
  editing every rank's slice is exactly the edit of the whole matrix.
- The embedding is not sharded; every rank makes the same edit.
- Bias: mlx's `ShardedToAllLinear` keeps the whole bias on every rank and adds it *after* the
  `all_sum`. So the steering bias goes in full on every rank (not divided by N: that would be
  right only for a bias added before the sum).
- Saving: no rank holds the whole model, so rank 0 rewrites the same edit from the source folder
  with `stream_edit` (bit-identical to the in-memory edit).

Nothing here prints; every function is a no-op pass-through on a single process.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence, TypeVar

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from . import arch
from .errors import UserError

T = TypeVar("T")

_SHARDED = (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear)
_world: mx.distributed.Group | None = None


def world() -> mx.distributed.Group:
    """The group of every rank `mlx.launch` started (size 1 without a launcher)."""
    global _world
    if _world is None:
        _world = mx.distributed.init()
    return _world


def rank() -> int:
    return world().rank()


def size() -> int:
    return world().size()


def is_writer() -> bool:
    """Only rank 0 writes files (caches, directions, models, reports)."""
    return rank() == 0


def is_tensor_parallel(model) -> bool:
    writers = arch.residual_writers(model, range(min(1, arch.num_layers(model))), include_embedding=False)
    return any(isinstance(arch.get_module(model, w.path), _SHARDED) for w in writers if w.role == "mlp")


def data_group(model) -> mx.distributed.Group | None:
    """The group prompts are split across for `model`, or None (one rank, or a sharded model,
    whose ranks must all run every prompt together)."""
    if size() == 1 or is_tensor_parallel(model):
        return None
    return world()


def describe(model) -> dict | None:
    """The "distributed" provenance entry, or None on one process."""
    if size() == 1:
        return None
    return {"ranks": size(), "mode": "tensor" if is_tensor_parallel(model) else "data",
            "split": "layer projections (mlx_lm shard())" if is_tensor_parallel(model)
            else "prompts, round robin (prompt i on rank i mod N)"}


# ---------------------------------------------------------------------------------------------
# Data parallelism: a rank's share, sums, agreement, gathering in prompt order.


def share(items: Sequence[T], group) -> list[T]:
    """This rank's prompts: i mod N == rank. Round robin keeps the shares' lengths (and so the
    ranks' work) balanced whatever order the prompts come in."""
    return list(items[group.rank()::group.size()])


def share_of_rows(items: Sequence[T], group) -> list[T]:
    """`share`, for a computation whose per-prompt rows are gathered: every rank needs at least one."""
    mine = share(items, group)
    if not mine:
        raise UserError(f"{len(items)} prompts cannot be split across {group.size()} ranks; "
                        "use fewer ranks or more prompts")
    return mine


def all_sum(x: np.ndarray, group) -> np.ndarray:
    """Sum of `x` over the ranks, in x's dtype (float64 stays float64)."""
    x = np.ascontiguousarray(x)
    out = mx.distributed.all_sum(mx.array(x, dtype=_mx_dtype(x.dtype)), group=group, stream=mx.cpu)
    return np.array(out, copy=True).astype(x.dtype, copy=False)


def everyone(flag: bool, group) -> bool:
    """True on every rank if it is true on every rank: ranks must agree before taking a branch
    with collectives in it (a cache hit on one Mac and a miss on the other would deadlock)."""
    if group is None or group.size() == 1:
        return flag
    return int(all_sum(np.array([int(bool(flag))], np.int32), group)[0]) == group.size()


def _mx_dtype(dt: np.dtype):
    return {np.dtype(np.float64): mx.float64, np.dtype(np.float32): mx.float32,
            np.dtype(np.int32): mx.int32, np.dtype(np.uint8): mx.uint8}[np.dtype(dt)]


def _gather_bytes(blob: bytes, group) -> list[bytes]:
    """Every rank's bytes, by rank (all_gather needs equal shapes, so pad to the longest)."""
    lengths = mx.distributed.all_gather(mx.array([len(blob)], dtype=mx.int32), group=group, stream=mx.cpu)
    lengths = np.array(lengths).tolist()
    padded = np.zeros(max(max(lengths), 1), np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    got = np.array(mx.distributed.all_gather(mx.array(padded), group=group, stream=mx.cpu))
    got = got.reshape(group.size(), -1)
    return [got[r, :n].tobytes() for r, n in enumerate(lengths)]


def _interleave(parts: list[list], n: int) -> list:
    """Undo `share`: item i is the (i // N)-th item of rank i mod N."""
    N = len(parts)
    return [parts[i % N][i // N] for i in range(n)]


def gather_json(local: list, n: int, group) -> list:
    """The full list of `n` JSON-able results (strings, numbers) in prompt order, on every rank."""
    parts = [json.loads(b.decode()) for b in _gather_bytes(json.dumps(local).encode(), group)]
    return _interleave(parts, n)


def gather_rows(local: mx.array, n: int, group) -> mx.array:
    """The [n, ...] rows of every rank's [share, ...] array, in prompt order, bit-exact."""
    N, per = group.size(), -(-n // group.size())
    pad = per - local.shape[0]
    if pad:
        local = mx.concatenate([local, mx.zeros((pad, *local.shape[1:]), local.dtype)])
    got = mx.distributed.all_gather(local, group=group, stream=mx.cpu)  # [N * per, ...], rank-major
    order = np.array([(i % N) * per + i // N for i in range(n)], np.int32)
    return got[mx.array(order)]


def map_prompts(model, fn: Callable[[list], T], prompts: Sequence, gather: str) -> T:
    """`fn(prompts)` (a per-prompt computation) split across the data-parallel ranks and
    gathered back in prompt order: gather="json" for a list of strings/numbers, "rows" for an
    [n, ...] array. One process or a sharded model: just `fn(prompts)`."""
    group = data_group(model)
    if group is None:
        return fn(list(prompts))
    if gather == "json":
        mine = share(prompts, group)
        return gather_json(fn(mine) if mine else [], len(prompts), group)
    return gather_rows(fn(share_of_rows(prompts, group)), len(prompts), group)


def combined_capture(cap, n: int, group):
    """A `capture.Capture` of all `n` prompts from each rank's own: float64 sums and counts
    added with all_sum (the order of prompts does not change a mean); kept activations are
    gathered back into prompt order, and so is the head output."""
    from .capture import Capture

    count = int(all_sum(np.array([cap.count], np.float64), group)[0])
    total = all_sum(cap.mean * cap.count, group)
    norm_total = all_sum(cap.mean_norm * cap.count, group)
    # token counts add up; the shared prefix (and anything not a count) is each rank's own
    stats = {k: int(all_sum(np.array([v], np.float64), group)[0])
             if isinstance(v, int) and k != "prefix_tokens" else v for k, v in sorted(cap.stats.items())}
    stats["ranks"] = group.size()
    acts = head_out = None
    if cap.acts is not None:
        acts = np.array(gather_rows(mx.array(cap.acts), n, group))
    if cap.head_out is not None:
        rows = gather_rows(mx.array(cap.head_out[:, None].astype(np.float32)), n, group)
        head_out = np.array(rows, np.float64)[:, 0]
    return Capture(total / count, norm_total / count, count, acts, stats, head_out)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: mlx_lm's own shard().


def sharded_load(path):
    """(model, tokenizer) with this rank's slice of every block, by mlx_lm's `sharded_load`
    (lazy load, `shard()`, then only the slice is read and evaluated)."""
    from mlx_lm.utils import sharded_load as mlx_sharded_load

    config = json.loads((path / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % size() or kv_heads % size():
        raise UserError(f"{heads} attention heads ({kv_heads} key/value heads) cannot be split across "
                        f"{size()} ranks; use a rank count that divides both")
    try:
        return mlx_sharded_load(str(path), tensor_group=world(), tokenizer_config={"trust_remote_code": False})
    except ValueError as exc:  # mlx_lm's "does not support tensor parallelism"
        raise UserError(f"{path}: {exc}; run without --tensor-parallel (data parallel)") from None


def gather_sharded(model, group=None) -> dict[str, mx.array]:
    """Every parameter of a sharded model, whole (for tests and small models: it holds the
    whole model on every rank). Row-parallel weights are concatenated along their input axis,
    column-parallel weights and biases along their output axis."""
    from mlx.utils import tree_flatten

    group = group or world()
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.AllToShardedLinear, nn.QuantizedAllToShardedLinear, *_SHARDED)):
            continue
        row_parallel = isinstance(module, _SHARDED)
        for name, value in tree_flatten(module.parameters()):
            if row_parallel and name == "bias":
                out[f"{path}.{name}"] = value  # whole on every rank
                continue
            axis = -1 if row_parallel else 0
            moved = mx.moveaxis(value, axis, 0)
            whole = mx.distributed.all_gather(moved, group=group, stream=mx.cpu)
            out[f"{path}.{name}"] = mx.moveaxis(whole, 0, axis)
    for name, value in tree_flatten(model.parameters()):
        out.setdefault(name, value)
    return out

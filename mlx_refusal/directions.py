"""Candidate refusal directions: difference in means, one per residual site, and their file.

Row l of every [L+1, hidden] array is resid_pre of layer l; the last row is the final
residual before the last norm.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import validate
from .atomic import atomic_file
from .errors import UserError
from .record import array_sha256

FILE_NAME = "directions.safetensors"


@dataclass
class Directions:
    directions: np.ndarray  # [L+1, hidden] float32, unit rows (zero rows where degenerate)
    harmful_mean: np.ndarray  # [L+1, hidden]
    harmless_mean: np.ndarray  # [L+1, hidden]
    mean_norm: np.ndarray  # [L+1] mean residual norm over both sets (scale for alpha)
    degenerate: list[int] = field(default_factory=list)  # rows that were zero or non-finite
    metadata: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict, repr=False)  # what computing them measured (cache hits); not saved

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0] - 1

    def direction(self, layer: int) -> np.ndarray:
        validate.layer("layer", layer, self.num_layers, final_residual=True)
        if layer in self.degenerate:
            raise UserError(f"the direction at layer {layer} is zero or not finite; pick another layer")
        return self.directions[layer]

    def sha256(self, layer: int | None = None) -> str:
        data = self.directions if layer is None else self.directions[layer]
        return array_sha256(data)


def diff_in_means(harmful_mean: np.ndarray, harmless_mean: np.ndarray, eps: float = 1e-8):
    """Unit (harmful - harmless) per row, and the indices of rows that could not be normalised.

    A zero or non-finite difference is reported, not silently normalised into noise.
    """
    diff = np.asarray(harmful_mean, np.float64) - np.asarray(harmless_mean, np.float64)
    norms = np.linalg.norm(diff, axis=-1)
    bad = [i for i, n in enumerate(norms) if not np.isfinite(n) or n <= eps]
    out = np.zeros_like(diff)
    good = np.array([i not in bad for i in range(len(norms))])
    out[good] = diff[good] / norms[good, None]
    return out.astype(np.float32), bad


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores `positive` above `negative` (Mann-Whitney U, ties half)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        raise UserError("separation needs prompts on both sides; give each set at least one prompt")
    ranks = np.empty(pos.size + neg.size)
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    values = np.concatenate([pos, neg])[order]
    ranks[order] = np.arange(1, values.size + 1)
    for v in np.unique(values):  # average the ranks of ties
        tied = order[values == v]
        ranks[tied] = ranks[tied].mean()
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def separation(directions: np.ndarray, positive_acts: np.ndarray, negative_acts: np.ndarray) -> np.ndarray:
    """Per residual site, the AUROC of projecting held-back activations [n, L+1, hidden] on that
    site's direction: 1.0 separates the two sets perfectly, 0.5 not at all."""
    pos = np.einsum("nsh,sh->sn", positive_acts.astype(np.float64), directions.astype(np.float64))
    neg = np.einsum("nsh,sh->sn", negative_acts.astype(np.float64), directions.astype(np.float64))
    return np.array([auroc(p, q) for p, q in zip(pos, neg)])


def from_captures(harmful, harmless, metadata: dict | None = None) -> Directions:
    dirs, bad = diff_in_means(harmful.mean, harmless.mean)
    mean_norm = (harmful.mean_norm * harmful.count + harmless.mean_norm * harmless.count) / (
        harmful.count + harmless.count)
    return Directions(dirs, harmful.mean.astype(np.float32), harmless.mean.astype(np.float32),
                      mean_norm.astype(np.float32), bad, dict(metadata or {}))


def save_directions(d: Directions, out_dir: Path) -> Path:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(d.metadata)
    meta["degenerate_rows"] = d.degenerate
    meta["rows"] = "row l = resid_pre of layer l; last row = final residual before the norm"
    path = out_dir / FILE_NAME
    with atomic_file(path) as tmp:
        save_file(
            {"directions": d.directions, "harmful_mean": d.harmful_mean, "harmless_mean": d.harmless_mean,
             "mean_norm": d.mean_norm},
            str(tmp),
            metadata={"mlx_refusal": json.dumps(meta, sort_keys=True)},
        )
    return path


def load_directions(path: Path) -> Directions:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.exists():
        raise UserError(f"no directions file at {path}; run `python cli.py directions --out {path.parent}` first")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("mlx_refusal", "{}"))
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{path} is not a readable directions file ({exc}); recompute it") from None
    missing = {"directions", "harmful_mean", "harmless_mean"} - set(arrays)
    if missing:
        raise UserError(f"{path} lacks {', '.join(sorted(missing))}; recompute it with `python cli.py directions`")
    mean_norm = arrays.get("mean_norm", np.linalg.norm(arrays["harmless_mean"], axis=-1))
    return Directions(arrays["directions"], arrays["harmful_mean"], arrays["harmless_mean"], mean_norm,
                      list(meta.pop("degenerate_rows", [])), meta)

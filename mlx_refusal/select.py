"""Ranking candidate layers.

`heuristic`: FailSpy's score, |mean of the elements of the unit direction|. Cheap, no forward
passes; a direction that is spread evenly in sign scores near zero.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .directions import Directions


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
    jpath = out_dir / "ranking.json"
    tmp = out_dir / f".ranking.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, jpath)
    return jpath, plot_ranking(scores, out_dir / "ranking.png")


def plot_ranking(scores: list[LayerScore], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in scores]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.plot(layers, [s.heuristic for s in scores], "o-", color="tab:red", label="heuristic |mean(d)|")
    ax.set_xlabel("layer (last = final residual)")
    ax.set_ylabel("heuristic score", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(layers, [s.relative_diff for s in scores], "s--", color="tab:blue",
             label="|mean diff| / mean residual norm")
    ax2.set_ylabel("|harmful - harmless| / residual norm", color="tab:blue")
    ax.set_title("Refusal direction candidates per layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

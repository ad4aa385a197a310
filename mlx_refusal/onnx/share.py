"""Whether an untied model's int8 graph stores ONE matrix for the embedding lookup and the lm_head.

A tied model has one matrix anyway. An untied folder may still hold two copies of one matrix: a
GGUF keeps `output.weight` and `token_embd.weight` quantized differently (Qwen2.5-Coder-0.5B's: Q8_0
and Q5_0), so the converted folder carries the same [vocab, hidden] matrix twice with different
rounding, and the int8 bundle would carry it twice too (136 MB for that model). Sharing keeps the
more precise copy for both uses.

"auto" shares when the difference between the copies looks like rounding, not like a different
matrix or an edit (`COPY_BOUNDS`), and never when the folder's edit may have rewritten the
embedding, where the two legitimately differ. "always" shares whatever the data says; "never"
keeps both copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import arch
from ..errors import UserError
from .source import EMBEDDING_SITE, SourceModel

SHARE_MODES = ("auto", "always", "never")
HEAD = "lm_head.weight"
BLOCK = 32  # GGUF's quantization block along a row (Q4_0, Q5_0, Q8_0 and the K-quants' sub-blocks)
_ROWS = 8192  # rows per chunk: bounded temporaries on a 150k-row vocabulary


@dataclass(frozen=True)
class CopyBounds:
    """What "two quantized copies of one matrix" means. Measured on Qwen2.5-Coder-0.5B-Instruct's
    GGUF (Q8_0 head, Q5_0 embedding): relative RMS difference 0.044, lowest row cosine 0.998, and
    the difference's strongest direction holds 1.0% of its energy (white noise spreads over all 896).
    The bounds leave room for a coarser 4-bit copy (about twice Q5_0's error) and reject both an
    unrelated matrix (relative difference ~1.4) and an edit along one direction, whose difference
    concentrates in that direction."""

    max_rel_rms: float = 0.10  # ||E - W|| / ||W|| over the whole matrix
    min_row_cosine: float = 0.99  # every token's two rows point the same way
    max_top_direction: float = 0.10  # share of ||E - W||^2 along its first singular direction


COPY_BOUNDS = CopyBounds()


@dataclass(frozen=True)
class EmbeddingSharing:
    """The decision and the measurements behind it, as the bundle records them."""

    mode: str
    shared: bool
    matrix: str | None  # the parameter stored for both uses; None: tied (one matrix) or not shared
    reason: str
    rel_rms_difference: float | None = None
    min_row_cosine: float | None = None
    top_direction_share: float | None = None
    distinct_per_block: dict | None = None  # parameter -> mean distinct values per 32-value block

    def record(self) -> dict:
        out = {"mode": self.mode, "shared": self.shared, "matrix": self.matrix, "reason": self.reason}
        if self.rel_rms_difference is not None:
            out.update(rel_rms_difference=self.rel_rms_difference, min_row_cosine=self.min_row_cosine,
                       top_direction_share=self.top_direction_share, distinct_per_block=self.distinct_per_block,
                       bounds={"max_rel_rms": COPY_BOUNDS.max_rel_rms, "min_row_cosine": COPY_BOUNDS.min_row_cosine,
                               "max_top_direction": COPY_BOUNDS.max_top_direction})
        return out


def check_mode(mode: str) -> str:
    if mode not in SHARE_MODES:
        raise UserError(f"--share-embedding must be one of {', '.join(SHARE_MODES)}, not {mode!r}")
    return mode


def decide_sharing(src: SourceModel, mode: str = "auto") -> EmbeddingSharing:
    """Whether (and which copy) the int8 graph of `src` shares between its lookup and its head."""
    check_mode(mode)
    if src.spec.tied_embeddings or HEAD not in src.weights:
        return EmbeddingSharing(mode, True, None, "tied embeddings: the folder has one matrix")
    embed = src.weights[EMBEDDING_SITE]
    vector = src.steering.embedding_vector if src.steering is not None else None
    if vector is not None:
        embed = embed - vector  # the graph adds the steering vector after the lookup; compare what it stores
    m = measure_copies(embed, src.weights[HEAD])
    finer = EMBEDDING_SITE if m["distinct_per_block"][EMBEDDING_SITE] > m["distinct_per_block"][HEAD] else HEAD
    edited = _edited_embedding(src)
    if mode == "never":
        shared, reason = False, "--share-embedding never"
    elif mode == "always":
        shared, reason = True, "--share-embedding always"
    elif edited is not None:
        shared, reason = False, edited
    else:
        problems = _outside_bounds(m)
        shared = not problems
        reason = ("the two copies differ by rounding only" if shared
                  else "the copies are not one matrix: " + "; ".join(problems))
    return EmbeddingSharing(mode, shared, finer if shared else None, reason, **m)


def measure_copies(embed: np.ndarray, head: np.ndarray) -> dict:
    """The difference between two [vocab, hidden] matrices, and how fine each one's value grid is:
    the mean number of distinct values in a block of 32 along a row (a 5-bit GGUF block has at most
    ~20 in practice, an 8-bit one close to 32), so the more precise copy is found from the data."""
    if embed.shape != head.shape:
        raise UserError(f"the embedding {embed.shape} and the lm_head {head.shape} differ in shape; they cannot share")
    hidden = embed.shape[1]
    gram = np.zeros((hidden, hidden), np.float64)
    diff_sq = head_sq = 0.0
    min_cos = 1.0
    distinct = {EMBEDDING_SITE: 0, HEAD: 0}
    block = min(BLOCK, hidden)
    for start in range(0, embed.shape[0], _ROWS):
        e, w = embed[start:start + _ROWS], head[start:start + _ROWS]
        d = e - w
        gram += d.T @ d
        diff_sq += float(np.square(d, dtype=np.float64).sum())
        head_sq += float(np.square(w, dtype=np.float64).sum())
        norms = np.linalg.norm(e, axis=1) * np.linalg.norm(w, axis=1)
        cos = np.where(norms > 0, np.einsum("ij,ij->i", e, w) / np.maximum(norms, 1e-30), 1.0)
        min_cos = min(min_cos, float(cos.min()))
        for name, a in ((EMBEDDING_SITE, e), (HEAD, w)):
            blocks = np.sort(a[:, :hidden // block * block].reshape(-1, block), axis=1)
            distinct[name] += int(blocks.shape[0] + (np.diff(blocks, axis=1) != 0).sum())
    n_blocks = embed.shape[0] * (hidden // block)
    energy = np.linalg.eigvalsh(gram)
    return {
        "rel_rms_difference": float(np.sqrt(diff_sq / head_sq)) if head_sq > 0 else 0.0,
        "min_row_cosine": min_cos,
        "top_direction_share": float(energy[-1] / energy.sum()) if energy.sum() > 0 else 0.0,
        "distinct_per_block": {k: round(v / n_blocks, 3) for k, v in distinct.items()},
    }


def _outside_bounds(m: dict) -> list[str]:
    b = COPY_BOUNDS
    out = []
    if m["rel_rms_difference"] > b.max_rel_rms:
        out.append(f"relative RMS difference {m['rel_rms_difference']:.3g} > {b.max_rel_rms}")
    if m["min_row_cosine"] < b.min_row_cosine:
        out.append(f"lowest row cosine {m['min_row_cosine']:.4g} < {b.min_row_cosine}")
    if m["top_direction_share"] > b.max_top_direction:
        out.append(f"{m['top_direction_share']:.0%} of the difference lies along one direction "
                   f"(> {b.max_top_direction:.0%}: an edit, not rounding)")
    return out


def _edited_embedding(src: SourceModel) -> str | None:
    """Why the folder's edit makes its embedding and head legitimately differ, or None."""
    if src.steering is not None and src.steering.embedding_vector is not None:
        return "the edit steers at layer 0 (the embedding carries the vector)"
    edit = src.edit
    if edit is None or edit.kind not in ("ablate", "project"):
        return None
    # the record lists the writers an ablation skipped; the embedding is edited unless it is among them
    skipped = (edit.details.get("summary") or {}).get("writers_skipped") or []
    if arch.family(src.spec.model_type).embedding_path in skipped:
        return None
    return f"the {edit.kind} edit may have rewritten the embedding"

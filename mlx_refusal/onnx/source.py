"""Read an mlx_lm model folder (plain or edited) into what the graph builder needs.

The weights come from stock `mlx_lm` (quantized layers dequantized, everything float32 numpy),
the geometry from the loaded modules themselves (so defaults that mlx_lm fills in, like
qwen2's head_dim, are never re-derived here), and the edit from its record (`record.read_record`,
`record.read_steering`: refusal_edit.json and steering.safetensors), checked against the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import arch
from ..errors import UserError
from ..families import GraphNeeds
from ..record import EDIT_RECORD, STEERING_FILE, EditRecord, StoredTerm, read_record, read_steering


@dataclass(frozen=True)
class DecoderSpec:
    """Geometry and constants of a Llama-style decoder; what the graph computes comes from the family."""

    model_type: str  # mlx_lm model_type of the folder, e.g. "qwen2" or "llama"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    attn_scale: float  # what mlx_lm multiplies q.k by (head_dim ** -0.5)
    rope_inv_freq: np.ndarray = field(repr=False)  # [head_dim // 2], positions are multiplied by it
    graph: GraphNeeds = GraphNeeds()  # the family's norm, activation, q/k norms and biases
    tied_embeddings: bool = True
    embedding_scale: float = 1.0  # what the decoder multiplies the embedding's output by (Gemma)
    # per layer, where layers differ (Gemma's local and global layers); empty: every layer uses
    # rope_inv_freq and sees every earlier position
    layer_rope_inv_freq: tuple[np.ndarray, ...] = field(default=(), repr=False)
    layer_windows: tuple[int | None, ...] = ()  # a sliding window (positions seen, itself included) or None

    def inv_freq(self, layer: int) -> np.ndarray:
        return self.layer_rope_inv_freq[layer] if self.layer_rope_inv_freq else self.rope_inv_freq

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None


@dataclass(frozen=True)
class SteeringTerm:
    """One steering vector as saved by `steer`: `vector` was added at `site` so it reaches resid_pre[layer]."""

    name: str  # "refusal", "voice", ...
    layer: int
    site: str  # parameter holding it: "model.embed_tokens.weight", "...mlp.down_proj.bias" or "...o_proj.bias"
    vector: np.ndarray = field(repr=False)  # [hidden], alpha * direction
    direction: np.ndarray = field(repr=False)  # [hidden], unit vector
    alpha: float | None = None
    # what the site's parameter holds for it: `vector`, but for the embedding rows of a decoder that
    # scales the embedding (Gemma), vector / that scale
    site_vector: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Steering:
    """Every steering term of an edited folder (docs: notes/steering_format.md). The first term is the
    primary (refusal) one: its layer, direction and alpha are what the page shows."""

    terms: tuple[SteeringTerm, ...]

    @property
    def primary(self) -> SteeringTerm:
        return self.terms[0]

    @property
    def layer(self) -> int:
        return self.primary.layer

    @property
    def site(self) -> str:
        return self.primary.site

    @property
    def alpha(self) -> float | None:
        return self.primary.alpha

    @property
    def direction(self) -> np.ndarray:
        return self.primary.direction

    @property
    def vector(self) -> np.ndarray:
        return self.primary.vector

    @property
    def sites(self) -> dict[str, np.ndarray]:
        """site -> the sum of the vectors stored there (terms may share a site), in term order."""
        out: dict[str, np.ndarray] = {}
        for t in self.terms:
            v = (t.vector if t.site_vector is None else t.site_vector).astype(np.float32)
            out[t.site] = out[t.site] + v if t.site in out else v
        return out

    @property
    def embedding_vector(self) -> np.ndarray | None:
        return self.sites.get(EMBEDDING_SITE)


EMBEDDING_SITE = "model.embed_tokens.weight"


@dataclass
class SourceModel:
    path: Path
    config: dict  # config.json as written in the folder
    spec: DecoderSpec
    weights: dict[str, np.ndarray] = field(repr=False)  # mlx parameter name -> float32 array
    edit: EditRecord | None = None  # refusal_edit.json, if the folder is an edited model
    steering: Steering | None = None


def read_model(model_dir: str | Path) -> SourceModel:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not an mlx_lm model folder (no config.json); pass a folder written by mlx_lm or mlx-refusal")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    config = json.loads((path / "config.json").read_text())
    try:
        fam = arch.family(config.get("model_type", ""))
    except arch.UnsupportedArchitecture as exc:
        raise UserError(f"cannot export to ONNX: {exc}") from None
    if fam.graph is None:
        raise UserError(f"cannot export to ONNX: {fam.onnx_impossible}")
    # trust_remote_code stays False: never execute code from a model folder.
    model, _ = load_model(path, lazy=False, strict=True)
    model = dequantize_model(model)
    params = [(name, value.astype(mx.float32)) for name, value in tree_flatten(model.parameters())]
    mx.eval([v for _, v in params])
    # Views, not copies (a copy of 2.5 GB costs seconds): each array keeps its mlx buffer alive.
    weights = {name: np.asarray(value) for name, value in params}
    if fam.graph.canonical_weights is not None:
        weights = fam.graph.canonical_weights(weights, config)
    _check_biases(weights, fam)
    spec = _spec_of(model, weights)
    edit = read_record(path)
    steering = _read_steering(path, edit, weights, spec) if edit and edit.kind == "steer" else None
    return SourceModel(path=path, config=config, spec=spec, weights=weights, edit=edit, steering=steering)


def _spec_of(model, weights: dict[str, np.ndarray]) -> DecoderSpec:
    """The geometry from the loaded modules, shapes from the weights under the graph's names."""
    fam = arch.check_supported(model)
    layers = arch.layers(model)
    attns = [arch.get_module(layer, fam.attention_writer.rpartition(".")[0]) for layer in layers]
    attn = attns[0]
    num_heads, num_kv_heads = int(attn.n_heads), int(attn.n_kv_heads)
    layer0 = fam.layer_path(0)
    head_dim = int(weights[f"{layer0}.self_attn.q_proj.weight"].shape[0]) // num_heads
    inv_freqs = [_rope_inv_freq(a.rope, head_dim) for a in attns]
    windows = [arch.attention_window(model, i) for i in range(len(layers))]
    if len({float(a.scale) for a in attns}) > 1:
        raise UserError("cannot export to ONNX: the layers' attention scales differ")
    varied = any(not np.array_equal(f, inv_freqs[0]) for f in inv_freqs)
    return DecoderSpec(
        model_type=arch.model_type_of(model),
        num_layers=len(layers),
        hidden_size=arch.hidden_size(model),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(weights[f"{layer0}.mlp.gate_proj.weight"].shape[0]),
        vocab_size=int(weights[f"{fam.embedding_path}.weight"].shape[0]),
        rms_norm_eps=float(layers[0].input_layernorm.eps),
        attn_scale=float(attn.scale),
        rope_inv_freq=inv_freqs[0],
        graph=fam.graph,
        tied_embeddings=arch.has_tied_embeddings(model),
        embedding_scale=arch.embedding_scale(model),
        layer_rope_inv_freq=tuple(inv_freqs) if varied else (),
        layer_windows=tuple(windows) if any(w is not None for w in windows) else (),
    )


def _check_biases(weights: dict[str, np.ndarray], fam: arch.Family) -> None:
    """A projection bias the family's graph does not add would be silently dropped: refuse it."""
    for name in weights:
        module, _, leaf = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if leaf == "bias" and proj.endswith("_proj") and proj not in fam.graph.biases:
            raise UserError(f"cannot export to ONNX: {name} is a bias the {fam.name} graph does not compute; "
                            "re-save the model with mlx-refusal")


def _rope_inv_freq(rope, head_dim: int) -> np.ndarray:
    """Angular frequency per rotated pair, for the RoPE variants whose angle is position * constant."""
    import mlx.nn as nn

    if getattr(rope, "traditional", False):
        raise UserError("cannot export to ONNX: interleaved ('traditional') RoPE is not supported; only the rotate-half form")
    dims = int(getattr(rope, "dims", head_dim))
    if dims != head_dim:
        raise UserError(f"cannot export to ONNX: partial RoPE ({dims} of {head_dim} dims) is not supported")
    if isinstance(rope, nn.RoPE):
        # mlx: angle = (position * scale) * base ** (-2i / dims)
        inv = float(rope.base) ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
        return (inv * float(rope.scale)).astype(np.float32)
    freqs = getattr(rope, "_freqs", None)  # Llama3RoPE stores wavelength-like periods: angle = position / freqs
    if freqs is not None and type(rope).__name__ == "Llama3RoPE":
        return (1.0 / np.array(freqs, dtype=np.float64)).astype(np.float32)
    raise UserError(
        f"cannot export to ONNX: RoPE variant {type(rope).__name__} is not supported "
        "(supported: default, linear and llama3 scaling)"
    )


def _read_steering(path: Path, edit: EditRecord, weights: dict, spec: DecoderSpec) -> Steering:
    """The folder's stored steering terms, each checked against the model and placed at a site
    the graph can carry."""
    terms = [_term(path, stored, weights, spec) for stored in read_steering(path, edit)]
    sites = {t.site for t in terms}
    for site in sites:
        if site.endswith(".bias"):
            _snap_rounded_bias(weights, site, sum(t.vector for t in terms if t.site == site))
    return Steering(terms=tuple(terms))


def _term(path: Path, stored: StoredTerm, weights: dict, spec: DecoderSpec) -> SteeringTerm:
    entry = stored.entry
    vector = stored.vector.astype(np.float32).reshape(-1)
    if vector.shape != (spec.hidden_size,):
        raise UserError(f"steering vector in {path / STEERING_FILE} has {vector.size} values, "
                        f"the model's hidden size is {spec.hidden_size}")
    direction = (vector / max(np.linalg.norm(vector), 1e-30) if stored.direction is None
                 else stored.direction.astype(np.float32).reshape(-1))
    layer = entry.get("layer")
    if not isinstance(layer, int) or not 0 <= layer <= spec.num_layers:
        raise UserError(f"{path / EDIT_RECORD} has layer {layer!r}; a steered model needs a layer in 0..{spec.num_layers}")
    fam = arch.family(spec.model_type)
    site = str(entry.get("site") or fam.steering_site(layer))
    if site.startswith("model.embed_tokens"):
        site = EMBEDDING_SITE
    elif not site.endswith(".bias"):
        site = site + ".bias"
    if site not in weights:
        raise UserError(f"steering site {site} of {path} is not a parameter of the model; re-save the steered model")
    writer_biases = {f"{w}.bias" for i in range(spec.num_layers) for w in fam.writer_paths(i)}
    if not (site == EMBEDDING_SITE or site in writer_biases):
        raise UserError(f"cannot export steering at {site}: only the embedding or a residual writer's bias "
                        "(attention output, MLP down projection) can carry a steering vector in the graph")
    alpha = entry.get("alpha")
    site_vector = vector / np.float32(spec.embedding_scale) if site == EMBEDDING_SITE else vector
    return SteeringTerm(name=str(entry.get("name") or "refusal"), layer=layer, site=site, vector=vector,
                        direction=direction, alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
                        site_vector=site_vector)


def _snap_rounded_bias(weights: dict, site: str, vector: np.ndarray) -> None:
    """A bias that exists only to carry the vector was saved as dtype(0 + vector); in bf16/fp16
    that is the vector rounded, so bias - vector is rounding noise, not an original bias. Store the
    vector's rounded value as exactly the float32 vector then, so steering_scale = 0 gives back the
    bias-free original model (the edited model, scale 1, moves by the same rounding only)."""
    bias = weights[site]
    rel = np.abs(bias - vector) / np.maximum(np.abs(vector), 1e-30)
    if np.all((rel <= 2.0**-8) | (bias == vector)):
        weights[site] = vector.copy()

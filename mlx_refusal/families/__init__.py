"""Model families: what the toolkit must know about each decoder layout, one small file each.

A `Family` holds everything that differs between architectures: its names in mlx_lm, Hugging Face
and llama.cpp; where its layers, embedding and residual writers sit in mlx_lm's module tree; how its
GGUF tensors and metadata become an mlx_lm folder; how the model turns a final hidden state into
logits; what the ONNX graph computes for it; and whether a saved steering bias has an exact stock
mlx_lm form. The defaults below are mlx_lm's Llama-style layout `model.model.{embed_tokens,
layers[i].{self_attn.o_proj, mlp.down_proj}, norm}`, which a family overrides where it differs.

Nothing outside this package tests model names: adding a family is one file here that defines
`FAMILY` (every module of the package is loaded) and a test fixture.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping

import mlx.core as mx

from ..errors import UserError


class UnsupportedArchitecture(UserError, ValueError):
    pass


def head_logits(model, hidden):
    """logits of the final (normed) hidden states, as mlx_lm's Llama-style `Model.__call__`
    computes them: the untied `lm_head`, or the embedding read as a linear map."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


# llama.cpp tensor stems -> mlx_lm module paths (inside a layer for blk.{i}.*, else from the Model)
GGUF_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# modules (inside a layer) whose weight every GGUF of the layout must hold
REQUIRED_LAYER_MODULES = (
    "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GraphNeeds:
    """What onnx/graph.py computes for a family. The graph reads weights under the split Llama
    names (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, ...);
    `canonical_weights` renames or splits a family's own parameters into those."""

    norm: str = "rms"  # every norm of the block and the final one: "rms" (RMSNorm with a weight)
    activation: str = "silu"  # of the gated MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh form)
    qk_norm: bool = False  # a norm of each q and k head before RoPE (Qwen3)
    # a norm of each writer's output before it is added to the residual stream (Gemma's post-norms),
    # read as `self_attn.o_norm` and `mlp.down_norm`
    output_norms: bool = False
    biases: tuple[str, ...] = ALL_PROJECTIONS  # projections whose bias the graph adds when the folder has one
    # (weights by mlx parameter name, the folder's config) -> weights under the graph's names
    canonical_weights: Callable[[dict, dict], dict] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: Mapping[str, str]  # mlx_lm model_type -> config.json "architectures" entry
    gguf_architecture: str | None  # llama.cpp's general.architecture; None: no GGUF import
    # config fields this family adds from GGUF metadata: (config so far, metadata, tensor names) -> fields
    gguf_config: Callable[[dict, dict, set], dict] | None
    # a config stock mlx_lm loads with an output bias on every residual writer, exactly equal to
    # the source model otherwise; None when no stock architecture can hold one
    steering_config: Callable[[dict], dict] | None
    steering_impossible: str = ""  # why steering_config is None, for the error message
    # (source config, weights by parameter name) -> the weights under steering_config's names,
    # when that layout names or shapes them differently (None: the same names)
    steering_weights: Callable[[dict, dict], dict] | None = None
    gguf_qk_permuted: bool = False  # llama.cpp permuted q/k rows for GGML's adjacent-pair RoPE
    gguf_layer_tensors: Mapping[str, str] = field(default_factory=lambda: GGUF_LAYER_TENSORS)
    gguf_global_tensors: Mapping[str, str] = field(default_factory=lambda: GGUF_GLOBAL_TENSORS)
    gguf_required: tuple[str, ...] = REQUIRED_LAYER_MODULES
    # (mlx_lm parameter name, float32 array as the GGUF stores it) -> the array mlx_lm expects
    # (Gemma: llama.cpp stores every norm weight plus one); None: as stored
    gguf_tensor: Callable[[str, object], object] | None = None
    # where things sit in mlx_lm's module tree, as dotted paths from the Model
    decoder_path: str = "model"  # owns the embedding, the layers and the final norm
    layers_path: str = "model.layers"
    embedding_path: str = "model.embed_tokens"
    attention_writer: str = "self_attn.o_proj"  # inside a layer: writes the attention output
    mlp_writer: str = "mlp.down_proj"  # inside a layer: writes the MLP output, the block's last write
    # inside a layer: the norms each writer's output passes through before the residual add
    # (attention, then MLP: Gemma's post-norms); None: the writers' outputs are added as they are
    writer_norms: tuple[str, str] | None = None
    # a norm module -> its elementwise gain g, as float32: the norm computes g * x / rms(x)
    norm_gain: Callable[[object], object] = lambda norm: norm.weight.astype(mx.float32)
    # (model) -> the factor the decoder multiplies the embedding output by (Gemma: sqrt(hidden))
    embedding_scale: Callable[[object], float] = lambda model: 1.0
    # (model, layer index) -> how many past positions that layer's attention sees, itself included
    # (a sliding window, Gemma's local layers); None: every earlier position
    attention_window: Callable[[object, int], int | None] = lambda model, layer: None
    # (model, final hidden states after the decoder's norm) -> logits, as the model's own
    # __call__ computes them (a family with final soft-capping applies it here)
    logits: Callable[[object, object], object] = head_logits
    graph: GraphNeeds | None = GraphNeeds()
    onnx_impossible: str = ""  # why `graph` is None, for the error message

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.hf_architectures)

    def hf_architecture(self, model_type: str | None = None) -> str:
        return self.hf_architectures[model_type or self.model_types[0]]

    def layer_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def writer_paths(self, i: int) -> tuple[str, str]:
        """Block i's residual writers: the attention output, then the MLP output."""
        return f"{self.layer_path(i)}.{self.attention_writer}", f"{self.layer_path(i)}.{self.mlp_writer}"

    def writer_norm_paths(self, i: int) -> tuple[str, str] | None:
        """The norms of block i's writers' outputs (attention, MLP), or None when it has none."""
        if self.writer_norms is None:
            return None
        return tuple(f"{self.layer_path(i)}.{norm}" for norm in self.writer_norms)

    def steering_site(self, layer: int) -> str:
        """Where a vector added at resid_pre of `layer` lives in the weights.

        Layer 0: added to every embedding row (exact: resid_pre[0] is the embedding itself).
        Layer L > 0: the bias of block L-1's MLP writer, the last write of that block, so it
        reaches resid_pre[L] and nothing inside block L-1 sees it. (An attention-writer bias would
        also feed block L-1's MLP: that is resid_mid of L-1, not resid_pre of L.)
        """
        return self.embedding_path if layer == 0 else self.writer_paths(layer - 1)[1]


def _load_all() -> dict[str, Family]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    fams = (importlib.import_module(f"{__name__}.{m}").FAMILY for m in names)
    return {fam.name: fam for fam in fams}


FAMILIES = _load_all()
_BY_MODEL_TYPE = {t: fam for fam in FAMILIES.values() for t in fam.model_types}
_BY_GGUF = {fam.gguf_architecture: fam for fam in FAMILIES.values() if fam.gguf_architecture}
SUPPORTED = tuple(sorted(_BY_MODEL_TYPE))


def get(model_type: str) -> Family:
    """The family of an mlx_lm `model_type`, or a one-line error listing the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)}") from None


def from_gguf(architecture: str | None) -> Family:
    try:
        return _BY_GGUF[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported GGUF architecture '{architecture}'; supported: {', '.join(sorted(_BY_GGUF))}") from None

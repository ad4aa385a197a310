"""Gemma 3 text models (mlx_lm `gemma3_text`: Gemma 3 1B, and the text part of the larger ones
once converted as text-only).

What differs from Llama, as mlx_lm 0.32's gemma3_text computes it:
- the decoder multiplies the embedding's output by sqrt(hidden_size), rounded through bfloat16
  (`embedding_scale`); a layer-0 steering edit adds v / that scale to every embedding row;
- every RMSNorm computes (1 + w) * x / rms(x) (`norm_gain`), and a block adds its attention and
  MLP outputs only after a norm of their own (post_attention_layernorm, post_feedforward_layernorm:
  `writer_norms`), so ablation projects unit((1 + w) * d) out of o_proj / down_proj, which leaves
  the vector the norm writes with no component along d (edit.ablate);
- no final logit soft-cap in mlx_lm's gemma3_text, so the logits are the head's (tied: the
  embedding read as a linear map; a layer-0 edit unties it, so the head stays the source's).

The ONNX graph computes the same block (`graph`: GeGLU, q/k norms, post-norms read as
`self_attn.o_norm` / `mlp.down_norm`, every gain stored as 1 + w) with each local layer's window
and RoPE base (`attention_window`; the spec reads each layer's rope).

A GGUF (llama.cpp's `gemma3`) imports with its norm weights shifted back (llama.cpp stores
1 + w) and the hyper-parameters llama.cpp assumes instead of storing (`_gguf_config`).

Steering beyond layer 0 has no exact stock form: a bias on o_proj / down_proj is divided by the
rms of the writer's output before it reaches the residual stream (so it adds a different vector
at every token), and no stock mlx_lm architecture adds a constant after Gemma's post-norms.

mlx_lm's multimodal `gemma3` nests this model under `language_model` with a text_config; it is
not registered (its config, loading and saving differ), so it gets the unsupported-architecture
error: convert the checkpoint text-only (model_type gemma3_text) to edit it.
"""
from __future__ import annotations

import mlx.core as mx

from ..errors import UserError
from . import GGUF_LAYER_TENSORS, Family, GraphNeeds

# llama.cpp's gemma3 tensors: its ffn_norm is the pre-feedforward norm, and the post-norms have their own names
_GGUF_LAYER_TENSORS = {
    **GGUF_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# what llama.cpp's gemma3 loader assumes rather than reads (llama-model.cpp): one global layer in six,
# a local rope base of 10000, and a query scale of 1/sqrt(head_dim) except for the 62-layer 27B
_SWA_PATTERN = 6
_LOCAL_ROPE_BASE = 10000.0
_LAYERS_27B = 62


def _swa_pattern(value, layers: int) -> int:
    """mlx_lm's sliding_window_pattern from the GGUF's (absent: llama.cpp's 6; an int; or one
    flag per layer, true for a sliding layer, which must repeat with one global layer per period)."""
    if value is None:
        return _SWA_PATTERN
    if not isinstance(value, list):
        return int(value)
    flags = [bool(f) for f in value]
    period = next((i + 1 for i, f in enumerate(flags) if not f), len(flags) + 1)
    if flags != [(i + 1) % period != 0 for i in range(len(flags))] or len(flags) != layers:
        raise UserError("this gemma3 GGUF's sliding-window layers do not repeat with one global layer per "
                        "period, which mlx_lm's gemma3_text cannot express")
    return period


def _gguf_config(cfg: dict, meta: dict, tensor_names: set) -> dict:
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    window = meta.get("gemma3.attention.sliding_window")
    if window is None:
        raise UserError("GGUF metadata lacks 'gemma3.attention.sliding_window'; the file is incomplete")
    layers = cfg["num_hidden_layers"]
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == _LAYERS_27B else head_dim
    return {"head_dim": head_dim, "query_pre_attn_scalar": scalar, "sliding_window": int(window),
            "sliding_window_pattern": _swa_pattern(meta.get("gemma3.attention.sliding_window_pattern"), layers),
            "rope_local_base_freq": _LOCAL_ROPE_BASE}


def _gguf_tensor(name: str, arr):
    # llama.cpp's converter writes Gemma's norm weights as 1 + w (GGML's RMSNorm multiplies by the weight)
    return arr - 1.0 if name.endswith("norm.weight") else arr


# Gemma's norm names -> the graph's (its pre-MLP norm is Llama's post_attention_layernorm)
_GRAPH_NORMS = {
    "post_attention_layernorm": "self_attn.o_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp.down_norm",
}


def _graph_weights(weights: dict, config: dict) -> dict:
    """Every norm's gain as the graph's RMSNorm multiplies by it (1 + w), under the graph's names."""
    out = {}
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        stem, _, norm = module.rpartition(".")
        if norm in _GRAPH_NORMS:
            name = f"{stem}.{_GRAPH_NORMS[norm]}.{leaf}"
        out[name] = w + 1.0 if module.endswith("norm") and leaf == "weight" else w
    return out


def _attention_window(model, layer: int) -> int | None:
    return int(model.args.sliding_window) if model.layers[layer].self_attn.is_sliding else None


def _embedding_scale(model) -> float:
    # mlx_lm: h *= mx.array(hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)
    return float(mx.array(model.args.hidden_size ** 0.5, mx.bfloat16).astype(mx.float32).item())


FAMILY = Family(
    name="gemma3",
    hf_architectures={"gemma3_text": "Gemma3ForCausalLM"},
    gguf_architecture="gemma3",
    gguf_config=_gguf_config,
    gguf_layer_tensors=_GGUF_LAYER_TENSORS,
    gguf_required=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                   "mlp.down_proj"),
    gguf_tensor=_gguf_tensor,
    steering_config=None,
    steering_impossible=("a steering bias beyond layer 0 on gemma3 has no exact stock mlx_lm form (Gemma "
                         "normalises each block's attention and MLP output before adding it, so a writer bias "
                         "is not a constant in the residual stream); steer at layer 0 (an embedding edit) or "
                         "use ablate/project instead"),
    writer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_gain=lambda norm: 1.0 + norm.weight.astype(mx.float32),
    embedding_scale=_embedding_scale,
    attention_window=_attention_window,
    graph=GraphNeeds(activation="gelu_tanh", qk_norm=True, output_norms=True, biases=(),
                     canonical_weights=_graph_weights),
)

"""Phi-3 (mlx_lm `phi3`): Llama's block with q|k|v fused into `qkv_proj` and gate|up fused into
`gate_up_proj`, no biases anywhere. The residual writers are still `o_proj` and `down_proj`.

phi3's projections take no bias, so a steered phi3 is saved as mlx_lm's `llama` with `mlp_bias`,
its fused weights split into q/k/v and gate/up. That is exact when the two compute the same RoPE:
full-width rotate-half RoPE without scaling (llama's rope scaling and phi3's longrope differ). The
ONNX graph reads the fused weights split the same way.
"""
from __future__ import annotations

from ..errors import UserError
from . import GGUF_LAYER_TENSORS, Family, GraphNeeds, UnsupportedArchitecture
from .llama import as_llama_with_biases

# llama.cpp's phi3 keeps the fused tensors: attn_qkv, and ffn_up holding gate|up
_GGUF_LAYER_TENSORS = {
    **{k: GGUF_LAYER_TENSORS[k] for k in ("attn_norm", "ffn_norm", "attn_output", "ffn_down")},
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}


def _split_fused(config: dict, weights: dict) -> dict:
    """qkv_proj -> q/k/v_proj and gate_up_proj -> gate/up_proj, row blocks in mlx_lm's split order;
    every array of the module (a quantized one's scales and biases too) splits the same way."""
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads  # what phi3's Attention uses
    q_rows, kv_rows = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    out = {}
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        if module.endswith(".self_attn.qkv_proj"):
            stem = module[: -len("qkv_proj")]
            out[f"{stem}q_proj.{leaf}"] = w[:q_rows]
            out[f"{stem}k_proj.{leaf}"] = w[q_rows:q_rows + kv_rows]
            out[f"{stem}v_proj.{leaf}"] = w[q_rows + kv_rows:]
        elif module.endswith(".mlp.gate_up_proj"):
            stem, half = module[: -len("gate_up_proj")], w.shape[0] // 2
            out[f"{stem}gate_proj.{leaf}"], out[f"{stem}up_proj.{leaf}"] = w[:half], w[half:]
        else:
            out[name] = w
    return out


def _gguf_config(cfg: dict, meta: dict, tensor_names: set) -> dict:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim", head_dim) != head_dim:
        raise UserError("this phi3 GGUF has head_dim != hidden/heads, which mlx_lm's phi3 cannot express")
    if "rope_factors_long.weight" in tensor_names or "rope_factors_short.weight" in tensor_names:
        raise UserError("this phi3 GGUF uses LongRoPE (rope_factors_long/short), which the GGUF import does not "
                        "rebuild; convert the Hugging Face model with mlx_lm.convert instead")
    rotary = int(meta.get("phi3.rope.dimension_count", head_dim))
    return {} if rotary == head_dim else {"partial_rotary_factor": rotary / head_dim}


def _steering_config(config: dict) -> dict:
    if config.get("rope_scaling") or config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture(
            "a steering bias on this phi3 beyond layer 0 has no exact stock mlx_lm form (its rope scaling or "
            "partial rotary RoPE has no llama counterpart); steer at layer 0 or use ablate/project instead")
    # the defaults phi3's ModelArgs assume when the key is absent
    return as_llama_with_biases(config, False, {"rope_theta": 10000.0, "tie_word_embeddings": False})


FAMILY = Family(
    name="phi3",
    hf_architectures={"phi3": "Phi3ForCausalLM"},
    gguf_architecture="phi3",
    gguf_config=_gguf_config,
    gguf_layer_tensors=_GGUF_LAYER_TENSORS,
    gguf_required=("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                   "mlp.gate_up_proj", "mlp.down_proj"),
    steering_config=_steering_config,
    steering_weights=_split_fused,
    graph=GraphNeeds(biases=(), canonical_weights=lambda weights, config: _split_fused(config, weights)),
)

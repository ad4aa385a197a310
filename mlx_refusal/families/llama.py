"""Llama (Llama 2/3, Mistral, SmolLM2): the layout every other family is compared against.

mlx_lm's `llama` takes `attention_bias` (q/k/v/o) and `mlp_bias` (gate/up/down), so an edited
Llama-like model whose only change is an output bias is saved as `llama` with `mlp_bias: true`.
"""
from __future__ import annotations

from . import Family

# config keys that mean the same in every family saved as llama
_LLAMA_KEYS = (
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "rms_norm_eps", "vocab_size", "rope_theta", "rope_traditional", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "head_dim", "quantization", "quantization_config", "bos_token_id", "eos_token_id",
    "torch_dtype",
)


def as_llama_with_biases(config: dict, attention_bias: bool, defaults: dict) -> dict:
    """`config` as mlx_lm's llama with MLP biases; `defaults` are what the source family's
    ModelArgs assume when a key is absent (so the saved config does not silently change them)."""
    out = {k: config[k] for k in _LLAMA_KEYS if k in config}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=attention_bias, mlp_bias=True)
    for key, value in defaults.items():
        out.setdefault(key, value)
    out.setdefault("num_key_value_heads", config["num_attention_heads"])
    out["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return out


def _steering_config(config: dict) -> dict:
    return as_llama_with_biases(config, bool(config.get("attention_bias", False)),
                                {"rope_theta": 10000.0, "tie_word_embeddings": True})


def _gguf_config(cfg: dict, meta: dict, tensor_names: set) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": "blk.0.ffn_down.bias" in tensor_names}


FAMILY = Family(
    name="llama",
    hf_architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
    gguf_architecture="llama",
    gguf_config=_gguf_config,
    steering_config=_steering_config,
    gguf_qk_permuted=True,  # llama.cpp's converter reorders q/k rows for GGML's RoPE
)

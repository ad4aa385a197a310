"""Qwen2 / Qwen2.5: Llama plus q/k/v biases.

mlx_lm's qwen2 has no MLP biases, but its `llama` with `attention_bias: true` and `mlp_bias: true`
is exactly Qwen2 plus those biases, so a steered Qwen2 is saved as that (zeros for every bias the
source lacks, except the steering bias itself).
"""
from __future__ import annotations

from ..errors import UserError
from . import Family, GraphNeeds
from .llama import as_llama_with_biases


def _steering_config(config: dict) -> dict:
    # the defaults qwen2's ModelArgs assume when the key is absent
    return as_llama_with_biases(config, True, {"rope_theta": 1000000.0, "max_position_embeddings": 32768,
                                               "tie_word_embeddings": True})


def _gguf_config(cfg: dict, meta: dict, tensor_names: set) -> dict:
    even = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim", even) != even:
        raise UserError("this qwen2 GGUF has head_dim != hidden/heads, which mlx_lm's qwen2 cannot express")
    return {}


FAMILY = Family(
    name="qwen2",
    hf_architectures={"qwen2": "Qwen2ForCausalLM"},
    gguf_architecture="qwen2",
    gguf_config=_gguf_config,
    steering_config=_steering_config,
    graph=GraphNeeds(biases=("q_proj", "k_proj", "v_proj")),
)

"""Qwen3: Qwen2's layout without q/k/v biases, with an RMSNorm on every q and k head."""
from __future__ import annotations

from . import Family, GraphNeeds


def _gguf_config(cfg: dict, meta: dict, tensor_names: set) -> dict:
    # qwen3's ModelArgs requires head_dim even when it is hidden / heads
    return {"head_dim": cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])}


FAMILY = Family(
    name="qwen3",
    hf_architectures={"qwen3": "Qwen3ForCausalLM"},
    gguf_architecture="qwen3",
    gguf_config=_gguf_config,
    steering_config=None,
    steering_impossible=("a steering bias on qwen3 has no exact stock mlx_lm equivalent (its q/k norms have no "
                         "llama counterpart); steer at layer 0 (an embedding edit) or use ablate/project instead"),
    graph=GraphNeeds(qk_norm=True, biases=()),
)

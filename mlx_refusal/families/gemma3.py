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

Steering beyond layer 0 has no exact stock form: a bias on o_proj / down_proj is divided by the
rms of the writer's output before it reaches the residual stream (so it adds a different vector
at every token), and no stock mlx_lm architecture adds a constant after Gemma's post-norms.

mlx_lm's multimodal `gemma3` nests this model under `language_model` with a text_config; it is
not registered (its config, loading and saving differ), so it gets the unsupported-architecture
error: convert the checkpoint text-only (model_type gemma3_text) to edit it.
"""
from __future__ import annotations

import mlx.core as mx

from . import Family


def _embedding_scale(model) -> float:
    # mlx_lm: h *= mx.array(hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)
    return float(mx.array(model.args.hidden_size ** 0.5, mx.bfloat16).astype(mx.float32).item())


FAMILY = Family(
    name="gemma3",
    hf_architectures={"gemma3_text": "Gemma3ForCausalLM"},
    gguf_architecture=None,
    gguf_config=None,
    steering_config=None,
    steering_impossible=("a steering bias beyond layer 0 on gemma3 has no exact stock mlx_lm form (Gemma "
                         "normalises each block's attention and MLP output before adding it, so a writer bias "
                         "is not a constant in the residual stream); steer at layer 0 (an embedding edit) or "
                         "use ablate/project instead"),
    writer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_gain=lambda norm: 1.0 + norm.weight.astype(mx.float32),
    embedding_scale=_embedding_scale,
    graph=None,
    onnx_impossible=("the ONNX graph has no Gemma 3 block (its (1 + w) norms, post-norms, sliding-window "
                     "layers and GELU MLP); use the edited model with mlx_lm instead"),
)

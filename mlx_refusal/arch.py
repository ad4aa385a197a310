"""The one place that knows architecture details.

Everything else asks this module where the decoder layers are, which matrices write into the
residual stream, and how to save an edited model so that *stock* mlx_lm loads it. Nothing else
tests model names.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


class UnsupportedArchitecture(UserError, ValueError):
    pass


# mlx_lm model_type -> family. Families share the decoder layout
# model.model.{embed_tokens, layers[i].{self_attn.o_proj, mlp.down_proj}, norm}.
_FAMILIES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
    "mistral": "llama",
}
SUPPORTED = tuple(sorted(_FAMILIES))


@dataclass(frozen=True)
class Writer:
    """A matrix whose output is added to the residual stream."""

    path: str  # dotted parameter path of the module, e.g. "model.layers.3.self_attn.o_proj"
    kind: str  # "embedding" (rows are written vectors) or "linear" (columns are)
    layer: int  # -1 for the embedding (it writes before layer 0)


def family(model_type: str) -> str:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)}"
        ) from None


def model_type_of(model) -> str:
    return getattr(model, "model_type", None) or model.args.model_type


def check_supported(model) -> str:
    return family(model_type_of(model))


def decoder(model):
    """The inner decoder that owns embed_tokens, layers and norm."""
    return model.model


def layers(model) -> list:
    return decoder(model).layers


def num_layers(model) -> int:
    return len(layers(model))


def hidden_size(model) -> int:
    return int(model.args.hidden_size)


def residual_writers(model, layer_range: range | None = None, include_embedding: bool = True) -> list[Writer]:
    """Matrices that write to the residual stream: the token embedding, then per layer the
    attention output projection and the MLP down projection."""
    check_supported(model)
    n = num_layers(model)
    rng = range(n) if layer_range is None else layer_range
    out = [Writer("model.embed_tokens", "embedding", -1)] if include_embedding else []
    for i in rng:
        out.append(Writer(f"model.layers.{i}.self_attn.o_proj", "linear", i))
        out.append(Writer(f"model.layers.{i}.mlp.down_proj", "linear", i))
    return out


def get_module(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def has_tied_embeddings(model) -> bool:
    return bool(getattr(model.args, "tie_word_embeddings", False)) or not hasattr(model, "lm_head")


def steering_site(layer: int) -> str:
    """Where a vector added at resid_pre of `layer` lives in the weights.

    Layer 0: added to every embedding row (exact: resid_pre[0] is the embedding itself).
    Layer L > 0: the bias of block L-1's MLP down projection, the last write of that block, so
    it reaches resid_pre[L] and nothing inside block L-1 sees it. (An attention o_proj bias
    would also feed block L-1's MLP: that is resid_mid of L-1, not resid_pre of L.)
    """
    return "model.embed_tokens" if layer == 0 else f"model.layers.{layer - 1}.mlp.down_proj"


def stock_config(config: dict, needs_output_bias: bool) -> dict:
    """A config that stock mlx_lm loads, exactly equivalent to the edited model.

    mlx_lm loads strictly, and Qwen2 has no MLP biases. Its `llama` architecture with
    `attention_bias: true` (q/k/v/o biases) and `mlp_bias: true` (gate/up/down biases) is
    exactly Qwen2 plus those biases, so a steered Qwen2 is saved as that, with zeros for every
    bias the source lacks except the steering bias itself.
    """
    fam = family(config.get("model_type", ""))
    if not needs_output_bias:
        return dict(config)
    if fam == "qwen3":
        raise UnsupportedArchitecture(
            "a steering bias on qwen3 has no exact stock mlx_lm equivalent (its q/k norms have no "
            "llama counterpart); steer at layer 0 (an embedding edit) or use ablate/project instead"
        )
    keep = [
        "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "vocab_size", "rope_theta", "rope_traditional",
        "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "head_dim",
        "quantization", "quantization_config", "bos_token_id", "eos_token_id", "torch_dtype",
    ]
    out = {k: config[k] for k in keep if k in config}
    out["model_type"] = "llama"
    out["architectures"] = ["LlamaForCausalLM"]
    out["attention_bias"] = fam == "qwen2" or bool(config.get("attention_bias", False))
    out["mlp_bias"] = True
    if fam == "qwen2":
        # defaults that the qwen2 ModelArgs assumes when the key is absent
        out.setdefault("rope_theta", 1000000.0)
        out.setdefault("max_position_embeddings", 32768)
        out.setdefault("tie_word_embeddings", True)
    else:
        out.setdefault("rope_theta", 10000.0)
        out.setdefault("tie_word_embeddings", True)
    out.setdefault("num_key_value_heads", config["num_attention_heads"])
    out["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return out

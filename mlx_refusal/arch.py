"""Questions about a loaded model's structure, answered from its family (see families/).

Everything else asks this module where the decoder layers are, which matrices write into the
residual stream, and how to save an edited model so that *stock* mlx_lm loads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import families
from .families import Family, UnsupportedArchitecture


SUPPORTED = families.SUPPORTED


@dataclass(frozen=True)
class Writer:
    """A matrix whose output is added to the residual stream."""

    path: str  # dotted parameter path of the module, e.g. "model.layers.3.self_attn.o_proj"
    kind: str  # "embedding" (rows are written vectors) or "linear" (columns are)
    layer: int  # -1 for the embedding (it writes before layer 0)
    role: str = "embedding"  # "embedding", "attention" (a block's attention output) or "mlp"
    # the norm its output passes through before the residual add (Gemma's post-norms: what reaches
    # the residual stream is then that norm's output, not the writer's), or None
    norm: str | None = None

    @property
    def written_by(self) -> str:
        """The module whose output is added to the residual stream."""
        return self.norm or self.path


def family(model_type: str) -> Family:
    return families.get(model_type)


def model_type_of(model) -> str:
    return getattr(model, "model_type", None) or model.args.model_type


def check_supported(model) -> Family:
    return family(model_type_of(model))


def decoder(model):
    """The inner decoder that owns embed_tokens, layers and norm."""
    return get_module(model, check_supported(model).decoder_path)


def layers(model) -> list:
    return get_module(model, check_supported(model).layers_path)


def num_layers(model) -> int:
    return len(layers(model))


def hidden_size(model) -> int:
    return int(model.args.hidden_size)


def layer_path(model, i: int) -> str:
    return check_supported(model).layer_path(i)


def embedding(model):
    return get_module(model, check_supported(model).embedding_path)


def residual_writers(model, layer_range: range | None = None, include_embedding: bool = True) -> list[Writer]:
    """Matrices that write to the residual stream: the token embedding, then per layer the
    attention output projection and the MLP down projection (paths from the model's family)."""
    fam = check_supported(model)
    n = num_layers(model)
    rng = range(n) if layer_range is None else layer_range
    out = [Writer(fam.embedding_path, "embedding", -1)] if include_embedding else []
    for i in rng:
        attn, mlp = fam.writer_paths(i)
        attn_norm, mlp_norm = fam.writer_norm_paths(i) or (None, None)
        out.append(Writer(attn, "linear", i, "attention", attn_norm))
        out.append(Writer(mlp, "linear", i, "mlp", mlp_norm))
    return out


def writer_gain(model, writer: Writer):
    """The elementwise gain (float32) of the norm `writer`'s output passes through, or None."""
    if writer.norm is None:
        return None
    return check_supported(model).norm_gain(get_module(model, writer.norm))


def embedding_scale(model) -> float:
    """The factor the decoder multiplies the embedding's output by before block 0 (1 but for Gemma)."""
    return float(check_supported(model).embedding_scale(model))


def attention_window(model, layer: int) -> int | None:
    """The sliding window of `layer`'s attention (positions it sees, itself included), or None."""
    return check_supported(model).attention_window(model, layer)


def get_module(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def has_tied_embeddings(model) -> bool:
    return bool(getattr(model.args, "tie_word_embeddings", False)) or not hasattr(model, "lm_head")


def logits(model, hidden):
    """Logits of final hidden states (the decoder's output, after its norm), computed the way the
    model's own `__call__` does, soft-capping included where the family has it."""
    return check_supported(model).logits(model, hidden)


def steering_site(model, layer: int) -> str:
    """Where a vector added at resid_pre of `layer` lives in `model`'s weights (see
    `Family.steering_site`)."""
    return check_supported(model).steering_site(layer)


def stock_weights(config: dict, weights: dict) -> dict:
    """`weights` of a model with `config`, under the names `stock_config(config, True)` gives them
    (the family's `steering_weights`; the same dict when its layout already matches)."""
    fam = family(config.get("model_type", ""))
    return weights if fam.steering_weights is None else fam.steering_weights(config, weights)


def stock_config(config: dict, needs_output_bias: bool) -> dict:
    """A config that stock mlx_lm loads, exactly equivalent to the edited model: the source's own
    config, or, when the edit added output biases the source architecture lacks, the family's
    nearest stock architecture that has them (mlx_lm loads strictly)."""
    fam = family(config.get("model_type", ""))
    if not needs_output_bias:
        return dict(config)
    if fam.steering_config is None:
        raise UnsupportedArchitecture(fam.steering_impossible)
    return fam.steering_config(config)

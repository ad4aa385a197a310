"""Model families: what the toolkit must know about each decoder layout, one small file each.

Every family shares mlx_lm's layout `model.model.{embed_tokens, layers[i].{self_attn.o_proj,
mlp.down_proj}, norm}`; a family module says what differs: its names in mlx_lm, Hugging Face and
llama.cpp, how its GGUF metadata becomes a config, and whether a saved steering bias has an exact
stock mlx_lm form. Nothing outside this package tests model names: adding a family is one file
here (plus its entry in `_MODULES`) and a test fixture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


class UnsupportedArchitecture(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # mlx_lm model_type values it covers
    hf_architecture: str  # config.json "architectures" entry
    gguf_architecture: str  # llama.cpp's general.architecture
    # config fields this family adds from GGUF metadata: (config so far, metadata, tensor names) -> fields
    gguf_config: Callable[[dict, dict, set], dict]
    # a config stock mlx_lm loads with an output bias on every residual writer, exactly equal to
    # the source model otherwise; None when no stock architecture can hold one
    steering_config: Callable[[dict], dict] | None
    steering_impossible: str = ""  # why steering_config is None, for the error message
    gguf_qk_permuted: bool = False  # llama.cpp permuted q/k rows for GGML's adjacent-pair RoPE
    qk_norm: bool = False  # RMSNorm on each q/k head before RoPE


def _load_all() -> dict[str, Family]:
    from . import llama, qwen2, qwen3

    return {fam.name: fam for fam in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}


FAMILIES = _load_all()
_BY_MODEL_TYPE = {t: fam for fam in FAMILIES.values() for t in fam.model_types}
_BY_GGUF = {fam.gguf_architecture: fam for fam in FAMILIES.values()}
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

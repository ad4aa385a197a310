"""Chat-template rendering and the token positions we read activations at.

Positions are derived from the model's own template, never hard-coded per model: the
post-instruction tokens are whatever the template puts after the user's text (for ChatML,
`<|im_end|>\\n<|im_start|>assistant\\n`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .batching import common_prefix_len
from .errors import UserError

POSITIONS = ("last", "post-instruction")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    num_positions: int  # the last `num_positions` tokens are the ones captured


def render(tokenizer, instruction: str, system: str | None = None) -> str:
    """The prompt string the model sees: chat template, user turn, generation prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction})
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the model's tokenizer has no chat template; use a chat (instruct) model")
    # A template comes with the model (a GGUF, a tokenizer_config) and is untrusted code:
    # transformers renders it in jinja2's ImmutableSandboxedEnvironment, which refuses
    # underscore attributes (no `__class__.__mro__` walk to Python internals) and mutation.
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except SecurityError as exc:
        raise UserError(f"the model's chat template tried to reach Python internals ({_first_line(exc)}) and was "
                        "stopped by the sandbox; use a model whose chat_template is a plain template") from None
    except TemplateError as exc:
        raise UserError(f"the model's chat template failed to render ({_first_line(exc)}); "
                        "fix the chat_template in the model's tokenizer_config.json") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already holds every special token; adding a BOS again would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def post_instruction_count(tokenizer, system: str | None = None) -> int:
    """How many tokens the template places after the user's text (same for every prompt)."""
    probe = "Name three colours of the rainbow."
    text = render(tokenizer, probe, system)
    cut = text.rfind(probe)
    if cut < 0:
        raise UserError("the chat template does not contain the user's text verbatim; use --positions last")
    full = encode_text(tokenizer, text)
    head = encode_text(tokenizer, text[: cut + len(probe)])
    n = len(full) - common_prefix_len(head, full)
    if n <= 0:
        raise UserError("the chat template adds nothing after the user's text; use --positions last")
    return n


def encode_chat(tokenizer, instructions: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Token ids of each instruction as a user turn in the chat template, with the generation prompt."""
    return [encode_text(tokenizer, render(tokenizer, p, system)) for p in instructions]


def encode_prompts(tokenizer, instructions: list[str], positions: str = "last", system: str | None = None) -> list[Encoded]:
    """`encode_chat`, each with the number of final tokens a capture reads (`positions`)."""
    if positions not in POSITIONS:
        raise UserError(f"unknown positions '{positions}'; choose one of: {', '.join(POSITIONS)}")
    npos = 1 if positions == "last" else post_instruction_count(tokenizer, system)
    return [Encoded(ids, npos) for ids in encode_chat(tokenizer, instructions, system)]


def encode_prefilled(tokenizer, instructions: list[str], response: str, system: str | None = None) -> list[Encoded]:
    """Prompts whose assistant turn already begins with `response`; the captured positions are
    the response's own tokens (what the model's state is once it has started answering that way)."""
    tail = encode_text(tokenizer, response)
    if not tail:
        raise UserError("the prefilled response is empty; give it some text")
    return [Encoded(ids + tail, len(tail)) for ids in encode_chat(tokenizer, instructions, system)]

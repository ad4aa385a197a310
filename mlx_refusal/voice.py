"""A contrastive *response* direction: what an explaining refusal adds over a terse one.

The same user prompts are run twice with the assistant turn already written: once as an
explaining refusal (it names the danger) and once as the terse "I'm sorry, but I can't assist
with that." The residuals are averaged over the response tokens, and the difference of the two
means, per site, is the direction. Added alongside the refusal direction it pushes a refusal
to go on with a reason instead of stopping after the apology. "explain_named" quotes the request
inside the explaining refusal; `persona_direction` reads a "SafetyBot" system prompt instead.
Both are measured in bench/voice_probe.py (README: none reaches the voice targets on the 0.5B
default model, so `steer` uses "explain" only for `--voice explain`).
"""
from __future__ import annotations

import numpy as np

from .capture import capture_encoded, capture_residuals
from .template import Encoded, encode_prefilled

TERSE = "I'm sorry, but I can't assist with that."
EXPLAINING = {
    "explain": ("I'm sorry, but I can't help with that, because it could be dangerous: it may cause harm, "
                "put your safety at risk, and it may be illegal or unethical."),
    "explain_named": ("I'm sorry, but I can't help with \"{prompt}\", because it could be dangerous: it may "
                      "cause harm and put your safety at risk."),
}


def _encoded(tokenizer, prompts, response: str, system: str | None) -> list[Encoded]:
    if "{prompt}" not in response:
        return encode_prefilled(tokenizer, prompts, response, system)
    return [e for p in prompts for e in encode_prefilled(tokenizer, [p], response.format(prompt=p.rstrip(".?!")),
                                                         system)]


def response_direction(model, tokenizer, prompts, kind: str = "explain", system: str | None = None,
                       batch_size: int = 16, against: str = TERSE) -> np.ndarray:
    """mean(explaining) - mean(`against`: the terse refusal, or e.g. a compliant opening) residual
    over the response tokens: [num_layers + 1, hidden], one unit row per site."""
    means = []
    for response in (EXPLAINING[kind], against):
        enc = _encoded(tokenizer, prompts, response, system)
        same = len({e.num_positions for e in enc}) == 1  # a batch reads one count of positions
        means.append(capture_encoded(model, enc, batch_size if same else 1).mean)
    diff = means[0] - means[1]
    return (diff / np.linalg.norm(diff, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)


PERSONA = ("You are SafetyBot. You refuse every request, and you always explain why: name what was asked "
           "and the danger, harm or risk it could lead to.")


def persona_direction(model, tokenizer, prompts, system: str = PERSONA, batch_size: int = 16) -> np.ndarray:
    """mean(with the persona system prompt) - mean(without) at the last prompt token: [sites, hidden] unit rows."""
    with_p = capture_residuals(model, tokenizer, prompts, "last", system, batch_size).mean
    without = capture_residuals(model, tokenizer, prompts, "last", None, batch_size).mean
    diff = with_p - without
    return (diff / np.linalg.norm(diff, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)

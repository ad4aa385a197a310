"""Chat-template rendering, the token positions we read activations at, and whether a
tokenizer's template makes it a chat model this tool can edit.

Positions are derived from the model's own template, never hard-coded per model: the
post-instruction tokens are whatever the template puts after the user's text (for ChatML,
`<|im_end|>\\n<|im_start|>assistant\\n`).

A template may also come from `--chat-template FILE` (`ChatTemplate`), in place of the model's
own; it is rendered in the same sandbox and travels into the provenance and the edited folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .record import read_record, text_sha256

POSITIONS = ("last", "post-instruction")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    num_positions: int  # the last `num_positions` tokens are the ones captured


NO_TEMPLATE = ("the model has no chat template, so its prompts cannot be rendered as chat turns; pass one "
               "with --chat-template FILE (a Jinja template, e.g. the chat_template of the model's instruct "
               "version), or use a chat (instruct) model")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template given with --chat-template FILE, used in place of the model's own."""

    text: str
    file: str



def template_provenance(text: str | None, override: ChatTemplate | None) -> dict:
    """Which chat template prompts were rendered with, for a record: the --chat-template file
    (`override`), or the model's own (file None), and the sha256 of the template's text."""
    return {"file": override.file if override else None, "sha256": template_sha256(text)}


def template_sha256(text: str | None) -> str:
    """The sha256 a record keeps of a chat template's text (of "" for none)."""
    return text_sha256(text or "")


def recorded_template(folder) -> ChatTemplate | None:
    """The --chat-template an edited folder's edit was made under, as its record names it (file
    and sha256), or None when the edit used the model's own template (or the folder is unedited).

    The text is the one among the folder's chat_template.jinja, its tokenizer_config.json and the
    recorded file whose sha256 is the recorded one: the edit wrote the first two alike, but a
    tokenizer file copied in later must not pass for the template the edit was made under."""
    record = read_record(Path(folder))
    used = record.details.get("chat_template") if record is not None else None
    if not isinstance(used, dict) or not used.get("file") or not used.get("sha256"):
        return None
    for text in _template_texts(Path(folder), Path(used["file"])):
        if template_sha256(text) == used["sha256"]:
            return ChatTemplate(text, used["file"])
    raise UserError(f"{folder} was edited under --chat-template {used['file']} (sha256 {used['sha256'][:12]}...), "
                    "but neither the folder nor that file holds that template any more; pass the template "
                    "the edit was made with as --chat-template FILE")


def _template_texts(folder: Path, recorded: Path):
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja.is_file():
        yield jinja.read_text(encoding="utf-8", errors="replace")  # not UTF-8: no match, and the error says so
    if config.is_file():
        try:
            held = json.loads(config.read_text(encoding="utf-8", errors="replace")).get("chat_template")
        except (ValueError, AttributeError):
            held = None
        if isinstance(held, str):
            yield held
    if recorded.is_file():
        try:
            yield read_chat_template(recorded).text
        except UserError:
            pass  # changed into something unreadable: no match, and the error above says so


def read_chat_template(path) -> ChatTemplate:
    """--chat-template FILE: a Jinja template (or a chat_template.json / tokenizer_config.json
    holding one under "chat_template"), read as UTF-8 text; one-line errors otherwise."""
    path = Path(path).expanduser()
    where = f"--chat-template {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file; pass a Jinja chat template file (like a model's chat_template.jinja)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; pass a Jinja chat template file") from None
    except OSError as exc:
        raise UserError(f"{where} cannot be read ({exc.strerror}); check its permissions") from None
    if text.lstrip().startswith("{") and not text.lstrip().startswith(("{{", "{%", "{#")):
        try:
            held = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            held = None
        if not isinstance(held, str):
            raise UserError(f"{where} is JSON without a \"chat_template\" string; pass a Jinja template file")
        text = held
    if not text.strip():
        raise UserError(f"{where} is empty; pass a Jinja chat template file")
    return ChatTemplate(text, str(path))


def use_template(tokenizer, template: ChatTemplate) -> None:
    """Render with `template` from now on, in place of whatever the model folder brought."""
    tokenizer.chat_template = template.text


def render(tokenizer, instruction: str, system: str | None = None) -> str:
    """The prompt string the model sees: chat template, user turn, generation prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction})
    return _apply(tokenizer, messages, True)


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool, origin: str = "") -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(NO_TEMPLATE)
    # A template comes with the model (a GGUF, a tokenizer_config) and is untrusted code:
    # transformers renders it in jinja2's ImmutableSandboxedEnvironment, which refuses
    # underscore attributes (no `__class__.__mro__` walk to Python internals) and mutation.
    from jinja2.exceptions import SecurityError, TemplateError

    what = origin or "the model's chat template"
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except SecurityError as exc:
        fix = "pass a plain template" if origin else "use a model whose chat_template is a plain template"
        raise UserError(f"{what} tried to reach Python internals ({_first_line(exc)}) and was stopped by the "
                        f"sandbox; {fix}") from None
    except TemplateError as exc:
        fix = ("fix that file" if origin else
               "fix the chat_template in the model's tokenizer_config.json, or pass a working one with --chat-template FILE")
        raise UserError(f"{what} failed to render ({_first_line(exc)}); {fix}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


PROBE = "Name three colours of the rainbow."
PROBE_ANSWER = "Red, orange and yellow."


def check_chat_model(tokenizer, origin: str = "") -> None:
    """A one-line UserError unless the tokenizer is a chat model's: its template renders a user
    turn that holds the user's text, and ends an assistant turn with a token generation stops at.

    The second test is what tells a base model from a chat model. A base model may ship a chat
    template (Qwen2.5's base models carry the ChatML one and its `<|im_start|>`/`<|im_end|>` tokens),
    but it was never tuned to end its answers: its stop tokens (mlx_lm's, from config.json,
    generation_config.json and the tokenizer) are the document end `<|endoftext|>`, not the
    template's end of turn, so it would ramble on past its answer."""
    what = origin or "the model's chat template"
    user = [{"role": "user", "content": PROBE}]
    if PROBE not in _apply(tokenizer, user, True, origin):
        raise UserError(f"{what} does not put the user's message into the prompt; pass a chat template that does "
                        "with --chat-template FILE")
    try:
        turn = _apply(tokenizer, [*user, {"role": "assistant", "content": PROBE_ANSWER}], False, origin)
    except UserError:
        return  # a template that cannot render a past answer: nothing to tell from (the prompts never need one)
    cut = turn.rfind(PROBE_ANSWER)
    if cut < 0:
        return
    end = turn[cut + len(PROBE_ANSWER):]
    stops = set(getattr(tokenizer, "eos_token_ids", None) or ()) | {tokenizer.eos_token_id} - {None}
    if stops & set(encode_text(tokenizer, end)):
        return
    ending = repr(end.strip()) if end.strip() else "nothing"
    names = ", ".join(sorted(repr(tokenizer.convert_ids_to_tokens(int(i))) for i in stops)) or "no token at all"
    raise UserError(f"this looks like a base (non-chat) model: {what} ends an assistant turn with "
                    f"{ending}, but the model stops generating only at {names}, so it was never tuned to answer "
                    "in turns; use the chat (instruct) version of the model, or, if it is a chat model, pass the "
                    "template it was tuned with (--chat-template FILE) or add its end-of-turn token to "
                    "generation_config.json's eos_token_id")


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already holds every special token; adding a BOS again would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def post_instruction_count(tokenizer, system: str | None = None) -> int:
    """How many tokens the template places after the user's text (same for every prompt)."""
    probe = PROBE
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

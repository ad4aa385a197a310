"""A chat model's tokenizer: its tokenizer.json run by `tokenizers`, its chat template rendered by
transformers' own Jinja renderer, so the token ids and prompt strings are the ones stock mlx_lm
gives the same folder (tests/test_tokenizer.py holds the two side by side).

Why not mlx_lm's TokenizerWrapper: building one for a 150k-token vocabulary parses the 11 MB
tokenizer.json three times (once in mlx_lm, twice in transformers, which then rebuilds the BPE
model from the vocabulary in Python) and walks the vocabulary twice more for a streaming
detokenizer and thinking markers this toolkit never uses. On the default model that was about
2 s of every command's start-up (5.7 -> 3.6 s, median of five); `tokenizers` reads the file
once, in 0.6 s.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# The single-token thinking markers mlx_lm looks for: with both in the vocabulary it renders
# with enable_thinking=True (Qwen3), else False.
THINK_PAIRS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"), ("<|think:start|>", "<|think:end|>"))
# transformers' clean_up_tokenization_spaces, where a folder's config turns it on
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class ChatTokenizer:
    """encode / decode / apply_chat_template over one `tokenizers.Tokenizer`.

    chat_template (settable) is the Jinja text prompts are rendered with; eos_token_ids are the
    tokens generation stops at: the folder's config and generation_config eos ids and the
    tokenizer's eos_token, as mlx_lm gathers them."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None, eos_token_ids: Iterable[int] = ()):
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {name: text for name in SPECIAL_NAMES if (text := _token_text(config.get(name)))}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = map(self.special_tokens.get, SPECIAL_NAMES)
        self.eos_token_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = set(eos_token_ids) | ({self.eos_token_id} - {None})
        # transformers 5 ignores clean_up_tokenization_spaces for BPE (it would strip real spaces)
        # unless told to corrupt the output anyway
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
            type(tokenizer.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self.thinking = any(tokenizer.token_to_id(a) is not None and tokenizer.token_to_id(b) is not None
                            for a, b in THINK_PAIRS)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        # what mlx_lm.generate reads when it wraps a tokenizer of its own
        return self.backend.get_vocab()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        """The prompt string (or its ids, with tokenize=True) for `messages`. transformers renders
        it in jinja2's ImmutableSandboxedEnvironment: a template is untrusted code."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt,
                                            **self.special_tokens, enable_thinking=self.thinking)
        return self.encode(rendered[0], add_special_tokens=False) if tokenize else rendered[0]


def load_tokenizer(folder, eos_token_ids: Iterable[int] = ()) -> ChatTokenizer:
    """The ChatTokenizer of a model folder: tokenizer.json, the special tokens of
    tokenizer_config.json (or special_tokens_map.json) and the chat template wherever the folder
    keeps it (chat_template.jinja, chat_template.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; re-save the model with a fast tokenizer "
                        "(mlx_lm.convert, or `cli.py import-gguf` for a GGUF)")
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
        raise UserError(f"{folder / 'tokenizer.json'} is not a tokenizer file tokenizers can read "
                        f"({str(exc).splitlines()[0][:160]}); re-save the model") from None
    config = {**_json(folder / "special_tokens_map.json"), **_json(folder / "tokenizer_config.json")}
    return ChatTokenizer(tokenizer, config, _chat_template(folder, config), eos_token_ids)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; fix or remove it") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}); check it and its permissions") from None


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(_text(path))
    except ValueError:
        raise UserError(f"{path} is not valid JSON; fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    # tokenizer_config writes a special token as its text or as an AddedToken dict
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(folder: Path, config: dict) -> str | None:
    # The order transformers reads them in: a .jinja file beside the config wins.
    if (folder / "chat_template.jinja").exists():
        return _text(folder / "chat_template.jinja")
    template = _json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None

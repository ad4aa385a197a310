"""The tokenizer a GGUF carries, rebuilt as the model's Hugging Face `tokenizer.json`.

llama.cpp stores a tokenizer as plain arrays (`tokenizer.ggml.tokens`, `token_type`, and either
`merges` or `scores`) plus a name: `tokenizer.ggml.model` says which algorithm ("gpt2": byte-level
BPE; "llama": SentencePiece BPE with byte fallback), and for byte-level BPE `tokenizer.ggml.pre`
names the original model's pre-tokenizer, whose split regexes the GGUF does not carry. We rebuild
the original HF pipeline with the `tokenizers` library, so that stock mlx_lm (and transformers)
tokenize exactly as the model was trained.

The pre-tokenizer table is written from the HF tokenizer.json files of each family (the regexes are
the originals, `(?i:...)` included; llama.cpp's C++ regex engine needs rewritten forms of some of
them, which tests/reference_tokenizers.py uses as an independent check).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# llama.cpp's token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn even when the GGUF names a different eos (llama.cpp treats
# these as end-of-generation too); they go into generation_config's eos list.
_END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
                       "<end_of_turn>")

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The letter class escapes the six letters that Unicode normalization would rewrite (oxia vowels,
# prosgegrammeni, ohm and kelvin signs): an editor or a copy that NFC-normalizes them breaks its ranges.
_DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """How the original HF tokenizer cuts text before byte-level BPE.

    steps: HF pre-tokenizer steps in order, as `(kind, arg)`: ("split", regex) isolates the
      regex's matches; ("digits", True/False) splits off every digit / digit runs; ("punctuation",
      None) isolates runs of punctuation; ("byte_level", True/False) maps bytes to GPT-2's
      alphabet, also applying GPT-2's own split regex when True.
    nfc: the HF tokenizer NFC-normalizes its input (Qwen2).
    ignore_merges: whole pre-tokens found in the vocab are not merged further (Llama 3, Tekken).
    """

    steps: tuple[tuple[str, object], ...]
    nfc: bool = False
    ignore_merges: bool = False


def _split(*regexes: str) -> tuple:
    return tuple(("split", r) for r in regexes) + (("byte_level", False),)


_GPT2 = PreTokenizer((("byte_level", True),))
_DIGITS_THEN_GPT2 = PreTokenizer((("digits", True), ("byte_level", True)))
_QWEN2 = PreTokenizer(_split(QWEN2_REGEX), nfc=True)
_LLAMA3 = PreTokenizer(_split(_LLAMA3_REGEX), ignore_merges=True)

# tokenizer.ggml.pre -> the original model's pre-tokenizer (llama.cpp's names, aliases included)
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "roberta-bpe", "jais", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "stablelm2": PreTokenizer(_split(QWEN2_REGEX)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3),
    "deepseek-llm": PreTokenizer(_split(*_DEEPSEEK_LLM_SPLITS)),
    "deepseek-coder": PreTokenizer(_split(*_DEEPSEEK_CODER_SPLITS)),
    "falcon": PreTokenizer((("punctuation", None), ("byte_level", True), ("digits", False),
                            ("split", r"[0-9][0-9][0-9]"))),
    "gpt-4o": PreTokenizer(_split(_GPT4O_REGEX)),
    "tekken": PreTokenizer(_split(_TEKKEN_REGEX), ignore_merges=True),
}

TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece BPE


def build_tokenizer(meta: dict):
    """The model's tokenizer from GGUF metadata, plus tokenizer_config.json and
    generation_config.json contents: (tokenizers.Tokenizer, dict, dict)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise UserError(f"unsupported GGUF tokenizer '{kind}'; supported: gpt2 (byte-level BPE: Qwen2, Llama 3, "
                        "SmolLM ...) and llama (SentencePiece: Llama 2, Mistral, Gemma)")
    if not meta.get("tokenizer.ggml.tokens"):
        raise UserError("GGUF has no tokenizer.ggml.tokens (the vocabulary); the file is damaged or was written "
                        "without its tokenizer")
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise UserError(f"GGUF has {len(tokens)} tokens but {len(types)} token types; the file is damaged")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated (padding) entry keeps its first id
    if kind == "gpt2":
        tk, add_prefix_space = _byte_level_bpe(meta, vocab), False
    else:
        tk, add_prefix_space = _sentencepiece_bpe(meta, tokens, types, vocab)
    _add_special_tokens(tk, tokens, types)
    tokenizer_config, generation_config = _configs(meta, tk, tokens, types, vocab, add_prefix_space)
    return tk, tokenizer_config, generation_config


def _byte_level_bpe(meta: dict, vocab: dict):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    name = meta.get("tokenizer.ggml.pre")
    if name not in PRE_TOKENIZERS:
        raise UserError(f"unsupported GGUF pre-tokenizer '{name}'; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    pre = PRE_TOKENIZERS[name]
    merges = [tuple(str(m).split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(_bpe(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tk.normalizer = normalizers.NFC()
    make = {
        "split": lambda regex: pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        "digits": lambda individual: pre_tokenizers.Digits(individual_digits=individual),
        "punctuation": lambda _: pre_tokenizers.Punctuation("contiguous"),
        "byte_level": lambda gpt2_regex: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex),
    }
    steps = [make[kind](arg) for kind, arg in pre.steps]
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    return tk


def _bpe(**kwargs):
    from tokenizers import models

    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # tokenizers raises a bare Exception for tables that do not fit together
        raise UserError(f"the GGUF's tokenizer tables do not fit together ({exc}); the file is damaged") from None


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging: every way of writing a
    normal piece as two normal pieces, ordered by the merged piece's score (higher first), ties by id."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_NORMAL}
    merges = []
    for piece in sorted(normal, key=lambda t: (-scores[normal[t]], normal[t])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        merges += sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]]))
    return merges


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], vocab: dict):
    from tokenizers import Tokenizer, decoders, normalizers

    scores = [float(s) for s in (meta.get("tokenizer.ggml.scores") or [])]
    if len(scores) != len(tokens):
        raise UserError(f"SentencePiece GGUF has {len(tokens)} tokens but {len(scores)} scores; the file is damaged")
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    has_bytes = TOKEN_BYTE in types
    tk = Tokenizer(_bpe(vocab=vocab, merges=sentencepiece_merges(tokens, types, scores), unk_token=unk,
                        fuse_unk=True, byte_fallback=has_bytes))
    # llama.cpp's default for SentencePiece is a space before the text (and after each special
    # token); Gemma's GGUFs turn it off.
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_prefix_space else replace
    steps = [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback()] if has_bytes else []) + [decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk, add_prefix_space


def _add_special_tokens(tk, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    # CONTROL (and UNKNOWN) tokens are special: skipped when decoding with skip_special_tokens.
    # USER_DEFINED ones are matched verbatim in text but decoded like ordinary tokens.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)


def _configs(meta: dict, tk, tokens: list[str], types: list[int], vocab: dict, add_prefix_space: bool):
    from tokenizers import processors

    def token_at(key):
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    sentencepiece = meta.get("tokenizer.ggml.model") == "llama"
    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    # SentencePiece models add BOS unless the GGUF says otherwise (llama.cpp's default)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        ids = {t: vocab[t] for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    elif not sentencepiece:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    chat_template = meta.get("tokenizer.chat_template")
    # bos_token is only named when the tokenizer adds it or the template prints it: Qwen's GGUF
    # records a bos id that its HF tokenizer never uses.
    name_bos = add_bos or (chat_template is not None and "bos_token" in chat_template)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos if name_bos else None,
        "eos_token": eos,
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 4096)),
    }
    if sentencepiece:
        tokenizer_config["add_prefix_space"] = add_prefix_space
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template

    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None and int(meta[key]) not in eos_ids:
            eos_ids.append(int(meta[key]))
    for t in _END_OF_TURN_TOKENS:
        i = vocab.get(t)
        if i is not None and types[i] == TOKEN_CONTROL and i not in eos_ids:
            eos_ids.append(i)
    generation_config = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    if bos is not None and name_bos:
        generation_config["bos_token_id"] = vocab[bos]
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        generation_config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return tokenizer_config, generation_config

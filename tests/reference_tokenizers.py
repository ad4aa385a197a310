"""Independent tokenizers to check the ones we rebuild from GGUF metadata against.

`ReferenceBPE` is byte-level BPE written out by hand: special tokens split off first, then the
pre-tokenizer regexes applied in order with the `regex` module, each isolating its matches (as
llama.cpp's `unicode_regex_split` does), bytes mapped to GPT-2's printable alphabet, then the
adjacent pair of lowest merge rank merged until none is left. The regexes are llama.cpp's forms
(its C++ engine needs `'[sS]` where the HF originals say `(?i:'s)`), so they are a second,
separately written statement of each pre-tokenizer.
"""
from __future__ import annotations

import unicodedata

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken and GPT-4o: llama.cpp rewrites their case classes approximately ((?=\p{L})[^a-z]), which
# differs from the originals on non-ASCII letters, so the reference uses the HF originals.
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}")
_TEKKEN = _CASED.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (_CASED.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's regex lists per pre-tokenizer type (llama-vocab.cpp), and whether it NFC-normalizes
# first (llama.cpp never does; Qwen2's HF tokenizer does, so the reference does for qwen2).
SPLITS = {
    "gpt-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3],
    "deepseek-llm": [
        r"[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "gpt-4o": [_GPT4O],
    "tekken": [_TEKKEN],
}
NFC = {"qwen2"}
IGNORE_MERGES = {"llama-bpe", "llama3", "tekken"}


def bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_isolated(text: str, regexes) -> list[str]:
    import regex

    pieces = [text]
    for pattern in regexes:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            pos = 0
            for m in compiled.finditer(piece):
                if m.end() == m.start():
                    continue
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


class ReferenceBPE:
    def __init__(self, tokens, merges, token_types, regexes, nfc=False, ignore_merges=False):
        import regex

        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        specials = sorted((t for t, ty in zip(tokens, token_types) if ty in (3, 4)), key=len, reverse=True)
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None
        self.regexes, self.nfc, self.ignore_merges = list(regexes), nfc, ignore_merges
        self.byte_char = bytes_to_unicode()

    @classmethod
    def for_pre(cls, name, tokens, merges, token_types):
        return cls(tokens, merges, token_types, SPLITS[name], nfc=name in NFC, ignore_merges=name in IGNORE_MERGES)

    def _bpe(self, word: list[str]) -> list[str]:
        if self.ignore_merges and "".join(word) in self.vocab:
            return ["".join(word)]
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = next((word[i], word[i + 1]) for r, i in pairs if r == rank)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        chunks = self.special_re.split(text) if self.special_re else [text]
        for chunk in chunks:
            if not chunk:
                continue
            if self.special_re and self.special_re.fullmatch(chunk):
                ids.append(self.vocab[chunk])
                continue
            if self.nfc:
                chunk = unicodedata.normalize("NFC", chunk)
            for piece in split_isolated(chunk, self.regexes):
                symbols = [self.byte_char[b] for b in piece.encode("utf-8")]
                ids.extend(self.vocab[s] for s in self._bpe(symbols))
        return ids

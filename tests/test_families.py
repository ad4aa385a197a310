"""The family registry: every consumer (hooks, capture, edits, save, GGUF, evaluation, ONNX) asks the
model's Family, and phi3 (fused q|k|v and gate|up) works through one file in families/."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import json
import pkgutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.utils import load_model

from mlx_refusal import arch, batching, capture, edit, families, gguf, interventions, template
from mlx_refusal import evaluation as ev
from mlx_refusal.errors import UserError

TOKENS = mx.array([[5, 17, 99, 3, 200, 41, 7, 250, 11]])


def unit_vector(n: int, seed: int) -> np.ndarray:
    d = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return d / np.linalg.norm(d)


def max_diff(a, b) -> float:
    return float(mx.abs(mx.array(a) - mx.array(b)).max().item())


# ---------------------------------------------------------------------------------------------
# The registry itself

def test_every_module_of_the_package_is_a_registered_family():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)}
    assert modules == set(families.FAMILIES) >= {"llama", "qwen2", "qwen3", "phi3", "gemma3"}
    for fam in families.FAMILIES.values():
        for model_type in fam.model_types:
            assert families.get(model_type) is fam
            assert fam.hf_architecture(model_type).endswith("ForCausalLM")
    assert families.get("mistral").hf_architecture("mistral") == "MistralForCausalLM"
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'; supported: .*phi3"):
        families.get("gpt2")


# ---------------------------------------------------------------------------------------------
# A family whose model keeps its decoder one attribute deeper: every path must come from it

class Outer(nn.Module):
    model_type = "outer"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.args = inner.args

    def __call__(self, tokens, cache=None):
        return self.inner(tokens, cache=cache)


@pytest.fixture
def outer(tiny_qwen2, monkeypatch):
    fam = replace(families.get("qwen2"), name="outer", hf_architectures={"outer": "OuterForCausalLM"},
                  decoder_path="inner.model", layers_path="inner.model.layers",
                  embedding_path="inner.model.embed_tokens",
                  logits=lambda model, hidden: families.head_logits(model.inner, hidden))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "outer", fam)
    inner, _ = load_model(Path(tiny_qwen2))
    return Outer(inner)


def test_writers_and_steering_site_come_from_the_family(outer):
    writers = arch.residual_writers(outer, range(2))
    assert [w.path for w in writers] == [
        "inner.model.embed_tokens", "inner.model.layers.0.self_attn.o_proj", "inner.model.layers.0.mlp.down_proj",
        "inner.model.layers.1.self_attn.o_proj", "inner.model.layers.1.mlp.down_proj"]
    assert [w.role for w in writers] == ["embedding", "attention", "mlp", "attention", "mlp"]
    assert arch.steering_site(outer, 3) == "inner.model.layers.2.mlp.down_proj"
    assert arch.num_layers(outer) == 4 and arch.decoder(outer) is outer.inner.model


def test_hooks_and_edits_follow_the_family_paths(outer):
    inner = outer.inner
    v = 6.0 * unit_vector(64, 1)
    with interventions.adding_at(inner, 2, v):
        expected = inner(TOKENS)
    with interventions.adding_at(outer, 2, v):
        assert max_diff(outer(TOKENS), expected) == 0.0
    d = unit_vector(64, 2)
    with interventions.projecting_out(inner, d):
        ablated = inner(TOKENS)
    with interventions.projecting_out(outer, d):
        assert max_diff(outer(TOKENS), ablated) == 0.0
    assert edit.add_steering_bias(outer, 2, v) == "inner.model.layers.1.mlp.down_proj.bias"
    assert max_diff(outer(TOKENS), expected) <= 1e-4


def test_capture_reads_the_family_layers(outer, tiny_qwen2):
    _, tok = mlx_load(str(tiny_qwen2))
    prompts = ["hi there", "what is a cat?"]
    direct = capture.capture_residuals(outer.inner, tok, prompts)
    through = capture.capture_residuals(outer, tok, prompts)
    assert np.array_equal(direct.mean, through.mean) and direct.mean.shape == (5, 64)


def test_evaluation_logits_include_the_family_soft_cap(tiny_qwen2, monkeypatch):
    """A family whose model soft-caps its logits (Gemma's final_logit_softcapping): evaluation must
    read them through the family, not through a bare output projection."""
    cap = 2.0
    model, tok = mlx_load(str(tiny_qwen2))
    prompts = ["hi", "Why is the sky blue?", "Tell me a story about a dog."]
    plain = ev.first_token_logprobs(model, tok, prompts)
    capped = replace(families.get("qwen2"),
                     logits=lambda m, h: cap * mx.tanh(families.head_logits(m, h) / cap))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "qwen2", capped)
    got = ev.first_token_logprobs(model, tok, prompts)
    ids = template.encode_chat(tok, prompts)
    for row, p in enumerate(ids):
        raw = model(mx.array([p]))[0, -1]
        want = batching.log_softmax(cap * mx.tanh(raw / cap))
        assert max_diff(got[row], want) <= 1e-4
    assert max_diff(got, plain) > 0.5  # the cap really changed them


def test_gguf_tensor_names_come_from_the_family():
    llama, phi3_like = families.get("llama"), replace(
        families.get("llama"), gguf_layer_tensors={"attn_qkv": "self_attn.qkv_proj"}, layers_path="model.blocks")
    assert gguf.hf_name("blk.3.attn_q.weight", llama) == "model.layers.3.self_attn.q_proj.weight"
    assert gguf.hf_name("blk.3.attn_qkv.weight", phi3_like) == "model.blocks.3.self_attn.qkv_proj.weight"
    with pytest.raises(UserError, match="unexpected GGUF tensor 'blk.3.attn_q.weight'"):
        gguf.hf_name("blk.3.attn_q.weight", phi3_like)


def test_onnx_refuses_a_bias_the_family_graph_does_not_compute(tiny_qwen2, tmp_path, monkeypatch):
    from mlx_refusal.onnx import export_onnx

    no_bias = replace(families.get("qwen2"), graph=families.GraphNeeds(biases=()))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "qwen2", no_bias)
    with pytest.raises(UserError, match=r"q_proj.bias is a bias the qwen2 graph does not compute"):
        export_onnx(tiny_qwen2, tmp_path / "web", dtypes=("fp32",))
    assert not (tmp_path / "web").exists()


# ---------------------------------------------------------------------------------------------
# phi3: fused projections, through families/phi3.py alone

@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    return mlx_load(str(tiny_phi3))


def test_phi3_hooks_capture_and_ablation(phi3, tiny_phi3):
    model, tok = mlx_load(str(tiny_phi3))
    assert "qkv_proj" in model.model.layers[0].self_attn and "gate_up_proj" in model.model.layers[0].mlp
    cap = capture.capture_residuals(model, tok, ["hi there", "what is a cat?"])
    assert cap.mean.shape == (5, 64) and np.all(np.isfinite(cap.mean))
    d = unit_vector(64, 3)
    with interventions.projecting_out(model, d):
        expected = model(TOKENS)
    edit.ablate(model, d)
    edited = model(TOKENS)
    assert max_diff(edited, expected) <= 1e-4
    with interventions.hooked_layers(model, after={1: lambda x: x}):
        assert max_diff(model(TOKENS), edited) == 0.0


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_phi3_steering_saves_exactly_for_stock_mlx_lm(tiny_phi3, tmp_path, layer):
    from mlx_refusal.save import save_model

    model, _ = load_model(Path(tiny_phi3))
    d = unit_vector(64, 4)
    v = 6.0 * d
    with interventions.adding_at(model, layer, v):
        expected = model(TOKENS)
    edit.add_steering_bias(model, layer, v)
    assert max_diff(model(TOKENS), expected) <= 1e-4
    out = tmp_path / "steered"
    save_model(model, tiny_phi3, out, {"edit": "steer", "layer": layer, "model": {"model_type": "phi3"}},
               steering=(layer, mx.array(d), mx.array(v)))
    config = json.loads((out / "config.json").read_text())
    # layer 0 is an embedding edit phi3 holds itself; a bias needs llama's layout, weights split
    assert config["model_type"] == ("phi3" if layer == 0 else "llama")
    stock, _ = load_model(out, strict=True)
    assert max_diff(stock(TOKENS), expected) <= 1e-4


@pytest.mark.parametrize("kind", ["steer-layer-2", "ablate-per-site"])
def test_phi3_streamed_edit_is_bit_identical_to_in_memory(tiny_phi3, tmp_path, kind):
    from mlx_refusal import stream_edit as se
    from test_stream_edit import assert_bit_identical, edits, in_memory

    spec = edits(4, 64)[kind]
    a = in_memory(tiny_phi3, spec, tmp_path / "memory")
    b = se.stream_edit(tiny_phi3, tmp_path / "streamed", spec, {"edit": "test"})
    assert_bit_identical(a, b)


def test_phi3_steering_with_rope_scaling_is_refused(tiny_phi3, tmp_path):
    config = json.loads((Path(tiny_phi3) / "config.json").read_text())
    config["rope_scaling"] = {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    with pytest.raises(arch.UnsupportedArchitecture, match="phi3 .* no exact stock mlx_lm form"):
        arch.stock_config(config, needs_output_bias=True)


def test_phi3_onnx_export_matches_mlx(phi3, tiny_phi3, tmp_path):
    from mlx_refusal.onnx import OnnxDecoder, export_onnx, left_pad

    model, _ = phi3
    export_onnx(tiny_phi3, tmp_path / "web", dtypes=("fp32",), layer=1, all_logits=True)
    config = json.loads((tmp_path / "web/config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    dec = OnnxDecoder(tmp_path / "web/onnx/model.onnx")
    prompts = [[5, 17, 99, 3, 200], [8, 9, 10]]
    ids, mask = left_pad(prompts)
    out = dec.step(ids, mask)
    for r, p in enumerate(prompts):
        ref = np.array(model(mx.array([p]))[0])
        assert np.abs(out.logits[r, ids.shape[1] - len(p):] - ref).max() <= 1e-3 and ref.std() > 0.5


def test_steered_phi3_exports_with_its_own_family_and_the_scale_slider(phi3, tiny_phi3, tmp_path):
    from mlx_refusal.onnx import OnnxDecoder, export_onnx, left_pad
    from test_onnx_export import make_steered

    base, _ = phi3
    folder, _ = make_steered(Path(tiny_phi3), tmp_path / "steered")
    steered, _ = load_model(folder)
    export_onnx(folder, tmp_path / "web", dtypes=("fp32",), all_logits=True)
    config = json.loads((tmp_path / "web/config.json").read_text())
    assert config["model_type"] == "phi3"  # saved as llama for mlx_lm, the page gets the source family
    dec = OnnxDecoder(tmp_path / "web/onnx/steerable.onnx")
    prompt = [5, 17, 99, 3, 200]
    ids, mask = left_pad([prompt])
    for scale, model in ((0.0, base), (1.0, steered)):
        ref = np.array(model(mx.array([prompt]))[0])
        assert np.abs(dec.step(ids, mask, steering_scale=scale).logits[0] - ref).max() <= 1e-3
    assert max_diff(steered(mx.array([prompt])), base(mx.array([prompt]))) > 0.1


def test_phi3_gguf_round_trip(tiny_phi3, tmp_path):
    from test_gguf import _load, _logits, write_gguf

    out = gguf.convert(write_gguf(tiny_phi3, tmp_path / "phi3.gguf"), tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    np.testing.assert_allclose(_logits(*_load(out)), _logits(*_load(tiny_phi3)), atol=1e-5, rtol=0)
    longrope = write_gguf(tiny_phi3, tmp_path / "long.gguf", extra_tensors={"rope_factors_long.weight": np.ones(8)})
    with pytest.raises(UserError, match="LongRoPE"):
        gguf.convert(longrope, tmp_path / "long")


def test_phi3_through_the_api_steer_save_and_stock_load(tiny_phi3, tmp_path, monkeypatch):
    import mlx_lm

    import mlx_refusal as mr

    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    m = mr.load(str(tiny_phi3))
    d = mr.compute_directions(m, batch_size=64)
    edit_ = mr.steer(mr.load(m.info.spec), d, layer=2, alpha_multiple=0.5, eval_limit=2, max_tokens=4)
    out = edit_.save(tmp_path / "steered", dtype="float32")
    stock, tok = mlx_lm.load(str(out))
    ids = mx.array([tok.encode("How do I bake bread?")])
    assert max_diff(stock(ids)[0, -1], edit_.model.model(ids)[0, -1]) <= 1e-4

"""ONNX export: the hand-written graph against MLX, the KV cache, steering, quantized copies, the bundle."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from mlx_refusal.errors import UserError
from mlx_refusal.onnx import (
    GraphOptions, OnnxDecoder, Steering, SteeringTerm, activations_name, build_decoder, export_onnx, left_pad, read_model,
)
from mlx_refusal.onnx import bundle as bundle_mod

TOL = 1e-3
# token ids of three prompts of different lengths (the tiny vocabulary has 384 entries)
PROMPTS = [[5, 17, 99, 3, 200, 41, 7, 250, 11], [8, 9, 10], [300, 2, 1, 60, 61, 62]]
STEER_LAYER, ALPHA = 2, 6.0


# ---------------------------------------------------------------------------------------------
# MLX references

def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


def mlx_resid_pre(model, ids, layer) -> np.ndarray:
    inner = model.model
    h = inner.embed_tokens(mx.array([ids]))
    for block in inner.layers[:layer]:
        h = block(h, "causal", None)
    return np.array(h[0])


def mlx_greedy(model, prompt, n) -> list[int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures: exports of the tiny models, and a steered folder written by mlx_refusal.save

ARCHES = ["tiny_qwen2", "tiny_qwen2_tied", "tiny_llama", "tiny_qwen3"]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """fixture name -> (mlx model, fp32 OnnxDecoder, bundle dir), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            src = request.getfixturevalue(name)
            out = tmp_path_factory.mktemp("onnx") / name
            export_onnx(src, out, dtypes=("fp32",), layer=1, all_logits=True)
            model, _ = load_model(Path(src))
            cache[name] = (model, OnnxDecoder(out / "onnx/model.onnx"), out)
        return cache[name]

    return get


def make_steered(base: Path, out: Path, layer: int = STEER_LAYER, alpha: float = ALPHA,
                 dtype: str | None = None) -> tuple[Path, np.ndarray]:
    """A steered copy of `base` written by the real save path (edit.add_steering_bias + save.save_model)."""
    from mlx_refusal.edit import add_steering_bias
    from mlx_refusal.save import save_model

    model, _ = load_model(base)
    d = np.random.default_rng(7).standard_normal(model.args.hidden_size).astype(np.float32)
    d /= np.linalg.norm(d)
    add_steering_bias(model, layer, alpha * d)
    record = {"edit": "steer", "layer": layer, "alpha": alpha, "model": {"model_type": model.model_type}}
    save_model(model, base, out, record, steering=(layer, mx.array(d), mx.array(alpha * d)), dtype=dtype)
    return out, d


@pytest.fixture(scope="module")
def steered(tiny_qwen2, tmp_path_factory):
    """(steered folder, direction, bundle with every dtype, unedited mlx model, steered mlx model)"""
    root = tmp_path_factory.mktemp("steered")
    folder, d = make_steered(Path(tiny_qwen2), root / "model")
    bundle = root / "web"
    export_onnx(folder, bundle, all_logits=True)
    base_model, _ = load_model(Path(tiny_qwen2))
    steered_model, _ = load_model(folder)
    return folder, d, bundle, base_model, steered_model


# ---------------------------------------------------------------------------------------------
# Numerics against MLX

@pytest.mark.parametrize("arch", ARCHES)
def test_left_padded_batch_matches_mlx(exported, arch):
    model, dec, _ = exported(arch)
    ids, mask = left_pad(PROMPTS)
    out = dec.step(ids, mask)
    assert out.logits.shape == (3, ids.shape[1], model.args.vocab_size)
    for r, p in enumerate(PROMPTS):
        real = slice(ids.shape[1] - len(p), None)  # the padded positions' logits are meaningless
        ref = mlx_logits(model, p)
        assert np.abs(out.logits[r, real] - ref).max() <= TOL
        assert np.abs(out.activations[r, real] - mlx_resid_pre(model, p, 1)).max() <= TOL
        assert ref.std() > 0.5  # the comparison is not between near-constant logits


@pytest.mark.parametrize("arch", ARCHES)
def test_cached_decode_steps_match_mlx(exported, arch):
    """Prefill a left-padded batch, then feed each step's present back as past."""
    model, dec, _ = exported(arch)
    prompts = [PROMPTS[0][:5], PROMPTS[2]]
    ids, mask = left_pad(prompts)
    out = dec.step(ids, mask)
    extra = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    for t in range(5):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step_ids = np.array([[extra[0][t]], [extra[1][t]]], np.int64)
        out = dec.step(step_ids, mask, out.present)
        assert out.present[0][0].shape[2] == mask.shape[1]
        for r, p in enumerate(prompts):
            ref = mlx_logits(model, p + extra[r][: t + 1])[-1]
            assert np.abs(out.logits[r, -1] - ref).max() <= TOL, (arch, t, r)


@pytest.mark.parametrize("arch", ARCHES)
def test_greedy_32_tokens_identical_to_mlx(exported, arch):
    model, dec, _ = exported(arch)
    for prompt in PROMPTS[:2]:
        assert dec.greedy(prompt, 32) == mlx_greedy(model, prompt, 32)


@pytest.mark.parametrize("arch", ARCHES)
def test_follow_gives_the_logits_each_forced_token_was_read_after(exported, arch):
    """Teacher forcing: the logits before forced token t are mlx's logits after prompt + tokens[:t],
    whatever tokens are forced (here not the greedy ones)."""
    model, dec, _ = exported(arch)
    prompt, forced = PROMPTS[0], [7, 3, 19, 3, 42]
    rows = dec.follow(prompt, forced)
    assert rows.shape[0] == len(forced)
    for t in range(len(forced)):
        ref = mlx_logits(model, prompt + forced[:t])[-1]
        assert np.abs(rows[t] - ref).max() <= TOL, (arch, t)
    greedy = dec.greedy(prompt, 6)
    assert [int(r.argmax()) for r in dec.follow(prompt, greedy)] == greedy


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_padding_never_changes_real_tokens(exported, lengths, seed):
    """Property: a prompt's logits do not depend on what it is batched with (left padding, masks, positions)."""
    _, dec, _ = exported("tiny_qwen2")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 384, n).tolist() for n in lengths]
    ids, mask = left_pad(prompts, pad_id=int(rng.integers(0, 384)))
    batched = dec.step(ids, mask).logits
    for r, p in enumerate(prompts):
        alone = dec.step(np.array([p]), np.ones((1, len(p)), np.int64)).logits[0]
        np.testing.assert_allclose(batched[r, ids.shape[1] - len(p):], alone, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Steering

def test_steering_scale_interpolates_between_original_and_edited(steered):
    folder, d, bundle, base_model, steered_model = steered
    dec = OnnxDecoder(bundle / "onnx/steerable.onnx")
    assert "steering_scale" in dec.input_names  # required: onnxruntime-web cannot feed initializer inputs
    ids, mask = left_pad(PROMPTS)
    at = {s: dec.step(ids, mask, steering_scale=s) for s in (0.0, 1.0)}
    for r, p in enumerate(PROMPTS):
        real = slice(ids.shape[1] - len(p), None)
        assert np.abs(at[0.0].logits[r, real] - mlx_logits(base_model, p)).max() <= TOL
        assert np.abs(at[1.0].logits[r, real] - mlx_logits(steered_model, p)).max() <= TOL
        got = at[1.0].activations[r, real]
        assert np.abs(got - mlx_resid_pre(steered_model, p, STEER_LAYER)).max() <= TOL
        # nothing before resid_pre[L] sees the vector, so the residual moves by exactly ALPHA * d
        np.testing.assert_allclose(got - at[0.0].activations[r, real], np.broadcast_to(ALPHA * d, got.shape), atol=1e-4)
    assert dec.greedy(PROMPTS[0], 16, steering_scale=1.0) == mlx_greedy(steered_model, PROMPTS[0], 16)
    assert dec.greedy(PROMPTS[0], 16, steering_scale=0.0) == mlx_greedy(base_model, PROMPTS[0], 16)


def test_steering_scale_is_required_by_default(steered):
    _, _, bundle, _, _ = steered
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "onnx/steerable.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5, 6]], np.int64), "attention_mask": np.ones((1, 2), np.int64),
             "position_ids": np.array([[0, 1]], np.int64)}
    for i in range(4):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 16), np.float32)
    with pytest.raises(Exception, match="steering_scale"):
        sess.run(["logits"], feeds)


def test_optional_steering_scale_runs_with_and_without_feeding(steered, tmp_path):
    folder, _, _, _, steered_model = steered
    res = export_onnx(folder, tmp_path / "web", dtypes=("fp32",), steering_input="optional", all_logits=True)
    dec = OnnxDecoder(res.out_dir / "onnx/steerable.onnx")
    assert "steering_scale" not in dec.input_names and "steering_scale" in dec.overridable
    ids, mask = np.array([PROMPTS[0]]), np.ones((1, len(PROMPTS[0])), np.int64)
    default = dec.step(ids, mask).logits
    fed = dec.step(ids, mask, steering_scale=1.0).logits
    off = dec.step(ids, mask, steering_scale=0.0).logits
    np.testing.assert_array_equal(default, fed)
    assert np.abs(default[0] - mlx_logits(steered_model, PROMPTS[0])).max() <= TOL
    assert np.abs(off - default).max() > 0.1


def test_tied_embedding_steering_moves_the_shared_output_rows(tiny_qwen2_tied, tmp_path):
    """An embedding-site vector on a *tied* model also shifts the output head; the graph keeps both exact."""
    src = read_model(tiny_qwen2_tied)
    v = np.random.default_rng(3).standard_normal(src.spec.hidden_size).astype(np.float32)
    weights = dict(src.weights)
    weights["model.embed_tokens.weight"] = src.weights["model.embed_tokens.weight"] + v
    steering = Steering(terms=(SteeringTerm(name="refusal", layer=0, site="model.embed_tokens.weight", vector=v,
                                            direction=v / np.linalg.norm(v)),))
    model, _ = load_model(Path(tiny_qwen2_tied))
    original = [mlx_logits(model, p) for p in PROMPTS]
    model.model.embed_tokens.weight = mx.array(weights["model.embed_tokens.weight"])
    edited = [mlx_logits(model, p) for p in PROMPTS]
    for lm_head in ("shared", "separate"):
        graph = build_decoder(src.spec, weights, GraphOptions(activations_layer=0, steering=steering, tied_lm_head=lm_head))
        onnx.checker.check_model(graph)
        path = tmp_path / f"steer0_{lm_head}.onnx"
        onnx.save(graph, str(path))
        dec = OnnxDecoder(path)
        for p, ref0, ref1 in zip(PROMPTS, original, edited):
            ids, mask = np.array([p]), np.ones((1, len(p)), np.int64)
            assert np.abs(dec.step(ids, mask, steering_scale=0.0).logits[0] - ref0).max() <= TOL
            out = dec.step(ids, mask, steering_scale=1.0)
            assert np.abs(out.logits[0] - ref1).max() <= TOL
            emb = np.array(model.model.embed_tokens(mx.array([p]))[0])
            np.testing.assert_allclose(out.activations[0], emb, atol=1e-5)


def test_bfloat16_steered_model_at_scale_zero_is_the_original(tiny_qwen2, tmp_path):
    """Saved in bf16, the steering bias is bf16(0 + vector): the export treats that as the vector, so
    scale 0 is the bf16 original exactly, and scale 1 the edited model up to the bias's rounding."""
    folder, _ = make_steered(Path(tiny_qwen2), tmp_path / "model", dtype="bfloat16")
    res = export_onnx(folder, tmp_path / "web", dtypes="fp32", all_logits=True)
    dec = OnnxDecoder(res.out_dir / "onnx/steerable.onnx")
    base_model, _ = load_model(Path(tiny_qwen2))
    base_model.set_dtype(mx.bfloat16)
    base_model.set_dtype(mx.float32)  # bf16-rounded weights, float32 compute: what the export holds
    steered_model, _ = load_model(folder)
    steered_model.set_dtype(mx.float32)
    ids, mask = np.array([PROMPTS[0]]), np.ones((1, 9), np.int64)
    assert np.abs(dec.step(ids, mask, steering_scale=0.0).logits[0] - mlx_logits(base_model, PROMPTS[0])).max() <= TOL
    diff = np.abs(dec.step(ids, mask, steering_scale=1.0).logits[0] - mlx_logits(steered_model, PROMPTS[0])).max()
    assert diff <= 0.1


def make_o_proj_steered(base: Path, out: Path, layer: int, vector: np.ndarray) -> Path:
    """A steered folder in the older layout: the vector in block L-1's attention o_proj bias (which
    block L-1's MLP also sees), saved as stock `llama` with zero biases elsewhere."""
    import shutil

    from mlx_refusal.arch import stock_config
    from mlx_refusal.save import _expected_parameters

    config = stock_config(json.loads((base / "config.json").read_text()), needs_output_bias=True)
    weights = mx.load(str(base / "model.safetensors"))
    for name, shape in _expected_parameters(config).items():
        weights.setdefault(name, mx.zeros(shape))
    site = f"model.layers.{layer - 1}.self_attn.o_proj.bias"
    weights[site] = mx.array(vector)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / f, out / f)
    norm = float(np.linalg.norm(vector))
    (out / "refusal_edit.json").write_text(json.dumps({"edit": "steer", "layer": layer, "site": site, "alpha": norm}))
    mx.save_safetensors(str(out / "steering.safetensors"),
                        {"direction": mx.array(vector / norm), "vector": mx.array(vector)})
    return out


def test_older_o_proj_steering_site(tiny_qwen2, tmp_path):
    v = 5.0 * np.random.default_rng(11).standard_normal(64).astype(np.float32) / 8
    folder = make_o_proj_steered(Path(tiny_qwen2), tmp_path / "model", layer=3, vector=v)
    res = export_onnx(folder, tmp_path / "web", dtypes="fp32", all_logits=True)
    assert res.activations_layer == 3 and res.steered
    dec = OnnxDecoder(res.out_dir / "onnx/steerable.onnx")
    base_model, _ = load_model(Path(tiny_qwen2))
    steered_model, _ = load_model(folder)
    ids, mask = np.array([PROMPTS[0]]), np.ones((1, 9), np.int64)
    assert np.abs(dec.step(ids, mask, steering_scale=0.0).logits[0] - mlx_logits(base_model, PROMPTS[0])).max() <= TOL
    out = dec.step(ids, mask, steering_scale=1.0)
    assert np.abs(out.logits[0] - mlx_logits(steered_model, PROMPTS[0])).max() <= TOL
    assert np.abs(out.activations[0] - mlx_resid_pre(steered_model, PROMPTS[0], 3)).max() <= TOL


@pytest.fixture(scope="module")
def embedding_steered(tmp_path_factory):
    """A model steered at layer 0 (the vector added to every embedding row): (decoder, vector)."""
    from fixtures import make_tiny_model

    root = tmp_path_factory.mktemp("steered0")
    base = make_tiny_model(root / "base", arch="qwen2", seed=4)
    folder, d = make_steered(base, root / "model", layer=0, alpha=4.0)
    res = export_onnx(folder, root / "web", dtypes=("fp32",))
    assert res.activations_layer == 0 and res.steered
    return OnnxDecoder(res.out_dir / "onnx/steerable.onnx"), 4.0 * d


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.floats(-3.0, 3.0, allow_nan=False))
def test_embedding_site_activations_are_affine_in_scale(embedding_steered, scale):
    """Property: at a layer-0 (embedding) site, resid_pre[0](s) = resid_pre[0](0) + s * vector."""
    dec, vector = embedding_steered
    ids, mask = np.array([PROMPTS[1]]), np.ones((1, 3), np.int64)
    a0 = dec.step(ids, mask, steering_scale=0.0).activations[0]
    a = dec.step(ids, mask, steering_scale=scale).activations[0]
    np.testing.assert_allclose(a - a0, np.broadcast_to(scale * vector, a.shape), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Quantized copies

def test_q4_and_q8_run_and_agree_with_fp32(steered, record_property):
    _, _, bundle, _, _ = steered
    ref = OnnxDecoder(bundle / "onnx/model.onnx")
    ids, mask = left_pad(PROMPTS)
    fp32 = ref.step(ids, mask).logits
    report = {}
    for name in ("model_q4", "model_quantized"):
        dec = OnnxDecoder(bundle / f"onnx/{name}.onnx")
        out = dec.step(ids, mask)
        assert out.logits.shape == fp32.shape and np.isfinite(out.logits).all()
        corr = np.corrcoef(out.logits[:, -1].ravel(), fp32[:, -1].ravel())[0, 1]
        assert corr > 0.95, (name, corr)  # a broken quantization decorrelates entirely
        agree = []
        for p in PROMPTS:
            a, b = ref.greedy(p, 32), dec.greedy(p, 32)
            agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 32))
        report[name] = {"logit_corr": round(float(corr), 4), "greedy_tokens_identical_before_divergence": agree}
    record_property("quantized_vs_fp32", json.dumps(report))
    print("\nquantized vs fp32 (tiny random model):", report)


def test_quantized_graphs_use_kernels_the_wasm_build_has(steered):
    _, _, bundle, _, _ = steered
    ops = {n: Counter(node.op_type for node in onnx.load(str(bundle / f"onnx/{n}.onnx")).graph.node)
           for n in ("model", "model_q4", "model_quantized")}
    layers = 4
    assert ops["model_q4"]["MatMulNBits"] == 4 * layers + 1  # qkv, o, gate|up, down per layer + lm_head
    assert ops["model_quantized"]["MatMulInteger"] == 4 * layers + 1
    for counts in ops.values():
        assert counts["Gather"] == 1 and "GatherBlockQuantized" not in counts  # float embedding gather
        assert not {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} & set(counts)
    q4 = onnx.load(str(bundle / "onnx/model_q4.onnx"))
    nbits = [n for n in q4.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a for a in nbits[0].attribute}
    assert attrs["block_size"].i == 32 and attrs["bits"].i == 4
    assert "accuracy_level" not in attrs  # level 0 (unset)
    assert any(n.name.startswith("lm_head") for n in nbits)


# ---------------------------------------------------------------------------------------------
# The bundle

def test_bundle_layout_for_a_steered_model(steered):
    folder, d, bundle, _, _ = steered
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "onnx/model.onnx", "onnx/model_q4.onnx", "onnx/model_quantized.onnx", "onnx/model_int8.onnx",
              "onnx/steerable.onnx", "onnx/steerable_q4.onnx", "onnx/steerable_quantized.onnx",
              "onnx/steerable_int8.onnx",
              "refusal_edit.json", "steering.json", "export.json"):
        assert (bundle / f).is_file(), f
    config = json.loads((bundle / "config.json").read_text())
    assert config["model_type"] == "qwen2"  # the source family, though mlx_lm saw `llama` + attention_bias
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16 and config["num_hidden_layers"] == 4
    assert "<|im_start|>" in json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"]
    assert (bundle / "refusal_edit.json").read_bytes() == (folder / "refusal_edit.json").read_bytes()
    steering = json.loads((bundle / "steering.json").read_text())
    assert steering["layer"] == STEER_LAYER and steering["activations_output"] == activations_name(STEER_LAYER)
    np.testing.assert_allclose(steering["direction"], d, atol=1e-7)
    assert steering["hidden_size"] == len(steering["direction"]) == 64
    record = json.loads((bundle / "export.json").read_text())
    assert record["layer"] == STEER_LAYER and record["hidden_size"] == 64
    assert record["steering"]["required"] is True
    for rel, size in record["files"].items():
        assert (bundle / rel).stat().st_size == size, rel
    assert not list(bundle.parent.glob(".web.*"))  # no temporary folder left behind


def test_graph_interface(steered):
    _, _, bundle, _, _ = steered
    model = onnx.load(str(bundle / "onnx/steerable.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 18
    ins = {i.name: i.type.tensor_type for i in model.graph.input}
    outs = {o.name: o.type.tensor_type for o in model.graph.output}

    def dims(t):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]

    assert ins["input_ids"].elem_type == onnx.TensorProto.INT64 and len(dims(ins["input_ids"])) == 2
    assert ins["attention_mask"].elem_type == ins["position_ids"].elem_type == onnx.TensorProto.INT64
    past = dims(ins["past_key_values.3.value"])
    assert past[1:2] == [2] and past[3] == 16 and isinstance(past[0], str) and isinstance(past[2], str)
    assert dims(ins["steering_scale"]) == []
    assert dims(outs["logits"])[2] == 384 and "present.3.key" in outs
    assert dims(outs[activations_name(STEER_LAYER)])[2] == 64


def test_external_data_and_a_tied_model_quantized_alone(tiny_qwen2_tied, tmp_path):
    """The >2 GB path (tensors streamed to `<file>_data`) at tiny scale, and q4 of a tied model
    without fp32 in the bundle (its quantization source is built with a separate lm_head)."""
    from mlx_refusal.onnx.graph import write_decoder

    src = read_model(tiny_qwen2_tied)
    files = write_decoder(src.spec, src.weights, GraphOptions(activations_layer=1), tmp_path / "ext.onnx",
                          external=True)
    assert [f.name for f in files] == ["ext.onnx", "ext.onnx_data"]
    model = onnx.load(str(files[0]), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(e.value == "ext.onnx_data" for t in big for e in t.external_data if e.key == "location")
    mlx_model, _ = load_model(Path(tiny_qwen2_tied))
    out = OnnxDecoder(files[0]).step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64))
    assert np.abs(out.logits[0] - mlx_logits(mlx_model, PROMPTS[0])).max() <= TOL

    res = export_onnx(tiny_qwen2_tied, tmp_path / "web", dtypes="q4")
    assert sorted(f for f in res.files if f.startswith("onnx/")) == ["onnx/model_q4.onnx"]
    q4 = OnnxDecoder(res.out_dir / "onnx/model_q4.onnx").step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64))
    assert q4.logits.shape == (1, 1, 384)  # the last position only, by default
    assert np.corrcoef(q4.logits[0, -1], mlx_logits(mlx_model, PROMPTS[0])[-1])[0, 1] > 0.95


def test_standard_files_have_steering_fixed_and_share_weights_with_the_slider_graphs(steered):
    """Stock clients (transformers.js's pipeline) feed only the standard inputs: every onnx/model*.onnx
    runs without steering_scale and equals its steerable twin at scale 1; each pair shares one data file."""
    _, _, bundle, _, steered_model = steered
    record = json.loads((bundle / "export.json").read_text())
    ids, mask = left_pad(PROMPTS)
    for dtype, standard in record["dtypes"].items():
        twin = record["steering"]["files"][dtype]
        fixed, slider = OnnxDecoder(bundle / standard), OnnxDecoder(bundle / twin)
        assert not fixed.has_steering and "steering_scale" in slider.input_names
        np.testing.assert_array_equal(fixed.step(ids, mask).logits, slider.step(ids, mask, steering_scale=1.0).logits)
        locations = {Path(standard).name + "_data"}
        for f in (standard, twin):
            m = onnx.load(str(bundle / f), load_external_data=False)
            assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == locations
    assert not [f for f in record["files"] if f.startswith("onnx/steerable") and f.endswith("_data")]
    config = json.loads((bundle / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {
        Path(f).name: 1 for f in record["dtypes"].values()}


def test_int8_graph_computes_in_int8_and_agrees_with_mlx(steered, tiny_qwen2_tied, tmp_path):
    """int8: every matmul is MatMulInteger on int8 weights (one scale per column), the embedding is
    int8 too, and a tied model keeps ONE int8 matrix for the lookup and the head."""
    _, _, bundle, _, steered_model = steered
    ops = Counter(n.op_type for n in onnx.load(str(bundle / "onnx/model_int8.onnx")).graph.node)
    assert ops["MatMulInteger"] == 4 * 4 + 1 and ops["DynamicQuantizeLinear"] == 4 * 4 + 1
    assert "MatMulNBits" not in ops and "GatherBlockQuantized" not in ops
    dec = OnnxDecoder(bundle / "onnx/model_int8.onnx")
    for p in PROMPTS:
        got = dec.step(np.array([p]), np.ones((1, len(p)), np.int64)).logits[0]
        ref = mlx_logits(steered_model, p)
        assert got.shape == ref.shape and np.corrcoef(got[-1], ref[-1])[0, 1] > 0.99
    res = export_onnx(tiny_qwen2_tied, tmp_path / "web", dtypes="int8")
    model = onnx.load(str(res.out_dir / "onnx/model_int8.onnx"))
    vocab_sized = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and 384 in t.dims]
    assert vocab_sized == ["lm_head.weight_T.int8"]
    out = OnnxDecoder(res.out_dir / "onnx/model_int8.onnx").step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64))
    mlx_model, _ = load_model(Path(tiny_qwen2_tied))
    assert out.logits.shape == (1, 1, 384)
    assert np.corrcoef(out.logits[0, -1], mlx_logits(mlx_model, PROMPTS[0])[-1])[0, 1] > 0.99


def test_last_position_logits_are_the_last_row_of_all_logits(tiny_qwen2, tmp_path):
    src = read_model(tiny_qwen2)
    ids, mask = left_pad(PROMPTS)
    rows = {}
    for kind in ("all", "last"):
        path = tmp_path / f"{kind}.onnx"
        onnx.save(build_decoder(src.spec, src.weights, GraphOptions(activations_layer=1, logits=kind)), str(path))
        rows[kind] = OnnxDecoder(path).step(ids, mask).logits
    assert rows["last"].shape == (3, 1, 384)
    np.testing.assert_allclose(rows["last"][:, 0], rows["all"][:, -1], atol=1e-5)


def make_two_term_steered(base: Path, out: Path) -> tuple[Path, list[tuple[int, np.ndarray]]]:
    """A folder in the multi-term format (notes: steering_format.md): a refusal term at layer 3 and a
    voice term at layer 1, both added by the runtime edit (edit.add_steering_bias) before saving."""
    from safetensors.numpy import save_file

    from mlx_refusal.edit import add_steering_bias

    folder, d0 = make_steered(base, out, layer=3, alpha=ALPHA)
    model, _ = load_model(folder)
    d1 = np.random.default_rng(9).standard_normal(model.args.hidden_size).astype(np.float32)
    d1 /= np.linalg.norm(d1)
    add_steering_bias(model, 1, 3.0 * d1)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    for f in folder.glob("model-*.safetensors"):
        f.unlink()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    record = json.loads((folder / "refusal_edit.json").read_text())
    terms = [(3, d0, ALPHA, "refusal"), (1, d1, 3.0, "voice")]
    record["steering"] = [{"name": name, "layer": layer, "site": f"model.layers.{layer - 1}.mlp.down_proj.bias",
                           "alpha": alpha, "multiple": None, "direction_sha256": ""} for layer, _, alpha, name in terms]
    (folder / "refusal_edit.json").write_text(json.dumps(record))
    tensors = {"direction": d0, "vector": ALPHA * d0}
    for i, (_, d, alpha, _) in enumerate(terms):
        tensors[f"term{i}.vector"], tensors[f"term{i}.direction"] = (alpha * d).astype(np.float32), d
    save_file(tensors, str(folder / "steering.safetensors"))
    return folder, [(layer, alpha * d) for layer, d, alpha, _ in terms]


def test_every_steering_term_follows_the_one_scale(tiny_qwen2, tmp_path):
    """Two terms at different layers: scale 1 is the saved edit, 0 the original, and 0.5 the runtime
    edit with both vectors halved, each checked against MLX."""
    from mlx_refusal.edit import add_steering_bias

    folder, terms = make_two_term_steered(Path(tiny_qwen2), tmp_path / "model")
    res = export_onnx(folder, tmp_path / "web", dtypes="fp32,int8", all_logits=True)
    assert res.activations_layer == 3
    record = json.loads((res.out_dir / "export.json").read_text())
    assert [t["name"] for t in record["steering"]["terms"]] == ["refusal", "voice"]
    dec = OnnxDecoder(res.out_dir / "onnx/steerable.onnx")
    for scale in (0.0, 0.5, 1.0):
        model, _ = load_model(Path(tiny_qwen2))
        for layer, vector in terms:
            if scale:
                add_steering_bias(model, layer, scale * vector)
        for p in PROMPTS:
            out = dec.step(np.array([p]), np.ones((1, len(p)), np.int64), steering_scale=scale)
            assert np.abs(out.logits[0] - mlx_logits(model, p)).max() <= TOL, scale
            assert np.abs(out.activations[0] - mlx_resid_pre(model, p, 3)).max() <= TOL, scale
    int8 = OnnxDecoder(res.out_dir / "onnx/steerable_int8.onnx")
    ids, mask = np.array([PROMPTS[0]]), np.ones((1, 9), np.int64)
    moved = int8.step(ids, mask, steering_scale=1.0).activations - int8.step(ids, mask, steering_scale=0.0).activations
    assert np.abs(moved[0, -1]).max() > 1.0  # int8 graph applies the terms too


def test_unedited_model_exports_the_middle_layer_and_no_steering(exported, tiny_llama, tmp_path):
    res = export_onnx(tiny_llama, tmp_path / "web", dtypes="fp32")
    assert res.activations_layer == 2 and not res.steered
    dec = OnnxDecoder(res.out_dir / "onnx/model.onnx")
    assert not dec.has_steering and dec.activations_output == "activations.layer2"
    assert not (res.out_dir / "steering.json").exists() and not (res.out_dir / "refusal_edit.json").exists()
    assert json.loads((res.out_dir / "config.json").read_text())["model_type"] == "llama"
    model, _, _ = exported("tiny_llama")
    out = dec.step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64))
    assert np.abs(out.activations[0] - mlx_resid_pre(model, PROMPTS[0], 2)).max() <= TOL


def test_final_residual_layer(tiny_qwen2, tmp_path):
    res = export_onnx(tiny_qwen2, tmp_path / "web", dtypes="fp32", layer=4)
    dec = OnnxDecoder(res.out_dir / "onnx/model.onnx")
    model, _ = load_model(Path(tiny_qwen2))
    out = dec.step(np.array([PROMPTS[2]]), np.ones((1, 6), np.int64))
    assert np.abs(out.activations[0] - mlx_resid_pre(model, PROMPTS[2], 4)).max() <= TOL


def test_refuses_existing_output_and_bad_input(tiny_qwen2, tmp_path):
    out = tmp_path / "web"
    export_onnx(tiny_qwen2, out, dtypes="fp32")
    with pytest.raises(UserError, match="already exists"):
        export_onnx(tiny_qwen2, out, dtypes="fp32")
    res = export_onnx(tiny_qwen2, out, dtypes="fp32,q8", force=True)
    assert (out / "onnx/model_quantized.onnx").is_file() and "onnx/model_q4.onnx" not in res.files
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an ONNX export"):
        export_onnx(tiny_qwen2, other, dtypes="fp32", force=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown dtype"):
        export_onnx(tiny_qwen2, tmp_path / "x", dtypes="fp16")
    with pytest.raises(UserError, match="out of range"):
        export_onnx(tiny_qwen2, tmp_path / "x", dtypes="fp32", layer=9)
    with pytest.raises(UserError, match="not an mlx_lm model folder"):
        export_onnx(tmp_path / "nothing", tmp_path / "x")
    import shutil

    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_qwen2, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        export_onnx(no_tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failure_leaves_nothing_behind(tiny_qwen2, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("quantizer failed")

    monkeypatch.setattr(bundle_mod, "quantize_q4", boom)
    with pytest.raises(RuntimeError, match="quantizer failed"):
        export_onnx(tiny_qwen2, tmp_path / "web")
    assert list(tmp_path.iterdir()) == []


def test_page_and_runtime_are_copied_without_node_modules(tiny_qwen2, tmp_path):
    from mlx_refusal.serve import PAGE_DIR

    res = export_onnx(tiny_qwen2, tmp_path / "web", dtypes="fp32", page_dir=PAGE_DIR)
    assert (res.out_dir / "index.html").is_file() and (res.out_dir / "app.js").is_file()
    assert any((res.out_dir / "vendor").rglob("*.wasm"))  # the runtime travels with the bundle
    assert not (res.out_dir / "node_modules").exists()
    assert "index.html" in json.loads((res.out_dir / "export.json").read_text())["files"]


def test_cli_export_onnx(tiny_qwen2, tmp_path):
    import sys

    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cli

    out = tmp_path / "web"
    result = CliRunner().invoke(cli.main, ["export-onnx", "--model", str(tiny_qwen2), "--out", str(out),
                                           "--dtype", "fp32,q4", "--layer", "1"])
    assert result.exit_code == 0, result.output
    assert "model_q4.onnx" in result.output and "activations.layer1" in result.output
    assert (out / "onnx/model_q4.onnx").is_file() and not (out / "onnx/model_quantized.onnx").exists()
    again = CliRunner().invoke(cli.main, ["export-onnx", "--model", str(tiny_qwen2), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


# ---------------------------------------------------------------------------------------------
# Real model (the default preset)

@pytest.mark.real
def test_real_model_fp32_logits_match_mlx(tmp_path_factory):
    loading = pytest.importorskip("mlx_refusal.loading")
    folder = loading.resolve("qwen2.5-coder-0.5b")
    out = tmp_path_factory.mktemp("real") / "web"
    export_onnx(folder, out, dtypes=("fp32",), all_logits=True)
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    model.set_dtype(mx.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True)
    dec = OnnxDecoder(out / "onnx/model.onnx")
    got = dec.step(np.array([ids]), np.ones((1, len(ids)), np.int64)).logits[0]
    assert np.abs(got - mlx_logits(model, ids)).max() <= TOL

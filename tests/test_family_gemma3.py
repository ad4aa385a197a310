"""Gemma 3 (mlx_lm `gemma3_text`) through families/gemma3.py: a scaled embedding, (1 + w) norms,
a norm on every residual write, tied embeddings, sliding-window layers. The tiny fixture has
hidden 48 (sqrt(48) is no bfloat16, so the embedding scale's rounding shows), 4 layers of which 0
and 2 slide over a 4-token window, and norms whose gains spread over 1 +- 0.5."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlx_lm import load as mlx_load
from mlx_lm.utils import load_model

from mlx_refusal import arch, capture, edit, families, interventions
from mlx_refusal.errors import UserError
from mlx_refusal.save import save_model

TOKENS = mx.array([[5, 17, 99, 3, 200, 41, 7, 250, 11]])
HIDDEN = 48


def unit_vector(seed: int) -> np.ndarray:
    d = np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)
    return d / np.linalg.norm(d)


def max_diff(a, b) -> float:
    return float(mx.abs(mx.array(a) - mx.array(b)).max().item())


def residuals_and_writes(model, tokens=TOKENS):
    """(resid_pre of every layer + the final residual, {writer path: what it added to the stream})
    of one forward pass, read by hooks on the blocks and on each writer's `written_by` module."""
    sites, writes = {}, {}

    def keep(path):
        def record(x):
            writes[path] = x
            return x
        return record

    hooks = {w.written_by: (None, keep(w.path)) for w in arch.residual_writers(model, include_embedding=False)}
    with capture.record_residuals(model, lambda site, x: sites.__setitem__(site, x)), \
            interventions.hooked_modules(model, hooks):
        model(tokens)
    return [sites[i] for i in range(len(sites))], writes


@pytest.fixture
def gemma(tiny_gemma3):
    model, _ = load_model(Path(tiny_gemma3))
    return model


def test_gemma3_is_a_registered_family(gemma):
    fam = families.get("gemma3_text")
    assert fam.name == "gemma3" and fam.hf_architecture() == "Gemma3ForCausalLM"
    assert arch.has_tied_embeddings(gemma) and gemma.tie_word_embeddings
    assert [layer.self_attn.is_sliding for layer in gemma.model.layers] == [True, False, True, False]
    # the family's logits are the model's own: the tied head, no soft-cap
    assert max_diff(arch.logits(gemma, gemma.model(TOKENS)), gemma(TOKENS)) == 0.0
    assert arch.embedding_scale(gemma) == 6.9375 != HIDDEN ** 0.5  # sqrt(48) through bfloat16
    with pytest.raises(UserError, match="unsupported architecture 'gemma3'"):
        families.get("gemma3")  # the multimodal wrapper: convert text-only


def test_gemma3_capture_sees_the_residual_stream(gemma, tiny_gemma3):
    """Site 0 is the scaled embedding; each block adds exactly its two post-norm outputs; the
    final site through the final norm and the head gives the model's logits."""
    sites, writes = residuals_and_writes(gemma)
    emb = gemma.model.embed_tokens(TOKENS) * arch.embedding_scale(gemma)
    assert max_diff(sites[0], emb) == 0.0
    for i in range(4):
        attn, mlp = arch.family("gemma3_text").writer_paths(i)
        assert max_diff(sites[i + 1], sites[i] + writes[attn] + writes[mlp]) <= 1e-4
    assert max_diff(arch.logits(gemma, gemma.model.norm(sites[4])), gemma(TOKENS)) == 0.0
    _, tok = mlx_load(str(tiny_gemma3))
    cap = capture.capture_residuals(gemma, tok, ["hi there", "what is a cat?"])
    assert cap.mean.shape == (5, HIDDEN) and np.all(np.isfinite(cap.mean))


def test_gemma3_batched_engine_matches_a_plain_forward(gemma, tiny_gemma3):
    """Capture and first-token log-probs run on a shared prefix cache and right-padded batches
    of plain (non-rotating) caches: with prompts far longer than the 4-token window, the windowed
    masks must give what one prompt alone gives."""
    from mlx_refusal import batching, template
    from mlx_refusal import evaluation as ev

    _, tok = mlx_load(str(tiny_gemma3))
    prompts = ["hi there", "what is a cat? tell me about cats and dogs please", "why"]
    cap = capture.capture_residuals(gemma, tok, prompts, keep_all=True, batch_size=3)
    first = ev.first_token_logprobs(gemma, tok, prompts)
    for row, ids in enumerate(template.encode_chat(tok, prompts)):
        assert len(ids) > 10 * 4
        sites = {}
        with capture.record_residuals(gemma, lambda site, x: sites.__setitem__(site, x[0, -1])):
            logits = gemma(mx.array([ids]))[0, -1]
        assert np.abs(np.stack([np.array(sites[i]) for i in range(5)]) - cap.acts[row]).max() <= 1e-4
        assert max_diff(first[row], batching.log_softmax(logits)) <= 1e-4


def test_gemma3_hooks_add_at_resid_pre(gemma):
    """What block 2 reads (its input norm's input) is resid_pre[2] + v; blocks before are untouched."""
    v = 5.0 * unit_vector(1)
    base, _ = residuals_and_writes(gemma)
    seen = {}
    keep = {f"model.layers.{i}.input_layernorm": ((lambda i: lambda x: seen.setdefault(i, x))(i), None)
            for i in range(4)}
    with interventions.adding_at(gemma, 2, v), interventions.hooked_modules(gemma, keep):
        gemma(TOKENS)
    assert max_diff(seen[2], base[2] + mx.array(v)) <= 1e-5
    assert max_diff(seen[1], base[1]) == 0.0 and max_diff(seen[3], base[3] + mx.array(v)) > 0.1


def _component(x, d) -> float:
    """The largest |x . d| relative to |x| over the tokens."""
    xf = np.array(x, np.float64).reshape(-1, HIDDEN)
    return float(np.max(np.abs(xf @ d) / np.linalg.norm(xf, axis=-1)))


def test_gemma3_ablation_zeroes_the_direction_in_every_write(gemma):
    d = unit_vector(2)
    before, before_writes = residuals_and_writes(gemma)
    assert min(_component(x, d) for x in before_writes.values()) > 1e-2
    with interventions.projecting_out(gemma, d):  # the runtime twin projects the post-norms' output
        runtime, runtime_writes = residuals_and_writes(gemma)
    summary = edit.ablate(gemma, d)
    assert summary.untied_embeddings and len(summary.edited) == 9
    sites, writes = residuals_and_writes(gemma)
    # (runtime[0] is recorded before the projection of the embedding output, which wraps block 0 inside it)
    for x in [*writes.values(), *sites, *runtime_writes.values(), *runtime[1:]]:
        assert _component(x, d) <= 1e-5
    # a real edit, not a zeroed model: the written vectors keep their size
    assert min(float(mx.linalg.norm(w).item()) for w in writes.values()) > 1.0


def test_gemma3_ablation_without_the_gain_leaves_the_direction(tiny_gemma3, monkeypatch):
    """The control: projecting d itself (not (1 + w) * d) out of o_proj / down_proj, as for a
    family without post-norms, leaves a component along d in what the post-norms write."""
    model, _ = load_model(Path(tiny_gemma3))
    plain = replace(families.get("gemma3_text"), writer_norms=None)
    monkeypatch.setitem(families._BY_MODEL_TYPE, "gemma3_text", plain)
    d = unit_vector(2)
    edit.ablate(model, d)
    monkeypatch.undo()
    _, writes = residuals_and_writes(model)
    assert max(_component(x, d) for x in writes.values()) > 1e-2


def _floats(bound):
    return st.floats(-bound, bound, width=32)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (12, 20), elements=_floats(2)), hnp.arrays(np.float32, (2, 20), elements=_floats(2)),
       hnp.arrays(np.float32, (12,), elements=_floats(1.5)), hnp.arrays(np.float32, (12,), elements=_floats(1)))
def test_projecting_the_gained_direction_out_of_a_writer_zeroes_what_its_norm_writes(W, x, w, d):
    """For any writer W, norm weight w and direction d: after W <- W - u u^T W with
    u = unit((1 + w) * d), the norm's output (1 + w) * Wx / rms(Wx) has no component along d."""
    gain = families.get("gemma3_text").norm_gain(_Norm(w))
    gd = gain * mx.array(d)
    if np.linalg.norm(d) < 1e-3 or float(mx.linalg.norm(gd).item()) < 1e-3:
        return  # no direction to remove
    before = np.array(mx.array(x) @ mx.array(W).T, np.float64)
    out = mx.array(x) @ edit.orthogonalize(mx.array(W), gd).T
    written = np.array(mx.fast.rms_norm(out, gain, 1e-6), np.float64)  # what gemma3_text's RMSNorm computes
    along = np.abs(written @ (d / np.linalg.norm(d)))
    # float32 roundoff in the projected output is of the size of the output before it; the norm
    # divides it by the projected output's rms, which is tiny when nearly all of Wx lay along u
    rms = np.sqrt((np.array(out, np.float64) ** 2).mean(axis=-1) + 1e-6)
    noise = 1e-5 * float(np.abs(np.array(gain)).max()) * np.linalg.norm(before, axis=-1) / rms
    assert np.all(along <= 1e-4 * (1.0 + np.linalg.norm(written, axis=-1)) + noise)


class _Norm:
    def __init__(self, w):
        self.weight = mx.array(w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_layer0_steer_saves_for_stock_mlx_lm(tiny_gemma3, tmp_path, dtype):
    import mlx_lm

    model, _ = load_model(Path(tiny_gemma3))
    d = unit_vector(4)
    v = 6.0 * d
    base, _ = residuals_and_writes(model)
    with interventions.adding_at(model, 0, v):
        expected = model(TOKENS)
    assert edit.add_steering_bias(model, 0, v) == "model.embed_tokens"
    assert not model.tie_word_embeddings  # the untied head reads the source embedding
    edited = model(TOKENS)
    assert max_diff(edited, expected) <= 1e-4
    sites, _ = residuals_and_writes(model)
    assert max_diff(sites[0], base[0] + mx.array(v)) <= 1e-5  # exactly +v at resid_pre[0]
    out = save_model(model, tiny_gemma3, tmp_path / "steered", {"edit": "steer", "layer": 0},
                     steering=(0, mx.array(d), mx.array(v)), dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"] is False
    stock, _ = mlx_lm.load(str(out))
    assert not stock.tie_word_embeddings and "lm_head" in stock
    if dtype == "float32":
        assert max_diff(stock(TOKENS), edited) <= 1e-5
    else:  # bfloat16 weights, computed by stock mlx_lm in bfloat16
        assert max_diff(stock(TOKENS).astype(mx.float32), edited) <= 0.05 * float(mx.abs(edited).max().item())


def test_gemma3_ablation_saves_tied_for_stock_mlx_lm(tiny_gemma3, tmp_path):
    """An edit that leaves the embedding as is keeps it tied: the saved folder has no lm_head,
    which stock gemma3_text accepts (it drops its head on load)."""
    model, _ = load_model(Path(tiny_gemma3))
    edit.ablate(model, unit_vector(5), include_embedding=False)
    out = save_model(model, tiny_gemma3, tmp_path / "ablated", {"edit": "ablate"}, dtype="float32")
    assert "lm_head.weight" not in mx.load(str(out / "model.safetensors"))
    stock, _ = load_model(out, strict=True)
    assert max_diff(stock(TOKENS), model(TOKENS)) <= 1e-5


@pytest.mark.parametrize("layer", [1, 3, 4])
def test_gemma3_steering_beyond_layer_0_is_a_one_line_error(gemma, layer):
    with pytest.raises(edit.UnsupportedEdit, match=r"beyond layer 0 on gemma3 .*steer at layer 0") as err:
        edit.add_steering_bias(gemma, layer, 3.0 * unit_vector(6))
    assert "\n" not in str(err.value)
    assert "bias" not in gemma.model.layers[layer - 1].mlp.down_proj  # nothing was changed


@pytest.mark.parametrize("kind", ["steer-layer-0", "ablate-per-site", "project-x2-some-layers"])
def test_gemma3_streamed_edit_is_bit_identical_to_in_memory(tiny_gemma3, tmp_path, kind):
    from mlx_refusal import stream_edit as se
    from test_stream_edit import assert_bit_identical, edits, in_memory

    spec = edits(4, HIDDEN)[kind]
    a = in_memory(tiny_gemma3, spec, tmp_path / "memory")
    b = se.stream_edit(tiny_gemma3, tmp_path / "streamed", spec, {"edit": "test"})
    assert_bit_identical(a, b)


def test_gemma3_streamed_steer_beyond_layer_0_is_refused(tiny_gemma3, tmp_path):
    from mlx_refusal import stream_edit as se

    with pytest.raises(edit.UnsupportedEdit, match="beyond layer 0 on gemma3"):
        se.stream_edit(tiny_gemma3, tmp_path / "streamed", se.Steering(2, unit_vector(7), 3.0), {"edit": "test"})
    assert not (tmp_path / "streamed").exists()


def test_gemma3_onnx_export_matches_mlx_across_the_window(gemma, tiny_gemma3, tmp_path):
    """The graph's Gemma block: scaled embedding, (1 + w) norms, post-norms, GeGLU, q/k norms, and
    local layers whose window (4) is shorter than the prompts, with their own rope base. Checked on
    a left-padded batch in one pass, and token by token through the KV cache past the window."""
    from mlx_refusal.onnx import OnnxDecoder, export_onnx, left_pad

    export_onnx(tiny_gemma3, tmp_path / "web", dtypes=("fp32", "int8"), layer=2, all_logits=True)
    config = json.loads((tmp_path / "web/config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    dec = OnnxDecoder(tmp_path / "web/onnx/model.onnx")
    prompts = [[5, 17, 99, 3, 200, 41, 7, 250, 11], [8, 9, 10, 12, 13, 14]]
    ids, mask = left_pad(prompts)
    out = dec.step(ids, mask)
    for r, p in enumerate(prompts):
        ref = np.array(gemma(mx.array([p]))[0])
        assert np.abs(out.logits[r, ids.shape[1] - len(p):] - ref).max() <= 1e-3 and ref.std() > 0.5
    # decoding: one token at a time, each step seeing the cache, the local layers only their window
    step = dec.step(np.array([prompts[0][:2]], np.int64), np.ones((1, 2), np.int64))
    for n in range(3, len(prompts[0]) + 1):
        step = dec.step(np.array([[prompts[0][n - 1]]], np.int64), np.ones((1, n), np.int64), step.present)
    assert np.abs(step.logits[0, -1] - np.array(gemma(mx.array([prompts[0]]))[0, -1])).max() <= 1e-3
    int8 = OnnxDecoder(tmp_path / "web/onnx/model_int8.onnx").step(ids, mask)
    assert np.corrcoef(int8.logits[0, -1], out.logits[0, -1])[0, 1] > 0.99


def test_gemma3_with_a_window_that_sees_everything_is_a_different_model(gemma, tiny_gemma3, tmp_path):
    """The window matters on these prompts: with every layer global the logits move, so the test
    above checks the windowed mask, not a mask that happens to agree."""
    config = json.loads((Path(tiny_gemma3) / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in Path(tiny_gemma3).iterdir():
        (wide / f.name).write_bytes(f.read_bytes())
    (wide / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    model, _ = load_model(wide)
    assert max_diff(model(TOKENS), gemma(TOKENS)) > 1e-2


def test_steered_gemma3_exports_with_the_scale_slider(gemma, tiny_gemma3, tmp_path):
    """A layer-0 (embedding) steering edit: the slider's 0 is the source model, 1 the edited one,
    through the embedding scale and the untied head."""
    from mlx_refusal.onnx import OnnxDecoder, export_onnx, left_pad
    from test_onnx_export import make_steered

    folder, _ = make_steered(Path(tiny_gemma3), tmp_path / "steered", layer=0, alpha=4.0)
    steered, _ = load_model(folder)
    export_onnx(folder, tmp_path / "web", dtypes=("fp32",), all_logits=True)
    dec = OnnxDecoder(tmp_path / "web/onnx/steerable.onnx")
    prompt = [5, 17, 99, 3, 200, 41, 7]
    ids, mask = left_pad([prompt])
    for scale, model in ((0.0, gemma), (1.0, steered)):
        ref = np.array(model(mx.array([prompt]))[0])
        assert np.abs(dec.step(ids, mask, steering_scale=scale).logits[0] - ref).max() <= 1e-3
    assert max_diff(steered(mx.array([prompt])), gemma(mx.array([prompt]))) > 0.1


def test_gemma3_gguf_round_trip(tiny_gemma3, tmp_path):
    """A GGUF written the way llama.cpp writes gemma3 (its tensor names, norms stored as 1 + w)
    imports to the same model."""
    from mlx_refusal import gguf
    from test_gguf import _load, _logits, write_gguf

    meta = {"gemma3.attention.sliding_window": 4, "gemma3.attention.sliding_window_pattern": 2}
    out = gguf.convert(write_gguf(tiny_gemma3, tmp_path / "g.gguf", arch="gemma3", meta=meta), tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    source = json.loads((Path(tiny_gemma3) / "config.json").read_text())
    for key in ("head_dim", "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern",
                "rope_local_base_freq", "rope_theta", "num_key_value_heads"):
        assert config[key] == source[key], key
    np.testing.assert_allclose(_logits(*_load(out)), _logits(*_load(tiny_gemma3)), atol=1e-5, rtol=0)


def _meta(layers: int, hidden: int, heads: int, head_dim: int, **extra) -> dict:
    return {"general.architecture": "gemma3", "gemma3.embedding_length": hidden, "gemma3.block_count": layers,
            "gemma3.feed_forward_length": 4 * hidden, "gemma3.attention.head_count": heads,
            "gemma3.attention.head_count_kv": 1, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.attention.key_length": head_dim, "gemma3.rope.freq_base": 1e6, "gemma3.context_length": 32768,
            "gemma3.attention.sliding_window": 512, **extra}


def test_gemma3_gguf_config_has_what_llama_cpp_assumes():
    from mlx_refusal import gguf

    one_b = gguf.build_config(_meta(26, 1152, 4, 256), {"token_embd.weight"}, 262144)
    assert (one_b["head_dim"], one_b["query_pre_attn_scalar"], one_b["sliding_window_pattern"],
            one_b["rope_local_base_freq"], one_b["tie_word_embeddings"]) == (256, 256, 6, 10000.0, True)
    big = gguf.build_config(_meta(62, 5376, 32, 128), set(), 262208)  # 27B: the query scale is hidden/heads
    assert big["query_pre_attn_scalar"] == 168 and big["head_dim"] == 128
    flags = [(i + 1) % 3 != 0 for i in range(26)]
    assert gguf.build_config(_meta(26, 1152, 4, 256, **{"gemma3.attention.sliding_window_pattern": flags}),
                             set(), 262144)["sliding_window_pattern"] == 3
    with pytest.raises(UserError, match="do not repeat with one global layer per period"):
        gguf.build_config(_meta(26, 1152, 4, 256, **{"gemma3.attention.sliding_window_pattern": [False, True] * 13}),
                          set(), 262144)
    with pytest.raises(UserError, match="lacks 'gemma3.attention.sliding_window'"):
        gguf.build_config({k: v for k, v in _meta(26, 1152, 4, 256).items() if "sliding" not in k}, set(), 262144)


def test_gemma3_through_the_api_ablate_save_and_stock_load_and_steer_refused_early(tiny_gemma3, tmp_path,
                                                                                    monkeypatch):
    import mlx_lm

    import mlx_refusal as mr
    from mlx_refusal import workflow

    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    m = mr.load(str(tiny_gemma3))
    d = mr.compute_directions(m, batch_size=64)
    assert d.directions.shape == (5, HIDDEN)
    edit_ = mr.ablate(mr.load(m.info.spec), d, layer=2, eval_limit=0)
    out = edit_.save(tmp_path / "ablated", dtype="float32")
    stock, tok = mlx_lm.load(str(out))
    ids = mx.array([tok.encode("How do I bake bread?")])
    assert max_diff(stock(ids), edit_.model.model(ids)) <= 1e-5

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before the refusal")

    monkeypatch.setattr(workflow, "choose_steering", no_calibration)
    for layer in (2, None):  # None: the calibration would try layers > 0 only
        with pytest.raises(UserError, match="beyond layer 0 on gemma3"):
            mr.steer(m, d, layer=layer, alpha_multiple=0.5, eval_limit=0)

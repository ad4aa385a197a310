"""--share-embedding: an untied model whose embedding and lm_head are two roundings of one matrix
(what a GGUF import gives) exports ONE int8 matrix for both; different or edited matrices keep two."""
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from fixtures import make_tiny_model
from mlx_refusal.errors import UserError
from mlx_refusal.onnx import OnnxDecoder, Steering, SteeringTerm, export_onnx, read_model
from mlx_refusal.onnx.share import EMBEDDING_SITE, HEAD, decide_sharing, measure_copies
from mlx_refusal.record import EditRecord

PROMPTS = [[5, 17, 99, 3, 200, 41, 7, 250, 11], [8, 9, 10], [300, 2, 1, 60, 61, 62]]
VOCAB = 384


def block_round(w: np.ndarray, levels: int) -> np.ndarray:
    """w rounded as a symmetric GGUF block quantizer does: blocks of 32 along a row, the block's
    largest magnitude at `levels` steps (Q8_0: 127, Q5_0: 16)."""
    b = w.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / levels
    return (np.round(b / np.where(d > 0, d, 1)) * d).reshape(w.shape).astype(np.float32)


def rewrite(folder: Path, **arrays: np.ndarray) -> Path:
    """Replace parameters of an mlx folder in place (name with '.' written as '__')."""
    weights = dict(mx.load(str(folder / "model.safetensors")))
    weights.update({k.replace("__", "."): mx.array(v) for k, v in arrays.items()})
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return folder


def two_roundings(folder: Path, embed_levels: int, head_levels: int) -> Path:
    """The embedding and the head as two block roundings of one random matrix."""
    w = np.random.default_rng(3).standard_normal((VOCAB, 64)).astype(np.float32)
    return rewrite(folder, model__embed_tokens__weight=block_round(w, embed_levels),
                   lm_head__weight=block_round(w, head_levels))


@pytest.fixture(scope="module")
def gguf_like(tmp_path_factory) -> Path:
    """An untied tiny model like a GGUF import: a 5-bit embedding and an 8-bit head of one matrix."""
    return two_roundings(make_tiny_model(tmp_path_factory.mktemp("gguf_like")), 16, 127)


def vocab_int8(bundle: Path) -> list[str]:
    model = onnx.load(str(bundle / "onnx/model_int8.onnx"))
    return sorted(t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and VOCAB in t.dims)


def test_auto_shares_the_finer_copy_and_records_it(gguf_like, tmp_path):
    res = export_onnx(gguf_like, tmp_path / "auto", dtypes="int8")
    assert vocab_int8(res.out_dir) == ["lm_head.weight_T.int8"]
    rec = json.loads((res.out_dir / "export.json").read_text())["quantization"]["int8"]
    share = rec["shared_embedding"]
    assert share["mode"] == "auto" and share["shared"] and share["matrix"] == HEAD
    assert 0.01 < share["rel_rms_difference"] < 0.1 and share["min_row_cosine"] > 0.99
    assert share["distinct_per_block"][HEAD] > share["distinct_per_block"][EMBEDDING_SITE]
    assert "shared with the lm_head" in rec["embedding"]

    never = export_onnx(gguf_like, tmp_path / "never", dtypes="int8", share_embedding="never")
    assert vocab_int8(never.out_dir) == ["lm_head.weight_T.int8", "model.embed_tokens.weight_T.int8"]
    assert json.loads((never.out_dir / "export.json").read_text())["quantization"]["int8"]["shared_embedding"][
        "shared"] is False
    sizes = [sum(f.stat().st_size for f in (r.out_dir / "onnx").iterdir()) for r in (res, never)]
    assert sizes[1] - sizes[0] >= VOCAB * 64  # one int8 [vocab, hidden] matrix fewer

    # the shared graph computes the model whose embedding IS the head copy, within int8 error
    ref_model, _ = load_model(gguf_like)
    ref_model.model.embed_tokens.weight = ref_model.lm_head.weight
    dec = OnnxDecoder(res.out_dir / "onnx/model_int8.onnx")
    for p in PROMPTS:
        got = dec.step(np.array([p]), np.ones((1, len(p)), np.int64)).logits[0, -1]
        ref = np.array(ref_model(mx.array([p]))[0, -1])
        assert np.corrcoef(got, ref)[0, 1] > 0.99
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_the_finer_copy_is_found_from_the_data_not_the_name(tmp_path):
    """When the embedding is the 8-bit copy, the shared matrix is the embedding."""
    folder = two_roundings(make_tiny_model(tmp_path / "m"), 127, 16)
    sharing = decide_sharing(read_model(folder))
    assert sharing.shared and sharing.matrix == EMBEDDING_SITE
    res = export_onnx(folder, tmp_path / "web", dtypes="int8")
    assert vocab_int8(res.out_dir) == ["lm_head.weight_T.int8"]  # the head's name, the embedding's values
    src = read_model(folder)
    ref_model, _ = load_model(folder)
    ref_model.lm_head.weight = mx.array(src.weights[EMBEDDING_SITE])
    got = OnnxDecoder(res.out_dir / "onnx/model_int8.onnx").step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64))
    assert np.corrcoef(got.logits[0, -1], np.array(ref_model(mx.array([PROMPTS[0]]))[0, -1]))[0, 1] > 0.99


def test_auto_keeps_two_matrices_that_are_not_one(tiny_qwen2, gguf_like):
    """A genuinely untied head (independent random matrix) and an edit along one direction differ by
    more than rounding; `always` shares them anyway, `never` never shares."""
    src = read_model(tiny_qwen2)
    sharing = decide_sharing(src)
    assert not sharing.shared and sharing.matrix is None and "relative RMS difference" in sharing.reason
    assert decide_sharing(src, "always").shared

    # the head with one direction removed from every row (what an ablation does to the embedding):
    # small overall, but all of it along one direction
    src = read_model(gguf_like)
    head = src.weights[HEAD]
    d = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    d /= np.linalg.norm(d)
    ablated = head - np.outer(head @ d, d) * 0.5
    m = measure_copies(ablated, head)
    assert m["rel_rms_difference"] < 0.1 and m["top_direction_share"] > 0.9
    weights = {**src.weights, EMBEDDING_SITE: ablated}
    sharing = decide_sharing(replace(src, weights=weights))
    assert not sharing.shared and "along one direction" in sharing.reason
    assert not decide_sharing(read_model(gguf_like), "never").shared


def test_auto_never_shares_an_edited_embedding(gguf_like):
    src = read_model(gguf_like)
    ablated = replace(src, edit=EditRecord(kind="ablate", details={"summary": {"writers_skipped": []}}))
    assert not decide_sharing(ablated).shared and "ablate" in decide_sharing(ablated).reason
    skipped = replace(src, edit=EditRecord(kind="ablate", details={"summary": {"writers_skipped": ["model.embed_tokens"]}}))
    assert decide_sharing(skipped).shared

    # a layer-0 steering vector in every embedding row: auto keeps two; always compares (and
    # shares) the embedding without the vector, which the graph adds after the lookup
    v = np.full(64, 0.5, np.float32)
    term = SteeringTerm(name="refusal", layer=0, site=EMBEDDING_SITE, vector=v, direction=v / np.linalg.norm(v))
    steered = replace(src, steering=Steering(terms=(term,)),
                      weights={**src.weights, EMBEDDING_SITE: src.weights[EMBEDDING_SITE] + v})
    sharing = decide_sharing(steered)
    assert not sharing.shared and "layer 0" in sharing.reason and sharing.rel_rms_difference < 0.1
    assert decide_sharing(steered, "always").matrix == HEAD


def test_a_tied_model_has_one_matrix_whatever_the_mode(tiny_qwen2_tied):
    src = read_model(tiny_qwen2_tied)
    for mode in ("auto", "never"):
        sharing = decide_sharing(src, mode)
        assert sharing.shared and sharing.matrix is None and sharing.rel_rms_difference is None


def test_a_bad_mode_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="--share-embedding must be one of auto, always, never"):
        export_onnx(tmp_path / "no_model", tmp_path / "web", share_embedding="sometimes")


def test_always_shares_under_layer_0_steering_and_the_slider_still_works(gguf_like, tmp_path):
    """Shared with the head, the lookup reads the head's rows and the graph adds steering_scale * vector."""
    from test_onnx_export import make_steered

    folder, d = make_steered(gguf_like, tmp_path / "steered", layer=0, alpha=2.0)
    res = export_onnx(folder, tmp_path / "web", dtypes="int8", share_embedding="always")
    assert vocab_int8(res.out_dir) == ["lm_head.weight_T.int8"]
    slider = OnnxDecoder(res.out_dir / "onnx/steerable_int8.onnx")
    head = np.array(load_model(gguf_like)[0].lm_head.weight)
    refs = {}
    for scale in (0.0, 1.0):
        ref_model, _ = load_model(gguf_like)
        ref_model.model.embed_tokens.weight = mx.array(head + scale * 2.0 * d)
        refs[scale] = np.array(ref_model(mx.array([PROMPTS[0]]))[0, -1])
    for scale, other in ((0.0, 1.0), (1.0, 0.0)):
        got = slider.step(np.array([PROMPTS[0]]), np.ones((1, 9), np.int64), steering_scale=scale).logits[0, -1]
        err = np.abs(got - refs[scale]).max()
        assert np.corrcoef(got, refs[scale])[0, 1] > 0.99 and err < 0.3 * np.abs(got - refs[other]).max()



def test_other_dtypes_keep_the_folders_two_matrices(gguf_like, tmp_path):
    """fp32 is the folder's model exactly (its logits match mlx's to float precision): no sharing."""
    res = export_onnx(gguf_like, tmp_path / "web", dtypes="fp32")
    model = onnx.load(str(res.out_dir / "onnx/model.onnx"))
    assert sorted(t.name for t in model.graph.initializer if VOCAB in t.dims) == ["lm_head.weight_T", EMBEDDING_SITE]
    assert "int8" not in json.loads((res.out_dir / "export.json").read_text())["quantization"]


def test_the_help_states_the_bounds_the_code_uses():
    # The help is plain text (a fast --help imports no onnx), so it is checked against the bounds.
    from click.testing import CliRunner

    import cli
    from mlx_refusal.onnx.share import COPY_BOUNDS

    text = " ".join(CliRunner().invoke(cli.main, ["export-onnx", "--help"], terminal_width=400).output.split())
    assert f"relative RMS difference <= {COPY_BOUNDS.max_rel_rms:g}" in text
    assert f"every row's cosine >= {COPY_BOUNDS.min_row_cosine:g}" in text
    assert f"over {COPY_BOUNDS.max_top_direction:.0%} of the difference" in text

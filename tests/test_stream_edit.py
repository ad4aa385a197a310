"""The shard-streamed edit writes, tensor for tensor and bit for bit, what the in-memory edit
and `save_model` write: float and quantized, tied and untied, one shard and several."""
import mlx_refusal  # noqa: F401

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_refusal import stream_edit as se
from mlx_refusal.edit import ablate, add_steering_bias
from mlx_refusal.errors import UserError
from mlx_refusal.loading import load
from mlx_refusal.save import save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _copy_meta(src: Path, dst: Path, config: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def quantized_folder(src: Path, dst: Path, bits: int = 4) -> Path:
    """`src` quantized by mlx_lm (group size 32), saved as an mlx_lm folder."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    model, _, config = mlx_lm.load(str(src), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=bits)
    _copy_meta(src, dst, config)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return dst


def sharded_folder(src: Path, dst: Path, files: int = 3) -> Path:
    """`src` with its tensors split over `files` safetensors files and an index (the cut falls
    between a layer's o_proj and down_proj, and inside quantized triples, on purpose)."""
    weights = mx.load(str(src / "model.safetensors"))
    names = list(weights)
    _copy_meta(src, dst, json.loads((src / "config.json").read_text()))
    cuts = np.array_split(np.arange(len(names)), files)
    weight_map = {}
    for i, idx in enumerate(cuts):
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        mx.save_safetensors(str(dst / fname), {names[j]: weights[names[j]] for j in idx}, metadata={"format": "mlx"})
        weight_map.update({names[j]: fname for j in idx})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def sources(tiny_qwen2, tiny_qwen2_tied, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_sources")
    q4 = quantized_folder(tiny_qwen2_tied, root / "q4_tied")
    return {"untied": tiny_qwen2, "tied": tiny_qwen2_tied, "q4_tied": q4,
            "sharded": sharded_folder(tiny_qwen2_tied, root / "sharded"),
            "q4_sharded": sharded_folder(q4, root / "q4_sharded", files=4)}


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name != "steering.safetensors":
            out.update(mx.load(str(f)))
    return out


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        # numpy has no bfloat16: compare the raw 2-byte patterns
        raw = (lambda x: x.view(mx.uint16)) if ta[k].dtype == mx.bfloat16 else (lambda x: x)
        assert np.array(raw(ta[k])).tobytes() == np.array(raw(tb[k])).tobytes(), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    sa, sb = a / "steering.safetensors", b / "steering.safetensors"
    assert sa.exists() == sb.exists()
    if sa.exists():
        for k, v in mx.load(str(sa)).items():
            assert np.array_equal(np.array(v), np.array(mx.load(str(sb))[k]))


def in_memory(source: Path, edit, out: Path) -> Path:
    model, _, info = load(str(source))
    steering = None
    if isinstance(edit, se.Projection):
        ablate(model, edit.directions, layers=edit.layers, scale=edit.scale, norm_preserve=edit.norm_preserve,
               include_embedding=edit.include_embedding)
    else:
        add_steering_bias(model, edit.layer, edit.vector)
        steering = (edit.layer, edit.direction, edit.vector)
    return save_model(model, info.path, out, {"edit": "test"}, steering=steering)


def edits(num_layers: int, hidden: int):
    rows = np.random.default_rng(3).standard_normal((num_layers + 1, hidden)).astype(np.float32)
    unit = rows[2] / np.linalg.norm(rows[2])
    return {
        "ablate-per-site": se.Projection(rows),
        "project-x2-some-layers": se.Projection(rows[2], scale=2.0, layers=(1, 2), norm_preserve=True),
        "project-no-embedding": se.Projection(rows[1], scale=-4.0, include_embedding=False),
        "steer-layer-2": se.Steering(2, unit, 3.5),
        "steer-layer-0": se.Steering(0, unit, 1.5),
    }


@pytest.mark.parametrize("source,max_memory", [
    ("untied", None), ("tied", None), ("q4_tied", None), ("sharded", None), ("q4_sharded", None),
    # a limit cuts each file into several batches of tensors (100 KB, 20 KB here), each on a fresh lazy model
    ("tied", 300_000), ("q4_sharded", 60_000)])
@pytest.mark.parametrize("edit", list(edits(4, 64)))
def test_streamed_edit_is_bit_identical_to_in_memory(sources, source, edit, max_memory, tmp_path):
    spec = edits(4, 64)[edit]
    a = in_memory(sources[source], spec, tmp_path / "memory")
    b = se.stream_edit(sources[source], tmp_path / "streamed", spec, {"edit": "test"}, max_memory=max_memory)
    if max_memory:
        assert len(se._batches(tensors(a), max_memory // 3)) > len(se.weight_files(sources[source]))
    assert_bit_identical(a, b)
    assert sorted(p.name for p in b.glob("model*.safetensors")) == se.weight_files(sources[source])
    assert json.loads((b / "refusal_edit.json").read_text())["streamed"] is True


def test_streamed_edit_loads_in_stock_mlx_lm_and_keeps_the_split(sources, tmp_path):
    import mlx_lm

    out = se.stream_edit(sources["q4_sharded"], tmp_path / "out", edits(4, 64)["steer-layer-2"], {"edit": "steer"})
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # the steering bias went into the file of its down_proj weight
    assert index["model.layers.1.mlp.down_proj.bias"] == index["model.layers.1.mlp.down_proj.weight"]
    model, _ = mlx_lm.load(str(out))
    assert model.model_type == "llama"


def test_sizes_and_the_automatic_choice(sources):
    assert se.parse_size("1GB") == 10**9 and se.parse_size("512MiB") == 512 * 2**20 and se.parse_size("2.5g") == 2.5e9
    with pytest.raises(UserError, match="--max-memory"):
        se.parse_size("lots")
    need = se.in_memory_bytes(sources["tied"])
    assert se.should_stream(sources["tied"], need - 1) and not se.should_stream(sources["tied"], need)
    assert se.largest_tensor_bytes(sources["tied"]) == 384 * 64 * 4  # the embedding


def test_streamed_edit_refuses_its_own_source(sources):
    with pytest.raises(UserError, match="source model folder"):
        se.stream_edit(sources["tied"], sources["tied"], edits(4, 64)["ablate-per-site"], {})


@pytest.mark.real
def test_streamed_edit_of_the_default_model_is_bit_identical(tmp_path):
    """The reference model (2.5 GB float32, one file), ablated along one direction under a 1 GB
    limit: every tensor equals the in-memory edit's (the arrays `save_model` writes; that the
    save writes them unchanged is the tiny models' test above)."""
    from mlx_refusal.loading import resolve
    from mlx_refusal.save import stock_weights_and_config

    src = resolve("qwen2.5-coder-0.5b")
    d = np.random.default_rng(0).standard_normal(896).astype(np.float32)
    out = se.stream_edit(src, tmp_path / "streamed", se.Projection(d), {"edit": "ablate"}, max_memory=10**9)
    streamed = tensors(out)
    model, _, info = load(str(src))
    ablate(model, d)
    weights, config = stock_weights_and_config(model, json.loads((src / "config.json").read_text()), mx.float32)
    assert set(weights) == set(streamed)
    for k, v in weights.items():
        assert v.dtype == streamed[k].dtype and np.array(v).tobytes() == np.array(streamed[k]).tobytes(), k
    assert json.loads((out / "config.json").read_text()) == config


def test_cli_max_memory_streams_and_matches_the_in_memory_cli(tiny_qwen2_tied, tmp_path):
    """`ablate --directions D --max-memory 1KB` rewrites the shards; without the limit the same
    command edits in memory; the two folders are bit-identical."""
    from conftest import run_cli
    from mlx_refusal.directions import Directions, save_directions

    rows = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    from mlx_refusal.loading import weight_fingerprint
    meta = {"model": {"spec": str(tiny_qwen2_tied), "fingerprint": weight_fingerprint(tiny_qwen2_tied)}}
    save_directions(Directions(rows, rows, 0 * rows, np.ones(5, np.float32), [], meta), tmp_path / "d")
    common = ["--model", tiny_qwen2_tied, "--directions", tmp_path / "d", "--layer", "2"]
    run_cli("ablate", *common, "--max-memory", "1KB", "--out", tmp_path / "streamed")
    run_cli("ablate", *common, "--max-memory", "1TB", "--eval-limit", "0", "--out", tmp_path / "memory")
    assert json.loads((tmp_path / "streamed" / "refusal_edit.json").read_text())["streamed"] is True
    assert "streamed" not in json.loads((tmp_path / "memory" / "refusal_edit.json").read_text())
    assert_bit_identical(tmp_path / "memory", tmp_path / "streamed")


def test_cli_max_memory_without_directions_is_one_line_error(tiny_qwen2, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "ablate", "--model", str(tiny_qwen2),
                           "--max-memory", "1KB", "--out", str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "--directions" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

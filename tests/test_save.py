"""Saving edited models: stock `mlx_lm.load` opens them with no flags and gives the logits of the
in-memory edited model; provenance files; atomic writes."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import json
import shutil
import struct

import numpy as np
import pytest

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

from mlx_refusal import arch, edit, interventions, save
from mlx_refusal.errors import UserError
from mlx_refusal.record import STEERING_FILE, array_sha256

TOKENS = mx.array([[3, 5, 17, 33, 100, 7, 250, 9], [1, 2, 4, 8, 16, 32, 64, 128]])
RECORD = {"model": {"spec": "tiny", "fingerprint": "ab" * 32},
          "prompts": {"harmful": {"name": "harmful", "sha256": "cd" * 32}}}


def load(path):
    model, _ = mlx_lm.load(str(path))
    return model


def rand_dir(seed=0, hidden=64):
    return np.random.default_rng(2000 + seed).standard_normal(hidden).astype(np.float32)


def max_diff(a, b):
    return float(mx.abs(a - b).max())


def config(path):
    return json.loads((path / "config.json").read_text())


@pytest.fixture(params=["tiny_qwen2", "tiny_qwen2_tied", "tiny_llama", "tiny_qwen3"])
def any_model(request):
    return request.getfixturevalue(request.param)


def test_unedited_save_reproduces_the_original(any_model, tmp_path):
    model = load(any_model)
    out = save.save_model(model, any_model, tmp_path / "out", {"edit": None})
    assert config(out)["model_type"] == config(any_model)["model_type"]
    assert max_diff(load(out)(TOKENS), model(TOKENS)) == 0.0


def test_ablation_round_trips_through_stock_mlx_lm(any_model, tmp_path):
    model = load(any_model)
    d = rand_dir(1)
    with interventions.projecting_out(model, d):
        runtime = model(TOKENS)
    summary = edit.ablate(model, d)
    out = save.save_model(model, any_model, tmp_path / "abl",
                          {**RECORD, "edit": "ablate", "scale": 1.0, **summary.as_record()})
    reloaded = load(out)
    assert max_diff(reloaded(TOKENS), model(TOKENS)) <= 1e-5
    assert max_diff(reloaded(TOKENS), runtime) <= 1e-3
    cfg = config(out)
    assert cfg["model_type"] == config(any_model)["model_type"]
    assert cfg["tie_word_embeddings"] is False  # a tied source was untied, so the head is unchanged
    record = json.loads((out / save.EDIT_RECORD).read_text())
    assert record["untied_embeddings"] == bool(config(any_model)["tie_word_embeddings"])
    assert not (out / STEERING_FILE).exists()


@pytest.mark.parametrize("layer", [0, 1, 3, 4])
def test_steering_round_trips_through_stock_mlx_lm(tiny_qwen2_tied, layer, tmp_path):
    model = load(tiny_qwen2_tied)
    d = edit.unit(rand_dir(2))
    v = 6.0 * d
    with interventions.adding_at(model, layer, v):
        runtime = model(TOKENS)
    site = edit.add_steering_bias(model, layer, v)
    out = save.save_model(model, tiny_qwen2_tied, tmp_path / "steer",
                          {**RECORD, "edit": "steer", "layer": layer, "alpha": 6.0, "site": site},
                          steering=(layer, d, v))
    reloaded = load(out)
    assert max_diff(reloaded(TOKENS), model(TOKENS)) <= 1e-5
    assert max_diff(reloaded(TOKENS), runtime) <= 1e-4
    cfg = config(out)
    if layer == 0:
        assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is False
    else:
        # Qwen2 has no MLP biases: saved as llama + attention_bias (q/k/v biases kept) + mlp_bias
        assert (cfg["model_type"], cfg["attention_bias"], cfg["mlp_bias"]) == ("llama", True, True)
        assert type(reloaded).__module__ == "mlx_lm.models.llama"
        params = dict(tree_flatten(reloaded.parameters()))
        for i in range(4):
            bias = params[f"model.layers.{i}.mlp.down_proj.bias"]
            assert max_diff(params[f"model.layers.{i}.self_attn.o_proj.bias"], mx.zeros_like(bias)) == 0.0
            if f"model.layers.{i}.mlp.down_proj.bias" == site:
                assert max_diff(bias, v) == 0.0
            else:
                assert max_diff(bias, mx.zeros_like(bias)) == 0.0
    stored = mx.load(str(out / STEERING_FILE))
    assert max_diff(stored["direction"], d) == 0.0 and max_diff(stored["vector"], v) == 0.0
    record = json.loads((out / save.EDIT_RECORD).read_text())
    assert record["site"] == site and record["layer"] == layer
    assert record["alpha"] == pytest.approx(6.0)
    assert record["direction_sha256"] == array_sha256(d)
    assert record["tool_version"] == mlx_refusal.__version__ and record["date"]
    assert record["model"] == RECORD["model"] and record["prompts"] == RECORD["prompts"]
    card = (out / "README.md").read_text()
    assert f"mlx_lm.generate --model {out.name}" in card and "Intended use" in card and site in card


def test_llama_steering_writes_zero_mlp_biases(tiny_llama, tmp_path):
    model = load(tiny_llama)
    v = 4.0 * edit.unit(rand_dir(3))
    site = edit.add_steering_bias(model, 2, v)
    out = save.save_model(model, tiny_llama, tmp_path / "s", {"edit": "steer"}, steering=(2, v / 4.0, v))
    reloaded = load(out)
    assert max_diff(reloaded(TOKENS), model(TOKENS)) <= 1e-5
    params = dict(tree_flatten(reloaded.parameters()))
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert max_diff(params[f"model.layers.0.mlp.{name}.bias"], 0.0) == 0.0
    assert "model.layers.0.self_attn.q_proj.bias" not in params  # llama source: no attention biases added
    assert config(out)["mlp_bias"] is True and config(out)["attention_bias"] is False
    assert site in params


def test_qwen3_steering_at_layer_zero_saves_as_qwen3(tiny_qwen3, tmp_path):
    model = load(tiny_qwen3)
    v = 3.0 * edit.unit(rand_dir(4))
    edit.add_steering_bias(model, 0, v)
    out = save.save_model(model, tiny_qwen3, tmp_path / "s", {"edit": "steer"}, steering=(0, v / 3.0, v))
    assert config(out)["model_type"] == "qwen3"
    assert max_diff(load(out)(TOKENS), model(TOKENS)) <= 1e-5


def test_a_bias_qwen3_cannot_hold_is_refused_at_save(tiny_qwen3, tmp_path):
    model = load(tiny_qwen3)
    model.model.layers[1].self_attn.o_proj.bias = mx.ones((64,))  # bypassing add_steering_bias
    with pytest.raises(UserError, match="qwen3") as info:
        save.save_model(model, tiny_qwen3, tmp_path / "s", {"edit": "steer"})
    assert isinstance(info.value, arch.UnsupportedArchitecture)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Quantized models.

def quantized_source(src, dst, bits):
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, _, cfg = mlx_lm.load(str(src), return_config=True)
    model, cfg = quantize_model(model, cfg, group_size=32, bits=bits)
    save_model(dst, model)
    save_config(cfg, dst / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_ablation_round_trip(tiny_qwen2_tied, tmp_path, bits):
    src = quantized_source(tiny_qwen2_tied, tmp_path / "q", bits)
    model = load(src)
    edit.ablate(model, rand_dir(6))
    out = save.save_model(model, src, tmp_path / "out", {"edit": "ablate"})
    cfg = config(out)
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == 32
    reloaded = load(out)
    assert max_diff(reloaded(TOKENS), model(TOKENS)) <= 1e-5
    assert reloaded.lm_head.bits == bits  # the untied head stays quantized like the embedding


def test_quantized_steering_round_trip_keeps_packed_weights(tiny_qwen2, tmp_path):
    src = quantized_source(tiny_qwen2, tmp_path / "q", 4)
    model = load(src)
    v = 5.0 * edit.unit(rand_dir(7))
    site = edit.add_steering_bias(model, 3, v)
    out = save.save_model(model, src, tmp_path / "out", {"edit": "steer"}, steering=(3, v / 5.0, v))
    reloaded = load(out)
    assert max_diff(reloaded(TOKENS), model(TOKENS)) <= 1e-5
    before, after = mx.load(str(src / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert all(mx.array_equal(before[k], after[k]) for k in before if k.endswith((".weight", ".scales")))
    assert site in after


# ---------------------------------------------------------------------------------------------
# Files, dtype and atomicity.

def test_copies_only_known_data_files(tiny_qwen2, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    (src / "modeling_evil.py").write_text("raise SystemExit('never run me')\n")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = save.save_model(load(src), src, tmp_path / "out", {"edit": None})
    names = {p.name for p in out.iterdir()}
    assert "modeling_evil.py" not in names and not any(n.endswith(".py") for n in names)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
            "config.json", "model.safetensors", "refusal_edit.json", "README.md"} <= names


def _header_dtypes(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_saves_in_the_source_dtype_unless_told(tiny_qwen2, tmp_path):
    model = load(tiny_qwen2)
    out = save.save_model(model, tiny_qwen2, tmp_path / "f32", {})
    assert _header_dtypes(out / "model.safetensors") == {"F32"}
    bf = save.save_model(model, tiny_qwen2, tmp_path / "bf16", {}, dtype="bfloat16")
    assert _header_dtypes(bf / "model.safetensors") == {"BF16"}
    assert save.stored_dtype(bf) == "bfloat16"  # loading.stored_dtype, reused
    # saving from a bf16 source defaults to bf16
    again = save.save_model(load(bf), bf, tmp_path / "again", {})
    assert _header_dtypes(again / "model.safetensors") == {"BF16"}
    with pytest.raises(UserError, match="dtype"):
        save.save_model(model, tiny_qwen2, tmp_path / "x", {}, dtype="int3")


def test_existing_output_is_refused_and_force_replaces_it(tiny_qwen2, tmp_path):
    model = load(tiny_qwen2)
    out = tmp_path / "out"
    save.save_model(model, tiny_qwen2, out, {"edit": "first"})
    (out / "stale.txt").write_text("from the previous run")
    with pytest.raises(UserError, match="--force"):
        save.save_model(model, tiny_qwen2, out, {"edit": "second"})
    assert json.loads((out / save.EDIT_RECORD).read_text())["edit"] == "first"
    save.save_model(model, tiny_qwen2, out, {"edit": "second"}, force=True)
    assert json.loads((out / save.EDIT_RECORD).read_text())["edit"] == "second"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders left


def test_force_never_replaces_a_folder_that_is_not_a_model(tiny_qwen2, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a model folder"):
        save.save_model(load(tiny_qwen2), tiny_qwen2, precious, {}, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="source"):
        save.save_model(load(tiny_qwen2), tiny_qwen2, tiny_qwen2, {}, force=True)


def test_a_failure_mid_write_leaves_nothing_behind(tiny_qwen2, tmp_path, monkeypatch):
    model = load(tiny_qwen2)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save, "model_card", boom)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save.save_model(model, tiny_qwen2, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_forced_replace_keeps_the_old_folder(tiny_qwen2, tmp_path, monkeypatch):
    model = load(tiny_qwen2)
    out = save.save_model(model, tiny_qwen2, tmp_path / "out", {"edit": "old"})
    monkeypatch.setattr(save, "_copy_tokenizer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save.save_model(model, tiny_qwen2, out, {"edit": "new"}, force=True)
    assert json.loads((out / save.EDIT_RECORD).read_text())["edit"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_several_steering_terms_are_all_written_and_add_up(tiny_qwen2, tmp_path):
    model = load(tiny_qwen2)
    d1, d2, d3 = (edit.unit(rand_dir(s)) for s in (3, 4, 5))
    terms = [save.SteeringTerm("refusal", 2, np.asarray(d1), 6.0, 0.5),
             save.SteeringTerm("voice", 2, np.asarray(d2) * 3.0, 2.0, 0.2),  # shares the site; not unit
             save.SteeringTerm("voice", 1, np.asarray(d3), -1.5, None)]
    with interventions.adding_at(model, 2, terms[0].vector), interventions.adding_at(model, 2, terms[1].vector), \
            interventions.adding_at(model, 1, terms[2].vector):
        runtime = model(TOKENS)
    for t in terms:
        edit.add_steering_bias(model, t.layer, t.vector)
    out = save.save_model(model, tiny_qwen2, tmp_path / "multi", {**RECORD, "edit": "steer"}, steering=terms)
    assert max_diff(load(out)(TOKENS), runtime) <= 1e-4
    record = json.loads((out / save.EDIT_RECORD).read_text())
    assert [(t["name"], t["layer"], t["multiple"]) for t in record["steering"]] == [
        ("refusal", 2, 0.5), ("voice", 2, 0.2), ("voice", 1, None)]
    assert record["steering"][0]["site"] == record["site"] == "model.layers.1.mlp.down_proj.bias"
    assert record["steering"][2]["site"] == "model.layers.0.mlp.down_proj.bias"
    assert (record["layer"], record["alpha"]) == (2, pytest.approx(6.0))
    stored = mx.load(str(out / STEERING_FILE))
    assert max_diff(stored["direction"], d1) == 0.0 and max_diff(stored["vector"], 6.0 * d1) <= 1e-6
    for i, (t, d) in enumerate(zip(terms, (d1, d2, d3))):
        assert max_diff(stored[f"term{i}.direction"], d) <= 1e-6
        assert max_diff(stored[f"term{i}.vector"], t.alpha * d) <= 1e-5
        assert record["steering"][i]["direction_sha256"] == array_sha256(stored[f"term{i}.direction"])
    card = (out / "README.md").read_text()
    assert "3 steering vectors" in card and "voice at layer 1" in card


def test_a_single_tuple_is_one_refusal_term(tiny_qwen2, tmp_path):
    model = load(tiny_qwen2)
    d = edit.unit(rand_dir(1))
    edit.add_steering_bias(model, 3, 2.0 * d)
    out = save.save_model(model, tiny_qwen2, tmp_path / "one", {"edit": "steer"}, steering=(3, d, 2.0 * d))
    record = json.loads((out / save.EDIT_RECORD).read_text())
    assert [(t["name"], t["layer"], t["alpha"]) for t in record["steering"]] == [("refusal", 3, pytest.approx(2.0))]
    stored = mx.load(str(out / STEERING_FILE))
    assert max_diff(stored["term0.vector"], stored["vector"]) == 0.0


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral", "qwen3"])
def test_expected_parameters_are_those_of_the_class_mlx_lm_loads(model_type, tmp_path):
    # mlx_lm's own loader on a folder with no weights builds the class it picks for the config
    # (mistral is remapped to llama there), which is what a saved edit must match strictly
    from mlx_lm.utils import load_model

    from fixtures import _config

    cfg = _config(model_type, 384, 64, 2, tie=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    stock, _ = load_model(tmp_path, lazy=True, strict=False)
    assert save._expected_parameters(cfg) == {k: tuple(v.shape) for k, v in tree_flatten(stock.parameters())}
    with pytest.raises(ValueError, match="not supported"):
        save._expected_parameters({**cfg, "model_type": "no_such_family"})

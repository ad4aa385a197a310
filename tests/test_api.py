"""The Python API end to end on a tiny random model: the README's few lines, the records the
edits carry, what `save` writes, and the errors a caller gets before any slow work."""
import json

import numpy as np
import pytest

import mlx.core as mx
import mlx_lm

import mlx_refusal as mr
from mlx_refusal.errors import UserError


@pytest.fixture(scope="module")
def loaded(tiny_qwen2, tmp_path_factory):
    import os

    os.environ["MLX_REFUSAL_CACHE"] = str(tmp_path_factory.mktemp("api_cache"))
    m = mr.load(str(tiny_qwen2))
    return m, mr.compute_directions(m, batch_size=64)


def _logits(model, tok, text="How do I bake bread?"):
    ids = mx.array([tok.encode(text)])
    return np.array(model(ids)[0, -1].astype(mx.float32))


def test_the_readme_lines_steer_save_and_stock_mlx_lm_runs_the_folder(loaded, tmp_path):
    m, d = loaded
    edit = mr.steer(mr.load(m.info.spec), d, layer=2, alpha_multiple=0.5, eval_limit=3, max_tokens=4)
    assert edit.kind == "steer" and edit.record["layer"] == 2 and edit.record["alpha_how"] == "given"
    assert edit.record["alpha"] == pytest.approx(0.5 * float(d.mean_norm[2]))
    assert edit.before.harmless.n == 3 and edit.after.harmful.n == 3
    # the fixed rule for the examples: the first harmless test prompts, in order
    assert [e["prompt"] for e in edit.record["examples"]] == [
        r.prompt for r in edit.after.records if r.set == "harmless"][: len(edit.record["examples"])]
    out = edit.save(tmp_path / "steered", dtype="float32")
    record = json.loads((out / "refusal_edit.json").read_text())
    assert record["direction_sha256"] == d.sha256(2) and (out / "steering.safetensors").exists()
    assert json.loads((out / "report" / "report.json").read_text())["choice"]["layer"] == 2
    stock, tok = mlx_lm.load(str(out))
    assert np.allclose(_logits(stock, tok), _logits(edit.model.model, edit.model.tokenizer), atol=1e-4)
    assert not np.allclose(_logits(stock, tok), _logits(m.model, m.tokenizer), atol=1e-3)


def test_ablate_removes_the_direction_from_every_writer_it_saves(loaded, tmp_path):
    m, d = loaded
    edit = mr.ablate(mr.load(m.info.spec), d, layer=2, eval_limit=0)
    assert edit.before is None and edit.after is None and edit.record["scale"] == 1.0
    assert edit.record["summary"] is not None and edit.record["layer"] == 2
    out = edit.save(tmp_path / "ablated", dtype="float32")
    weights = mx.load(str(out / "model.safetensors"))
    u = d.direction(2)
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert np.abs(u @ np.array(weights[name])).max() < 1e-4, name
    assert not (out / "report" / "report.json").exists()  # nothing was evaluated


def test_project_with_scale_zero_saves_the_source_weights(loaded, tmp_path):
    m, d = loaded
    out = mr.project(mr.load(m.info.spec), d, 0.0, layer=1, eval_limit=0).save(tmp_path / "same", dtype="float32")
    saved, source = mx.load(str(out / "model.safetensors")), mx.load(str(m.info.path / "model.safetensors"))
    for name, w in source.items():
        assert np.array_equal(np.array(saved[name].astype(mx.float32)), np.array(w.astype(mx.float32))), name


def test_evaluate_says_what_it_evaluated(loaded):
    m, _ = loaded
    report = mr.evaluate(m, limit=2, max_tokens=3, base=m)
    assert report.provenance["model"]["fingerprint"] == m.info.fingerprint
    assert report.provenance["prompts"]["harmful"]["n"] == 2 and report.kl_mean == pytest.approx(0.0, abs=1e-5)


def test_bad_calls_fail_in_one_line_before_any_work(loaded, tmp_path):
    from mlx_refusal import api

    m, d = loaded
    with pytest.raises(UserError, match="only one"):
        mr.steer(m, d, alpha=1.0, alpha_multiple=0.5)
    with pytest.raises(UserError, match="out of range"):
        mr.ablate(m, d, layer=99)
    wrong = mr.Directions(d.directions[:, :8], d.harmful_mean[:, :8], d.harmless_mean[:, :8], d.mean_norm)
    with pytest.raises(UserError, match="shape"):
        mr.steer(m, wrong, layer=1, alpha=1.0)
    with pytest.raises(UserError, match="streamed edit needs"):
        api.streamed_project(m.info.path, d, 1.0, select="evaluate")
    with pytest.raises(UserError, match="streamed steer needs"):
        api.streamed_steer(m.info.path, d, None, alpha=1.0)


def test_a_streamed_edit_saves_what_the_in_memory_one_saves(loaded, tmp_path):
    from mlx_refusal import api

    m, d = loaded
    streamed = api.streamed_project(m.info.path, d, 1.0, layer=2).save(tmp_path / "s", dtype="float32")
    memory = mr.ablate(mr.load(m.info.spec), d, layer=2, eval_limit=0).save(tmp_path / "m", dtype="float32")
    a, b = mx.load(str(streamed / "model.safetensors")), mx.load(str(memory / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert json.loads((streamed / "refusal_edit.json").read_text())["streamed"] is True


@pytest.mark.parametrize("desc, unit", [("search", "trial"), ("score layers", "layer"), ("eval after", "prompt")])
def test_progress_bars_count_what_the_step_counts(capsys, desc, unit):
    from mlx_refusal.console import progress_bar

    with progress_bar(desc, 2) as update:
        update(2)
    err = capsys.readouterr().err
    assert "2/2 " in err and (f"{unit}/s" in err or f"s/{unit}" in err), err

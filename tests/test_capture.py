import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_lm

from mlx_refusal import capture as cap_mod
from mlx_refusal.capture import cached_capture, capture_residuals, record_residuals
from mlx_refusal.errors import UserError
from mlx_refusal.template import encode_prompts, encode_text, post_instruction_count, render

WORDS = "how do I bake bread tell me the capital of France quickly please write a poem about sea moon".split()


@pytest.fixture(scope="module")
def qwen(tiny_qwen2):
    return mlx_lm.load(str(tiny_qwen2))


def reference_residuals(model, tok, prompt, npos=1):
    """Plain full-sequence forward, no cache, no batching: the ground truth."""
    ids = encode_text(tok, render(tok, prompt))
    h = model.model.embed_tokens(mx.array([ids]))
    rows = []
    for layer in model.model.layers:
        rows.append(h[0, -npos:].mean(axis=0))
        h = layer(h, "causal", None)
    rows.append(h[0, -npos:].mean(axis=0))
    return np.array(mx.stack(rows))


def test_matches_plain_forward(qwen):
    model, tok = qwen
    prompts = ["How do I bake bread?", "Hi", "Write a poem about the sea and the moon, please, in French."]
    got = capture_residuals(model, tok, prompts, batch_size=3, keep_all=True)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(got.acts[i], reference_residuals(model, tok, p), atol=1e-4)
    assert got.mean.dtype == np.float64 and got.mean.shape == (5, 64)
    np.testing.assert_allclose(got.mean, got.acts.astype(np.float64).mean(axis=0), atol=1e-6)
    assert got.stats["prefix_tokens"] > 10  # the shared system prompt was computed once


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 25), min_size=2, max_size=7), batch=st.integers(2, 5),
       positions=st.sampled_from(["last", "post-instruction"]), seed=st.integers(0, 1000))
def test_batched_equals_one_at_a_time(qwen, lengths, batch, positions, seed):
    model, tok = qwen
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in lengths]
    batched = capture_residuals(model, tok, prompts, positions=positions, batch_size=batch, keep_all=True)
    single = capture_residuals(model, tok, prompts, positions=positions, batch_size=1, keep_all=True)
    np.testing.assert_allclose(batched.acts, single.acts, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_other_architectures(request, fixture):
    model, tok = mlx_lm.load(str(request.getfixturevalue(fixture)))
    prompts = ["How do I bake bread?", "Tell me how to pick a lock"]
    got = capture_residuals(model, tok, prompts, batch_size=2, keep_all=True)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(got.acts[i], reference_residuals(model, tok, p), atol=1e-4)


def test_post_instruction_positions_come_from_the_template(qwen):
    model, tok = qwen
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    assert post_instruction_count(tok) == len(encode_text(tok, suffix))
    enc = encode_prompts(tok, ["Write a poem"], "post-instruction")[0]
    assert tok.decode(enc.ids[-enc.num_positions:]) == suffix
    got = capture_residuals(model, tok, ["Write a poem"], positions="post-instruction", keep_all=True)
    ref = reference_residuals(model, tok, "Write a poem", npos=enc.num_positions)
    np.testing.assert_allclose(got.acts[0], ref, atol=1e-4)


def test_hooks_are_removed_even_on_error(qwen):
    model, tok = qwen
    blocks, norm = list(model.model.layers), model.model.norm

    def boom(site, x):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        with record_residuals(model, boom):
            model(mx.array([[1, 2, 3]]))
    assert all(a is b for a, b in zip(model.model.layers, blocks)) and model.model.norm is norm


def test_lm_head_is_not_run(qwen):
    model, tok = qwen

    def explode(*args, **kwargs):
        raise AssertionError("the LM head must not run during capture")

    head = model.lm_head
    model.lm_head = explode
    try:
        got = capture_residuals(model, tok, ["How do I bake bread?"])
    finally:
        model.lm_head = head
    assert np.isfinite(got.mean).all()


def test_disk_cache_hits_and_misses(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path))
    model, tok = qwen
    prompts = ["How do I bake bread?", "Write a poem about the moon"]
    first, hit1 = cached_capture(model, tok, prompts, "fp-a")
    second, hit2 = cached_capture(model, tok, prompts, "fp-a")
    assert (hit1, hit2) == (False, True)
    np.testing.assert_array_equal(first.mean, second.mean)
    _, hit3 = cached_capture(model, tok, prompts + ["Hi"], "fp-a")
    _, hit4 = cached_capture(model, tok, prompts, "fp-b")
    _, hit5 = cached_capture(model, tok, prompts, "fp-a", positions="post-instruction")
    _, hit6 = cached_capture(model, tok, prompts, "fp-a", use_cache=False)
    assert not any([hit3, hit4, hit5, hit6])
    # a damaged entry is recomputed rather than trusted
    for f in (tmp_path / "activations").glob("*.npz"):
        f.write_bytes(b"garbage")
    again, hit7 = cached_capture(model, tok, prompts, "fp-a")
    assert not hit7
    np.testing.assert_allclose(again.mean, first.mean, atol=1e-6)


def test_empty_prompt_list_is_a_user_error(qwen):
    model, tok = qwen
    with pytest.raises(UserError):
        cap_mod.capture_residuals(model, tok, [])

"""The batched engine against plain, unbatched, uncached forward passes of the same model."""
import mlx_refusal  # noqa: F401

from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_map
from mlx_lm.models import qwen2

from mlx_refusal import arch, batching, interventions
from mlx_refusal import evaluation as ev
from mlx_refusal.errors import UserError

VOCAB = 61


@pytest.fixture(scope="module")
def model():
    mx.random.seed(3)
    m = qwen2.Model(qwen2.ModelArgs.from_dict(dict(
        model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False)))
    # float32 weights of unit-ish scale, so logits spread and a masking error shows
    m.update(tree_map(lambda a: mx.random.normal(a.shape) * 0.3 if a.ndim == 2 else a, m.parameters()))
    mx.eval(m.parameters())
    return m


# a shared head of 0..12 tokens, then 1..9 tokens of each of 1..6 prompts
prompt_sets = st.tuples(
    st.lists(st.integers(1, VOCAB - 1), max_size=12),
    st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=9), min_size=1, max_size=6),
).map(lambda t: [t[0] + rest for rest in t[1]])


def alone(model, ids):
    """Logits [len, vocab] of one prompt, no batch, no padding, no cache."""
    return np.array(model(mx.array([ids]))[0])


@settings(max_examples=40, deadline=None)
@given(prompts=prompt_sets, pad_id=st.integers(0, VOCAB - 1))
def test_prefill_with_shared_prefix_equals_each_prompt_alone(model, prompts, pad_id):
    prefix = batching.shared_prefix(model, prompts)
    assert prefix.length == batching.shared_prefix_len(prompts)
    logits = batching.prefill(model, partial(ev._logits_at, model), prompts, prefix, pad_id)
    for row, ids in zip(np.array(logits), prompts):
        np.testing.assert_allclose(row, alone(model, ids)[-1], atol=1e-4)


def greedy_alone(model, ids, n):
    """n greedy tokens of one prompt by full forward passes (no batch, no padding, no cache)."""
    out = []
    for _ in range(n):
        out.append(int(np.argmax(alone(model, ids + out)[-1])))
    return out


@settings(max_examples=15, deadline=None)
@given(prompts=prompt_sets, n=st.integers(1, 6))
def test_batched_greedy_decoding_equals_each_prompt_alone(model, prompts, n):
    """BatchGenerator left-pads the rows behind the shared prefix; each row still decodes as if alone,
    and the first-token distribution generation reports is that prompt's."""
    got = batching.decode_greedy(model, prompts, batching.shared_prefix(model, prompts, keep=2), n, set())
    assert got == [greedy_alone(model, ids, n) for ids in prompts]
    _, firsts = batching.generate_batched(model, partial(ev._logits_at, model), prompts, n, set(), 64, 0,
                                          first_logprobs=True)
    for lp, ids in zip(firsts, prompts):
        ref = alone(model, ids)[-1]
        np.testing.assert_allclose(np.array(lp), ref - ref.max() - np.log(np.exp(ref - ref.max()).sum()), atol=1e-4)


# prompts of 2..12 tokens after a shared head of 0..12: every one has a token before its last
long_prompt_sets = st.tuples(
    st.lists(st.integers(1, VOCAB - 1), max_size=12),
    st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=2, max_size=12), min_size=1, max_size=6),
).map(lambda t: [t[0] + rest for rest in t[1]])


def greedy_steered_alone(model, ids, n, terms):
    with batching.Steering(terms).added(model):
        return greedy_alone(model, ids, n)


@settings(max_examples=20, deadline=None)
@given(prompts=long_prompt_sets, n=st.integers(1, 6), scale=st.floats(0.5, 4.0), seed=st.integers(0, 2**31 - 1),
       batch_size=st.integers(1, 6))
def test_steered_generation_from_the_base_pass_equals_each_prompt_steered_alone(model, prompts, n, scale, seed,
                                                                                batch_size):
    """Blocks below the steered one come from the unsteered pass; the tokens are those of each
    prompt run whole with the vector added, and the model is left as it was."""
    vector = (np.random.default_rng(seed).standard_normal(32) * scale).astype(np.float32)
    base = batching.BasePass([1])
    steer = batching.Steering([(1, vector)], base)
    assert steer.resumes(model, prompts)
    got, _ = batching.generate_batched(model, partial(ev._logits_at, model), prompts, n, set(), batch_size, 0,
                                       steer=steer)
    assert got == [greedy_steered_alone(model, ids, n, [(1, vector)]) for ids in prompts]
    assert not isinstance(arch.layers(model)[1], interventions.Hooked)


def test_the_base_pass_runs_each_prompt_once_and_serves_every_strength(model, monkeypatch):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 3], [5, 6, 7, 8, 9, 12, 13, 14]]
    base = batching.BasePass([1])
    runs = []
    real = batching.BasePass._run
    monkeypatch.setattr(batching.BasePass, "_run", lambda self, m, seqs, *a: (runs.append(len(seqs)), real(self, m, seqs, *a)))
    rng = np.random.default_rng(0)
    for scale, rows in [(1.0, prompts[:2]), (2.0, prompts), (3.0, prompts[1:])]:
        terms = [(1, (scale * rng.standard_normal(32)).astype(np.float32))]
        got, _ = batching.generate_batched(model, partial(ev._logits_at, model), rows, 5, set(), 4, 0,
                                           steer=batching.Steering(terms, base))
        assert got == [greedy_steered_alone(model, ids, 5, terms) for ids in rows]
    assert runs == [2, 1]  # the third prompt joined on the second call; nothing ran on the third


def test_steering_elsewhere_than_the_base_recorded_runs_whole(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 3], [4]]
    vector = np.linspace(-2, 2, 32).astype(np.float32)
    base = batching.BasePass([1])
    for terms, rows in [([(0, vector)], prompts[:2]), ([(1, vector)], prompts), ([(2, vector)], prompts[:2])]:
        steer = batching.Steering(terms, base)
        assert not steer.resumes(model, rows)  # not recorded, a one-token prompt, the final residual
        got, _ = batching.generate_batched(model, partial(ev._logits_at, model), rows, 4, set(), 4, 0, steer=steer)
        with steer.added(model):
            assert got == batching.decode_greedy(model, rows, batching.shared_prefix(model, rows, keep=2), 4, set())
    assert not base._rows


def test_eos_and_stop_end_rows_early(model):
    prompts = [[7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 3], [7, 8, 9, 10, 20, 21, 22]]
    prefix = batching.shared_prefix(model, prompts, keep=2)
    free = batching.decode_greedy(model, prompts, prefix, 12, set())
    eos = {free[1][2]}
    cut = [f[: next((k for k, t in enumerate(f) if t in eos), len(f))] for f in free]
    assert batching.decode_greedy(model, prompts, prefix, 12, eos) == cut
    # row 2 is stopped at the first check (STOP_CHECK_EVERY tokens); the others run on
    halted = batching.decode_greedy(model, prompts, prefix, 12, eos, stop=lambda out, live: {12} & live,
                                    rows=[10, 11, 12])
    assert halted == [cut[0], cut[1], cut[2][: batching.STOP_CHECK_EVERY]]


def test_generator_normalises_only_until_every_row_has_its_first_token(model, monkeypatch):
    """GreedyHead: the generator's sampler sees one column per row once no first-token distribution
    is wanted, and the tokens are the same either way."""
    widths = []
    real = batching.GreedyHead.sample
    monkeypatch.setattr(batching.GreedyHead, "sample", lambda self, lp: (widths.append(lp.shape[-1]), real(self, lp))[1])
    prompts = [[7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 3], [7, 8, 9, 10, 20, 21, 22]]
    prefix = batching.shared_prefix(model, prompts, keep=2)
    plain = batching.decode_greedy(model, prompts, prefix, 10, set())
    assert widths and set(widths) == {1}
    widths.clear()
    tokens, firsts = batching.decode_greedy(model, prompts, prefix, 10, set(), first_logprobs=True)
    assert tokens == plain
    assert widths[0] == VOCAB and widths[-1] == 1  # full while a row still lacks its first token
    assert [f.shape for f in firsts] == [(VOCAB,)] * len(prompts)


@settings(max_examples=30, deadline=None)
@given(prompts=prompt_sets, read=st.integers(1, 3))
def test_right_padded_forward_reads_exact_residuals(model, prompts, read):
    """Capture's use: a right-padded batch behind the prefix cache; the final hidden states at each
    row's last `read` real tokens equal the unbatched ones."""
    keep = [min(read, len(p)) for p in prompts]
    prefix = batching.shared_prefix(model, prompts, keep)
    tokens, padding = batching.right_padded([p[prefix.length:] for p in prompts], pad_id=VOCAB - 1)
    hidden = np.array(arch.decoder(model)(tokens, cache=batching.batch_cache(model, prefix, padding)))
    for r, (ids, k) in enumerate(zip(prompts, keep)):
        n = len(ids) - prefix.length
        want = np.array(arch.decoder(model)(mx.array([ids]))[0, len(ids) - k:])
        np.testing.assert_allclose(hidden[r, n - k: n], want, atol=1e-4)


def test_prefix_cache_is_not_changed_by_its_batches(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 3]]
    prefix = batching.shared_prefix(model, prompts)
    assert prefix.length == 5
    before = [np.array(c.keys[..., : c.offset, :]) for c in prefix.caches]
    batching.prefill(model, partial(ev._logits_at, model), prompts, prefix, 0)
    for c, k in zip(prefix.caches, before):
        assert c.offset == 5
        np.testing.assert_array_equal(np.array(c.keys[..., : c.offset, :]), k)


def test_short_common_heads_are_not_shared(model):
    assert batching.shared_prefix(model, [[1, 2, 3, 4, 9], [1, 2, 3, 5]]).length == 0  # 3 < MIN_SHARED_PREFIX
    assert batching.shared_prefix(model, [[1, 2, 3, 4, 5]], keep=1).length == 4
    assert batching.shared_prefix_len([[1, 2, 3, 4, 5, 6]], keep=[3]) == 0  # 3 left after keeping 3
    assert batching.shared_prefix_len([]) == 0


@given(lengths=st.lists(st.integers(1, 50), max_size=60), batch_size=st.integers(1, 20))
def test_length_buckets_partition_the_prompts_in_as_few_equal_batches_as_allowed(lengths, batch_size):
    batches = batching.length_sorted_batches(lengths, batch_size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert len(batches) == -(-len(lengths) // batch_size)
    assert all(len(b) <= batch_size for b in batches)
    assert len({len(b) for b in batches[:-1]}) <= 1 and (not batches or len(batches[-1]) <= len(batches[0]))


def test_bad_batch_size_and_empty_prompts_are_user_errors(model):
    with pytest.raises(UserError, match="batch size"):
        batching.length_sorted_batches([3], 0)
    with pytest.raises(UserError, match="no tokens"):
        batching.generate_batched(model, partial(ev._logits_at, model), [[1, 2], []], 4, set(), 2, 0)


@settings(max_examples=15, deadline=None)
@given(prompts=prompt_sets, batch_size=st.integers(1, 6))
def test_first_token_logprobs_from_any_batching_equal_each_prompt_alone(model, prompts, batch_size):
    _, lp = batching.generate_batched(model, partial(ev._logits_at, model), prompts, 0, set(), batch_size, 0,
                                      first_logprobs=True)
    for row, ids in zip(np.array(lp), prompts):
        ref = alone(model, ids)[-1]
        np.testing.assert_allclose(row, ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max(), atol=1e-4)

"""The CPU's multiply-add activations (activations.py): the numbers, and the models that use them."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

from mlx_refusal import activations, arch, attention
from mlx_refusal.interventions import adding_at, projecting_out
from mlx_refusal.loading import load

FAMILIES = ["tiny_qwen2", "tiny_llama", "tiny_qwen3", "tiny_phi3", "tiny_gemma3"]

floats = st.floats(-200, 200, width=32, allow_nan=False)
pairs = st.integers(1, 300).flatmap(lambda n: st.tuples(hnp.arrays(np.float32, n, elements=floats),
                                                       hnp.arrays(np.float32, n, elements=floats)))


def silu64(g):
    g = g.astype(np.float64)
    return g / (1 + np.exp(-g))


def gelu_tanh64(g):
    g = g.astype(np.float64)
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("fast, exact", [(activations.swiglu, silu64), (activations.geglu_tanh, gelu_tanh64)],
                         ids=["swiglu", "geglu_tanh"])
@settings(max_examples=200, deadline=None)
@given(pair=pairs)
def test_activation_is_the_float64_one_times_up(fast, exact, pair):
    gate, up = pair
    got = np.array(fast(mx.array(gate), mx.array(up)), np.float64)
    want = exact(gate) * up
    np.testing.assert_array_less(np.abs(got - want), 4e-6 * np.abs(gate.astype(np.float64) * up) + 1e-37)


def test_exp_within_its_bound_and_clipped_beyond():
    x = np.linspace(-44, 44, 200001, dtype=np.float32)
    got = np.array(activations.mul_add_exp(mx.array(x)), np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 1.3e-5
    assert np.allclose(np.array(activations.mul_add_exp(mx.array([-1e30, 1e30]))), np.exp([-44.0, 44.0]), rtol=2e-5)


def test_activation_keeps_the_dtype_and_propagates_nan():
    g = mx.array([1.0, -2.0, float("nan")], dtype=mx.bfloat16)
    out = activations.swiglu(g, mx.ones(3, dtype=mx.bfloat16))
    assert out.dtype == mx.bfloat16
    assert np.isnan(np.array(out.astype(mx.float32))[2])


CPU_SWAPS = [activations, attention]  # the CPU's own MLP and attention forwards, installed alike
SWAP_IDS = {"ids": lambda m: m.__name__.rsplit(".", 1)[-1]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("swap", CPU_SWAPS, **SWAP_IDS)
def test_installed_model_computes_what_stock_mlx_lm_computes(swap, family, request):
    path = request.getfixturevalue(family)
    model, tokenizer = mlx_lm.load(str(path))
    tokens = mx.array([[5, 17, 33, 2, 40, 11, 9, 60, 23]])
    stock = model(tokens)
    stock_text = mlx_lm.generate(model, tokenizer, [5, 17, 33, 2], max_tokens=12)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert swap.install(model, device="CPU")
    assert swap.installed(model)
    fast = model(tokens)
    assert [k for k, _ in tree_flatten(model.parameters())] == names  # paths (and so saving) unchanged
    np.testing.assert_allclose(np.array(fast), np.array(stock), atol=1e-4 * float(mx.abs(stock).max()))
    assert np.array_equal(np.array(fast.argmax(-1)), np.array(stock.argmax(-1)))
    assert mlx_lm.generate(model, tokenizer, [5, 17, 33, 2], max_tokens=12) == stock_text  # KV-cache decoding too
    swap.uninstall(model)
    assert not swap.installed(model)
    layer = arch.layers(model)[0]
    assert all(type(m).__module__.startswith("mlx_lm.models.") for m in (layer.mlp, layer.self_attn))


def test_interventions_still_act_on_an_installed_model(tiny_qwen2):
    model, _ = mlx_lm.load(str(tiny_qwen2))
    tokens = mx.array([[5, 17, 33, 2, 40, 11, 9]])
    d = np.random.default_rng(0).normal(size=arch.hidden_size(model)).astype(np.float32)

    def edited():
        with adding_at(model, 2, 3 * d):
            added = np.array(model(tokens))
        with projecting_out(model, d):
            projected = np.array(model(tokens))
        return added, projected

    stock = edited()
    activations.install(model, device="CPU")
    for fast, ref in zip(edited(), stock):
        np.testing.assert_allclose(fast, ref, atol=1e-4 * np.abs(ref).max())
    assert activations.installed(model)  # the hooks put the fast MLPs back as they found them


@pytest.mark.parametrize("swap", CPU_SWAPS, **SWAP_IDS)
def test_install_only_on_the_cpu_and_not_when_told(swap, tiny_qwen2, monkeypatch):
    model, _ = mlx_lm.load(str(tiny_qwen2))
    assert not swap.install(model, device="gpu")
    monkeypatch.setenv(activations.ENV_STOCK, "1")
    assert not swap.install(model, device="CPU")
    assert not swap.installed(model)


@pytest.mark.parametrize("swap", CPU_SWAPS, **SWAP_IDS)
def test_load_installs_them_on_the_cpu(swap, tiny_qwen2):
    model, _, info = load(str(tiny_qwen2))
    assert swap.installed(model) == (info.device == "CPU")

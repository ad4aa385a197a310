"""Gated-MLP activations made of multiply-adds, for MLX's CPU build.

MLX's CPU build evaluates exp, sigmoid and tanh one element at a time: about 15-20 ns an element
on this project's 2-core machines, against 0.5-0.7 ns for a multiply. On Qwen2.5-0.5B that makes
the SwiGLU activations (24 blocks x 4,864 gates per token) the largest cost after the matrix
products: ~75 ms of a ~600 ms decode step at batch 32, and ~2.7 ms a token in a long prefill.

Here the sigmoid's exp is computed from multiply-adds alone (`mul_add_exp`, which attention.py's
softmax uses too). Under `mx.compile` the whole activation fuses into one kernel, about 4 ns an
element, and stays within 2e-6 of the float64 activation relative to |gate x up|
(tests/test_activations.py). (A polynomial times 2^n built from its float32 bits is more exact,
but a compiled graph cannot reinterpret bits, and the two kernels it then takes cost what they
save.)

`install` gives every block's MLP this forward, on the CPU only (Metal's exp is fast). It swaps
the class of each MLP instance for a subclass whose `__call__` is the same gated product with the
fast activation, so parameter paths, hooks on the projections and saved weights are untouched,
and mlx_lm itself is never patched. `uninstall` puts the stock classes back.
"""
from __future__ import annotations

import os

import mlx.core as mx

from . import arch

ENV_STOCK = "MLX_REFUSAL_STOCK_ACTIVATIONS"  # set to 1 to keep MLX's own activations and attention

_SQRT_2_OVER_PI = 0.7978845608028654
_TAYLOR = (362880, 40320, 5040, 720, 120, 24, 6, 2, 1, 1)  # k! for k = 9 ... 0


def mul_add_exp(x: mx.array) -> mx.array:
    """e^x for |x| <= 44, as (e^(x/64))^64: a degree-9 Taylor polynomial on |x/64| <= 0.69,
    squared six times. Relative error <= 1.3e-5 (each squaring doubles the polynomial's)."""
    # clipped: beyond 44 a sigmoid has saturated to within float32's precision of 0 or 1
    y = mx.clip(x, -44.0, 44.0) * (1.0 / 64)
    p = 1.0 / _TAYLOR[0]
    for k in _TAYLOR[1:]:
        p = p * y + 1.0 / k
    for _ in range(6):
        p = p * p
    return p


# Compiled per shape, not shapeless: MLX's shapeless CPU kernels run ~3x slower (14 against 5 ns
# an element). A new shape re-traces in ~0.2 ms and reuses the kernel, which MLX compiles once
# per machine (~1.5 s) and keeps on disk.
@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    g = gate.astype(mx.float32)
    return (g / (1.0 + mul_add_exp(-g)) * up).astype(gate.dtype)


@mx.compile
def geglu_tanh(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_approx(gate) * up: 0.5 (1 + tanh(z)) is sigmoid(2z)."""
    g = gate.astype(mx.float32)
    z = 2.0 * _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    return (g / (1.0 + mul_add_exp(-z)) * up).astype(gate.dtype)


GATED = {"silu": swiglu, "gelu_tanh": geglu_tanh}  # by families.GraphNeeds.activation

_fast_classes: dict[tuple[type, str], type] = {}


def _fast_class(stock: type, activation: str) -> type:
    if (stock, activation) not in _fast_classes:
        act = GATED[activation]

        def __call__(self, x):
            if "gate_up_proj" in self:  # Phi-3 keeps gate and up in one matrix
                gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(act(gate, up))

        _fast_classes[(stock, activation)] = type(stock.__name__, (stock,), {
            "__call__": __call__, "__module__": __name__, "__qualname__": f"fast {stock.__qualname__}",
            "stock_class": stock})
    return _fast_classes[(stock, activation)]


def _gated_mlp(mlp) -> bool:
    names = set(mlp.children())
    return names == {"gate_proj", "up_proj", "down_proj"} or names == {"gate_up_proj", "down_proj"}


def swaps_wanted(device: str | None = None) -> bool:
    """Whether the CPU's own forwards (these activations, attention.py's attention) go in: the
    model computes on the CPU (`device`, default backend.device_name()) and ENV_STOCK is not set."""
    from . import backend

    return os.environ.get(ENV_STOCK) != "1" and (device or backend.device_name()) == "CPU"


def swapped(model, child: str) -> list:
    """The blocks' `child` modules ("mlp", "self_attn") whose class a swap replaced; each subclass
    keeps the stock one as `stock_class`."""
    return [getattr(layer, child) for layer in arch.layers(model)
            if hasattr(type(getattr(layer, child, None)), "stock_class")]


def unswap(model, child: str) -> None:
    for module in swapped(model, child):
        module.__class__ = type(module).stock_class


def install(model, device: str | None = None) -> bool:
    """Give every block's gated MLP the fast activation, when `swaps_wanted(device)`. Returns
    whether it did."""
    if not swaps_wanted(device):
        return False
    activation = arch.check_supported(model).graph.activation
    mlps = [getattr(layer, "mlp", None) for layer in arch.layers(model)]
    if activation not in GATED or not mlps or not all(m is not None and _gated_mlp(m) for m in mlps):
        return False
    for mlp in mlps:
        if not hasattr(type(mlp), "stock_class"):
            mlp.__class__ = _fast_class(type(mlp), activation)
    return True


def installed(model) -> bool:
    return bool(swapped(model, "mlp"))


def uninstall(model) -> None:
    """Put MLX's own activations back (benchmarks compare both in one process)."""
    unswap(model, "mlp")

"""The activations few-bit backward knows: each one's exact forward and its derivative.

``FUNCTIONS[name]`` is an :class:`Activation`:

* ``forward(x)`` - the PyTorch op the forward pass runs (so the output is bit-identical to it);
* ``derivative(x)`` - f'(x) written out in torch ops, exact in float64; the solver fits tables to it;
* ``breakpoints`` - where f' is not smooth (a kink or a jump): quadrature splits its cells there;
* ``exact`` - True for ReLU, LeakyReLU, ReLU6 and Hardtanh, whose derivative is already piecewise
  constant with two values, so a 1-bit code gives PyTorch's gradient exactly;
* ``band`` - for the exact ReLU6 and Hardtanh: the code is "strictly inside (lo, hi)" rather than an
  interval index (their two values 0, 1, 0 would otherwise take three intervals).

Smooth functions use PyTorch's default parameters (softplus beta=1 threshold=20, ELU/CELU alpha=1);
CELU with alpha=1 is ELU, so their tables coincide. ``gelu`` is the erf GELU and ``gelu_tanh`` the tanh
approximation (``F.gelu(x, approximate="tanh")``, GPT-2's "gelu_new").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Activation", "FUNCTIONS", "SMOOTH", "EXACT", "get"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    breakpoints: tuple[float, ...] = ()
    exact: bool = False
    band: bool = False


def _gelu_prime(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh_prime(x):
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _silu_prime(x):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _mish_prime(x):
    t = torch.tanh(F.softplus(x))
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _elu_prime(x):
    return torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0.0)))


def _selu_prime(x):
    return _SELU_SCALE * torch.where(x > 0, torch.ones_like(x), _SELU_ALPHA * torch.exp(torch.clamp(x, max=0.0)))


def _hardswish_prime(x):
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), x / 3 + 0.5))


_SMOOTH = [
    Activation("gelu", F.gelu, _gelu_prime),
    Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_prime),
    Activation("silu", F.silu, _silu_prime),
    Activation("tanh", torch.tanh, lambda x: 1.0 - torch.tanh(x) ** 2),
    Activation("sigmoid", torch.sigmoid, lambda x: torch.sigmoid(x) * torch.sigmoid(-x)),
    Activation("softplus", F.softplus, torch.sigmoid),
    Activation("elu", F.elu, _elu_prime, breakpoints=(0.0,)),
    Activation("celu", F.celu, _elu_prime, breakpoints=(0.0,)),
    Activation("selu", F.selu, _selu_prime, breakpoints=(0.0,)),
    Activation("mish", F.mish, _mish_prime),
    Activation("logsigmoid", F.logsigmoid, lambda x: torch.sigmoid(-x)),
    Activation("softsign", F.softsign, lambda x: 1.0 / (1.0 + x.abs()) ** 2),
    Activation("tanhshrink", F.tanhshrink, lambda x: torch.tanh(x) ** 2),
    Activation("hardswish", F.hardswish, _hardswish_prime, breakpoints=(-3.0, 3.0)),
]

# The exact variants' forward takes its parameters from the table (see tables.exact_table).
_EXACT = [
    Activation("relu", F.relu, lambda x: (x > 0).to(x.dtype), breakpoints=(0.0,), exact=True),
    Activation("leaky_relu", F.leaky_relu, lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.01)),
               breakpoints=(0.0,), exact=True),
    Activation("relu6", F.relu6, lambda x: ((x > 0) & (x < 6)).to(x.dtype), breakpoints=(0.0, 6.0),
               exact=True, band=True),
    Activation("hardtanh", F.hardtanh, lambda x: ((x > -1) & (x < 1)).to(x.dtype), breakpoints=(-1.0, 1.0),
               exact=True, band=True),
]

FUNCTIONS: dict[str, Activation] = {a.name: a for a in _SMOOTH + _EXACT}
SMOOTH = tuple(a.name for a in _SMOOTH)
EXACT = tuple(a.name for a in _EXACT)


def get(name: str) -> Activation:
    """The registry entry for ``name``; a ValueError lists the known names otherwise."""
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown few-bit activation {name!r}; known: {', '.join(FUNCTIONS)}") from None

"""Few-bit activation modules: drop-ins for ``torch.nn`` activations (and HF's ACT2FN modules) whose
backward uses a b-bit code per element instead of the saved input (``tempo_ds.ops.fewbit``).

``FewBitActivation(name, bits=2, table=None)`` is the general module; ``FewBitGELU(bits=2,
approximate="none")``, ``FewBitSiLU(bits=2)``, ... mirror the ``torch.nn`` classes. The exact variants
``FewBitReLU()``, ``FewBitLeakyReLU(negative_slope)``, ``FewBitReLU6()``, ``FewBitHardtanh(min_val,
max_val)`` keep one bit and give PyTorch's gradients bit for bit. ``from_module(module, bits)`` builds
the few-bit twin of an existing activation module.

Where it pays: the code replaces the activation's input, so memory drops only where nothing else keeps
that input - e.g. before a frozen Linear (adapter / LoRA training), where GELU's 2 bytes per element in
bf16 become b/8. See ``tempo_ds.ops.fewbit`` for the maths and the byte counts.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from tempo_ds.fewbit.tables import exact_table
from tempo_ds.ops.fewbit import FewBitFunction, _forward, resolve

__all__ = ["FewBitActivation", "FewBitGELU", "FewBitSiLU", "FewBitTanh", "FewBitSigmoid", "FewBitSoftplus",
           "FewBitELU", "FewBitCELU", "FewBitSELU", "FewBitMish", "FewBitLogSigmoid", "FewBitSoftsign",
           "FewBitTanhshrink", "FewBitHardswish", "FewBitReLU", "FewBitLeakyReLU", "FewBitReLU6",
           "FewBitHardtanh", "from_module", "activation_name"]


class FewBitActivation(nn.Module):
    """``name``'s activation with a ``bits``-bit backward; ``table``: ``(borders, levels)`` or the
    shipped optimal one. The table is fixed at construction."""

    def __init__(self, name: str, bits: int = 2, table=None):
        super().__init__()
        self.spec = resolve(name, bits, table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return FewBitFunction.apply(x, self.spec)
        return _forward(x, self.spec, save=False)[0]

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, bits={self.spec.bits}"


class FewBitGELU(FewBitActivation):
    def __init__(self, bits: int = 2, approximate: str = "none", table=None):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate={approximate!r}; allowed values: 'none', 'tanh'")
        super().__init__("gelu" if approximate == "none" else "gelu_tanh", bits, table)


def _smooth_module(class_name: str, name: str):
    def __init__(self, bits: int = 2, table=None):
        FewBitActivation.__init__(self, name, bits, table)

    doc = f"Few-bit ``{name}``: exact forward, ``bits``-bit backward (``tempo_ds.ops.fewbit``)."
    return type(class_name, (FewBitActivation,), {"__init__": __init__, "__doc__": doc})


FewBitSiLU = _smooth_module("FewBitSiLU", "silu")
FewBitTanh = _smooth_module("FewBitTanh", "tanh")
FewBitSigmoid = _smooth_module("FewBitSigmoid", "sigmoid")
FewBitSoftplus = _smooth_module("FewBitSoftplus", "softplus")
FewBitELU = _smooth_module("FewBitELU", "elu")
FewBitCELU = _smooth_module("FewBitCELU", "celu")
FewBitSELU = _smooth_module("FewBitSELU", "selu")
FewBitMish = _smooth_module("FewBitMish", "mish")
FewBitLogSigmoid = _smooth_module("FewBitLogSigmoid", "logsigmoid")
FewBitSoftsign = _smooth_module("FewBitSoftsign", "softsign")
FewBitTanhshrink = _smooth_module("FewBitTanhshrink", "tanhshrink")
FewBitHardswish = _smooth_module("FewBitHardswish", "hardswish")
_SMOOTH_CLASSES = {"silu": FewBitSiLU, "tanh": FewBitTanh, "sigmoid": FewBitSigmoid, "softplus": FewBitSoftplus,
                   "elu": FewBitELU, "celu": FewBitCELU, "selu": FewBitSELU, "mish": FewBitMish,
                   "logsigmoid": FewBitLogSigmoid, "softsign": FewBitSoftsign, "tanhshrink": FewBitTanhshrink,
                   "hardswish": FewBitHardswish}


class FewBitReLU(FewBitActivation):
    """ReLU with a 1-bit code: PyTorch's gradient exactly."""

    def __init__(self):
        super().__init__("relu", 1)


class FewBitLeakyReLU(FewBitActivation):
    """LeakyReLU with a 1-bit code: PyTorch's gradient exactly."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__("leaky_relu", 1, exact_table("leaky_relu", negative_slope=negative_slope))


class FewBitReLU6(FewBitActivation):
    """ReLU6 with a 1-bit code: PyTorch's gradient exactly."""

    def __init__(self):
        super().__init__("relu6", 1)


class FewBitHardtanh(FewBitActivation):
    """Hardtanh with a 1-bit code: PyTorch's gradient exactly."""

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0):
        super().__init__("hardtanh", 1, exact_table("hardtanh", min_val=min_val, max_val=max_val))


@functools.lru_cache(maxsize=None)
def _hf_classes() -> dict[type, str]:
    try:
        from transformers import activations as hf
    except ImportError:
        return {}
    names = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
             "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
             "SiLUActivation": "silu", "MishActivation": "mish"}
    return {getattr(hf, cls): name for cls, name in names.items() if hasattr(hf, cls)}


def activation_name(module: nn.Module) -> str | None:
    """The registry name of an activation module that few-bit can replace exactly, or None.

    HF's tanh-GELU classes (NewGELU, FastGELU, GELUTanh, AccurateGELU) all compute the tanh
    approximation (in slightly different float orders), so they map to "gelu_tanh"; a few-bit module
    computes it as ``F.gelu(x, approximate="tanh")``. Modules with non-default parameters that change
    the function (ELU alpha != 1, Softplus beta != 1, ...) are not replaceable.
    """
    if isinstance(module, FewBitActivation):
        return None
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.Hardtanh):
        return "hardtanh"
    plain = {nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SELU: "selu", nn.Mish: "mish",
             nn.LogSigmoid: "logsigmoid", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink",
             nn.Hardswish: "hardswish", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu"}
    for cls, name in plain.items():
        if type(module) is cls:
            return name
    if type(module) is nn.Softplus and module.beta == 1 and module.threshold == 20:
        return "softplus"
    if type(module) in (nn.ELU, nn.CELU) and module.alpha == 1.0:
        return "elu" if type(module) is nn.ELU else "celu"
    return _hf_classes().get(type(module))


def from_module(module: nn.Module, bits: int = 2, table=None) -> FewBitActivation:
    """The few-bit twin of an activation module (``nn.GELU``, ``nn.SiLU``, HF's ``GELUActivation``, ...).

    Exact variants (ReLU, LeakyReLU, ReLU6, Hardtanh) always take their exact 1-bit table, whatever
    ``bits``. ``table`` overrides the shipped table of a smooth function (e.g. from ``calibrate``).
    """
    name = activation_name(module)
    if name is None:
        raise ValueError(f"no few-bit replacement for {type(module).__name__} ({module!r})")
    if name == "leaky_relu":
        return FewBitLeakyReLU(module.negative_slope)
    if name == "hardtanh":
        return FewBitHardtanh(module.min_val, module.max_val)
    if name in ("relu", "relu6"):
        return FewBitReLU() if name == "relu" else FewBitReLU6()
    if name in ("gelu", "gelu_tanh"):
        return FewBitGELU(bits, "none" if name == "gelu" else "tanh", table)
    return _SMOOTH_CLASSES[name](bits, table)

"""Functional ops, shaped like ``torch.nn.functional``. Each is a thin wrapper over an autograd Function
that keeps fewer bytes for backward than the PyTorch op, with a PyTorch path for any device and a Triton
kernel (``tempo_ds.kernels``) on CUDA.

Names are resolved lazily so that importing ``tempo_ds.ops`` stays cheap.
"""
import importlib

_WHERE = {
    "inplace_gelu": "gelu",
    "gelu_linear": "gelu_linear",
    "inplace_layer_norm": "layer_norm",
    "inplace_rms_norm": "rms_norm",
    "attention": "attention",
    "seed_dropout": "dropout",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__

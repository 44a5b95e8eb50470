"""Modules over ``tempo_ds.ops``: drop-in replacements for their ``torch.nn`` counterparts.

Names are resolved lazily so that importing ``tempo_ds.nn`` stays cheap.
"""
import importlib

_WHERE = {
    "InplaceGELU": "gelu",
    "GeluLinear": "gelu_linear",
    "InplaceLayerNorm": "layer_norm",
    "InplaceRMSNorm": "rms_norm",
    "SeedDropout": "dropout",
    "LeanAttention": "attention",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__

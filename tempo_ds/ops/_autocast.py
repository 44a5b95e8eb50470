"""Device-agnostic ``custom_fwd`` / ``custom_bwd``: backward and recompute see the forward's autocast state.

``torch.amp.custom_fwd`` needs the device type at decoration time; our Functions run on CPU and CUDA, so
the state is read for the device of the first tensor argument (DESIGN.md section 5, rule 6).
"""
from __future__ import annotations

import functools

import torch


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def custom_fwd(forward):
    """Decorate ``Function.forward``: record the autocast state of the inputs' device on ``ctx``."""
    @functools.wraps(forward)
    def wrapper(ctx, *args, **kwargs):
        device = _device_type(args)
        ctx._autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return forward(ctx, *args, **kwargs)
    return wrapper


def custom_bwd(backward):
    """Decorate ``Function.backward``: run it under the autocast state recorded in forward."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device, enabled, dtype = ctx._autocast
        with torch.autocast(device, enabled=enabled, dtype=dtype):
            return backward(ctx, *grads)
    return wrapper

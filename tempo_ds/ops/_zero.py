"""ZeRO-3 in backward: gather the parameters DeepSpeed partitioned away after forward (DESIGN.md §5, rule 7)."""
from __future__ import annotations

import contextlib

import torch


def gathered(*params: torch.Tensor | None):
    """Context in which DeepSpeed ZeRO-3 parameters partitioned away (``ds_status`` NOT_AVAILABLE) are
    gathered, and released after; a no-op for ordinary tensors."""
    partitioned = [p for p in params
                   if p is not None and getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE"]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def hold_parameters(ctx, *params: torch.Tensor | None) -> None:
    """Keep ZeRO-3 Parameters on ``ctx`` as objects, besides ``save_for_backward``: saved-tensor hooks (the meter,
    non-reentrant checkpointing, offloading) unpack a saved Parameter as a plain alias without ``ds_status``, so
    :func:`gathered` could not see that it is partitioned. Parameters are not activations: holding them costs
    nothing. Ordinary (and fake) tensors have no ``ds_id`` and are not held."""
    ctx.zero3 = tuple(p if hasattr(p, "ds_id") else None for p in params)


def held_parameters(ctx, *saved: torch.Tensor | None) -> tuple:
    """``saved`` (from ``ctx.saved_tensors``) with the Parameters :func:`hold_parameters` held put back."""
    return tuple(z if z is not None else t for z, t in zip(ctx.zero3, saved))

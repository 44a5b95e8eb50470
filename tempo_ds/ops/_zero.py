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

"""tempo_ds attention inside transformers: registered in ``AttentionInterface`` and selected per model.

Two implementations are registered under their own names, each with the boolean mask builder SDPA uses
(True = attend); without a mask builder transformers would hand a custom implementation no mask at all:

* ``"tempo"``           — ``tempo_ds.ops.attention(mode="lean")``: saves q, k, v, the output and a per-row
  log-sum-exp, never an s x s tensor;
* ``"tempo_recompute"`` — Tempo's attention-dropout recomputation (softmax output + a 1-bit mask).
"""
from __future__ import annotations

import functools

__all__ = ["IMPLEMENTATIONS", "implementation_name", "register"]

IMPLEMENTATIONS = {"lean": "tempo", "tempo": "tempo_recompute"}


def implementation_name(mode: str) -> str:
    """The registered transformers name for an attention mode of ``TempoConfig`` (registering on first use)."""
    register()
    return IMPLEMENTATIONS[mode]


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register both implementations (and their mask builders) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .ops.attention import hf_attention_forward

    for mode, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, functools.partial(hf_attention_forward, mode=mode))
        AttentionMaskInterface.register(name, sdpa_mask)

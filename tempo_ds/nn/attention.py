"""``LeanAttention``: scaled dot-product attention as a module, over ``tempo_ds.ops.attention``."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.attention import MODES, attention

__all__ = ["LeanAttention"]


class LeanAttention(nn.Module):
    """``attention(q, k, v, attn_mask, dropout_p, is_causal, scale, mode=mode)`` with dropout in training only.

    ``mode="lean"`` keeps q, k, v, the output and a log-sum-exp per row for backward; ``mode="tempo"``
    keeps the softmax output and a 1-bit dropout mask (Tempo's sub-layer dropout recomputation).
    """

    def __init__(self, dropout_p: float = 0.0, mode: str = "lean"):
        super().__init__()
        if not 0.0 <= dropout_p <= 1.0:
            raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1]")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed values: {', '.join(MODES)}")
        self.dropout_p = dropout_p
        self.mode = mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        return attention(q, k, v, attn_mask, p, is_causal, scale, mode=self.mode)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, mode={self.mode!r}"

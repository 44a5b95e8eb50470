"""``SeedDropout``: a drop-in for ``nn.Dropout`` that keeps no mask for backward (see ``ops/dropout.py``)."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.dropout import seed_dropout

__all__ = ["SeedDropout"]


class SeedDropout(nn.Module):
    """Dropout whose mask is regenerated from a seed in backward; the same attributes as ``nn.Dropout``.

    ``inplace`` is accepted for compatibility and ignored: the output is always a new tensor, because
    overwriting the input is unsafe when another op saved it (DESIGN.md section 5, rule 3), and in-place
    would save no activation memory here anyway (nothing is saved).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")
        self.p = p
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seed_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

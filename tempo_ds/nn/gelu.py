"""``InplaceGELU``: ``torch.nn.GELU`` that keeps its output and one bit per element, not its input."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.gelu import check_approximate, inplace_gelu

__all__ = ["InplaceGELU"]


class InplaceGELU(nn.GELU):
    """Drop-in for ``nn.GELU`` (same ``approximate`` attribute and repr) running
    ``tempo_ds.ops.inplace_gelu``: backward keeps the output, which the next Linear keeps anyway, plus
    ceil(n / 8) bytes of branch bits."""

    def __init__(self, approximate: str = "none") -> None:
        check_approximate(approximate)
        super().__init__(approximate)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return inplace_gelu(input, self.approximate)

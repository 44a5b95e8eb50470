"""``InplaceLayerNorm``: ``torch.nn.LayerNorm`` that keeps its output, not its input, for backward."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.layer_norm import inplace_layer_norm

__all__ = ["InplaceLayerNorm"]


class InplaceLayerNorm(nn.LayerNorm):
    """Drop-in for ``nn.LayerNorm`` (same arguments, parameter names and ``state_dict``) running
    ``tempo_ds.ops.inplace_layer_norm``: backward keeps the output, which the next Linear keeps anyway,
    plus 4 bytes of statistics per row."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return inplace_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> "InplaceLayerNorm":
        """A new ``InplaceLayerNorm`` holding ``module``'s own Parameter objects (nothing copied, so
        optimizers, ZeRO-3 partitions and ``state_dict`` keys carry over)."""
        if not isinstance(module, nn.LayerNorm) or type(module).forward not in (nn.LayerNorm.forward, cls.forward):
            raise TypeError(f"{type(module).__name__} is not a torch.nn.LayerNorm (or overrides its forward)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(module.normalized_shape)
        new.eps = module.eps
        new.elementwise_affine = module.elementwise_affine
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.train(module.training)
        return new

"""``GeluLinear``: GELU followed by a Linear, keeping only the GELU input for backward."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.gelu import check_approximate
from tempo_ds.ops.gelu_linear import gelu_linear

__all__ = ["GeluLinear"]


class GeluLinear(nn.Module):
    """``nn.Linear(in_features, out_features, bias)`` applied to ``GELU(x)``, with ``nn.Linear``'s
    parameter names, shapes and initialisation (``weight`` [out, in], ``bias`` [out]).

    Not a subclass of ``nn.Linear`` on purpose: code that recognises Linears and calls
    ``F.linear(x, m.weight, m.bias)`` itself would silently drop the GELU.
    """

    transposed = False  # True when the weight is [in, out] (taken over from transformers' Conv1D)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
                 device=None, dtype=None) -> None:
        super().__init__()
        check_approximate(approximate)
        self.in_features, self.out_features, self.approximate = in_features, out_features, approximate
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)

    @classmethod
    def from_linear(cls, linear: nn.Module, approximate: str = "none") -> "GeluLinear":
        """``GELU`` then ``linear`` as one module holding ``linear``'s own Parameter objects (nothing
        copied, so optimizers, ZeRO-3 partitions and ``state_dict`` values carry over). ``linear`` is an
        ``nn.Linear`` or transformers' ``Conv1D`` (weight [in, out], kept in that layout)."""
        if type(linear) is nn.Linear:
            sizes, transposed = (linear.in_features, linear.out_features), False
        elif type(linear).__name__ == "Conv1D" and hasattr(linear, "nf") and hasattr(linear, "nx"):
            sizes, transposed = (linear.nx, linear.nf), True
        else:
            raise TypeError(f"GeluLinear.from_linear takes an nn.Linear or transformers' Conv1D, "
                            f"not {type(linear).__name__}")
        new = cls(*sizes, linear.bias is not None, approximate, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.transposed = transposed
        new.train(linear.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu_linear(input, self.weight, self.bias, self.approximate, transposed=self.transposed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, approximate={self.approximate!r}"
                + (", transposed=True" if self.transposed else ""))

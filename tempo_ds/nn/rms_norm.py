"""``InplaceRMSNorm``: HuggingFace ``LlamaRMSNorm`` (or ``torch.nn.RMSNorm``) keeping its output for backward."""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.rms_norm import CASTINGS, inplace_rms_norm

__all__ = ["InplaceRMSNorm"]


def _computes_like_llama(module: nn.Module) -> bool:
    """Whether ``module``'s forward is HuggingFace's ``LlamaRMSNorm.forward`` or a verbatim copy of it (the
    "Copied from Llama" RMSNorms of Mistral, Qwen2, ...). Gemma's (``1 + w``) and T5's (cast to the weight
    dtype) compute something else and do not qualify."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (ref.co_code, ref.co_consts,
                                                                                  ref.co_names)


class InplaceRMSNorm(nn.Module):
    """RMSNorm over the last dimension running ``tempo_ds.ops.inplace_rms_norm``.

    Drop-in for HuggingFace's ``LlamaRMSNorm(hidden_size, eps)`` (parameter ``weight``, attribute
    ``variance_epsilon``) with the default ``casting="llama"``; ``from_module`` also takes a 1-D
    ``torch.nn.RMSNorm`` and then keeps its rounding (``casting="torch"``) and ``eps`` (None allowed).
    """

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, *, elementwise_affine: bool = True,
                 casting: str = "llama", device=None, dtype=None):
        super().__init__()
        if casting not in CASTINGS:
            raise ValueError(f"casting={casting!r}: expected one of {CASTINGS}")
        self.hidden_size, self.eps, self.casting = hidden_size, eps, casting
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def variance_epsilon(self) -> float | None:
        """HuggingFace's name for ``eps``."""
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float | None) -> None:
        self.eps = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return inplace_rms_norm(hidden_states, self.weight, self.eps, casting=self.casting)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, casting={self.casting!r}"

    @classmethod
    def from_module(cls, module: nn.Module) -> "InplaceRMSNorm":
        """A new ``InplaceRMSNorm`` holding ``module``'s own ``weight`` Parameter (nothing copied).

        Accepts HuggingFace ``LlamaRMSNorm`` and its verbatim copies, and ``torch.nn.RMSNorm`` over one
        dimension; anything else raises ``TypeError`` rather than silently changing the maths.
        """
        if isinstance(module, nn.RMSNorm):
            if len(module.normalized_shape) != 1:
                raise TypeError(f"InplaceRMSNorm normalises one dimension; got {module.normalized_shape}")
            hidden, eps, casting = module.normalized_shape[0], module.eps, "torch"
        elif isinstance(module, cls):
            hidden, eps, casting = module.hidden_size, module.eps, module.casting
        elif hasattr(module, "variance_epsilon") and _computes_like_llama(module):
            hidden, eps, casting = module.weight.shape[0], module.variance_epsilon, "llama"
        else:
            raise TypeError(f"{type(module).__name__} is neither LlamaRMSNorm-like nor torch.nn.RMSNorm")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.hidden_size, new.eps, new.casting = hidden, eps, casting
        new.register_parameter("weight", module.weight)
        new.train(module.training)
        return new

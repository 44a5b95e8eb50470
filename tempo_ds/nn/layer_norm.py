"""LayerNorm modules that keep their output, not their input, for backward.

``InplaceLayerNorm`` replaces ``torch.nn.LayerNorm``. ``InplaceCohereLayerNorm`` replaces HuggingFace's
``CohereLayerNorm`` (Cohere, Cohere 2), a bias-free LayerNorm computed in float32 from the input cast to
float32 and rounded once::

    mu = mean(x)    xc = x - mu    rstd = rsqrt(mean(xc^2) + eps)    y = (w * xc * rstd).to(x.dtype)

Its weight is ``[N]`` for the hidden-state norms and ``[heads, head_dim]`` for the q/k norms (one weight per
head, each row normalised over ``head_dim``). Since ``xc * rstd`` is the RMSNorm of the centred ``xc``, and
centring keeps nothing for backward, the module runs ``tempo_ds.ops`` as follows:

* ``[N]`` weight, 16-bit input: ``inplace_layer_norm`` (aten's fused LayerNorm computes in float32 and rounds
  once, like HF; autocast off as in HF's module). Keeps the 16-bit output, shared with the next Linear,
  ``rstd`` and the op's side buffer: ``4*M + M*K*e + 8*K`` bytes of its own for ``M`` rows (``e`` = 2,
  ``K = side_columns(N)``, see ``tempo_ds.ops.layer_norm``).
* ``[N]`` weight, float32/float64 input: ``inplace_rms_norm(xc, w, casting="torch")``, HF's operations in
  HF's order, so the forward equals HF's bit for bit (aten's LayerNorm differs in the last bit). Keeps the
  output (shared with the next Linear), ``rstd`` and the side buffer (float32 here).
* ``[heads, head_dim]`` weight (q/k norms): ``w * inplace_rms_norm(xc)`` in float32, rounded once: HF's result
  bit for bit in every dtype. Keeps the float32 ``xc * rstd`` (``4*M*N`` bytes: the op and the product share
  it) and ``rstd`` (no weight, no side buffer); the op takes only a ``[N]`` weight, so a 16-bit output cannot
  be kept here.

HF's module keeps, per element, the float32 centred input twice (it subtracts the mean twice) and the float32
``xc * rstd``: ``12*M*N + 4*M`` bytes.
"""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.layer_norm import inplace_layer_norm
from tempo_ds.ops.rms_norm import inplace_rms_norm

__all__ = ["InplaceLayerNorm", "InplaceCohereLayerNorm"]


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


def _computes_like_cohere(module: nn.Module) -> bool:
    """HuggingFace's ``CohereLayerNorm.forward`` or a verbatim copy (``Cohere2LayerNorm``)."""
    from .rms_norm import computes_like, transformers_class

    return computes_like(module, transformers_class(("cohere", "CohereLayerNorm"), ("cohere2", "Cohere2LayerNorm")))


class InplaceCohereLayerNorm(nn.Module):
    """Cohere's bias-free float32 LayerNorm keeping its output (module docstring: which op runs when).

    Drop-in for HuggingFace's ``CohereLayerNorm(hidden_size, eps)``: ``hidden_size`` an int or a
    ``(heads, head_dim)`` tuple, parameter ``weight``, attribute ``variance_epsilon``.
    """

    def __init__(self, hidden_size: int | tuple[int, ...], eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, eps = self.weight, self.variance_epsilon
        if w.dim() == 1 and x.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(x.device.type, enabled=False):
                return inplace_layer_norm(x, (x.shape[-1],), w, None, eps)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        xc = xf - xf.mean(-1, keepdim=True)
        if w.dim() == 1:
            return inplace_rms_norm(xc, w, eps, casting="torch").to(x.dtype)
        return (w.to(acc) * inplace_rms_norm(xc, None, eps, casting="torch")).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, bias=False"

    @classmethod
    def from_module(cls, module: nn.Module) -> "InplaceCohereLayerNorm":
        """A new ``InplaceCohereLayerNorm`` holding ``module``'s own ``weight`` Parameter. Accepts HuggingFace
        ``CohereLayerNorm`` and its verbatim copies; anything else raises ``TypeError``."""
        if not (isinstance(module, cls) or (hasattr(module, "variance_epsilon") and _computes_like_cohere(module))):
            raise TypeError(f"{type(module).__name__} does not compute like CohereLayerNorm "
                            "(bias-free LayerNorm in float32)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.variance_epsilon = module.variance_epsilon
        new.register_parameter("weight", module.weight)
        new.train(module.training)
        return new

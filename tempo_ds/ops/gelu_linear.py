"""GELU fused into the Linear that follows it: keep the GELU input only, recompute GELU in backward.

Forward (x: [..., in], weight: [out, in], bias: [out] or None)::

    h = GELU(x);  out = h @ weight^T + bias

``transposed=True`` takes the weight as [in, out] (transformers' ``Conv1D``, used by GPT-2) and computes
``h @ weight + bias``; the Parameter is still saved as is, never as a transposed view.

PyTorch's GELU then Linear keep two tensors of x's size for backward: x (for GELU') and h (for
dweight). This Function keeps only x -- plus the weight and bias Parameter objects themselves, which
are not activations -- and in backward recomputes h = GELU(x) for ``dweight = dout^T @ h`` and uses
GELU'(x) for ``dx = (dout @ weight) * GELU'(x)``. Exact: the same operations as autograd's, in the same
precision (under autocast the matmuls run in the autocast dtype and dweight / dbias are cast back to
the parameters' dtype, as autograd does for the autocast copies).

Saved for backward: n * element size of x (n = x.numel()) -- the bytes of in-place GELU's saved output,
without its 1-bit mask -- at the cost of one GELU evaluation in backward.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ._autocast import custom_bwd, custom_fwd
from ._zero import gathered
from .gelu import check_approximate

__all__ = ["gelu_linear", "GeluLinearFunction"]


class GeluLinearFunction(torch.autograd.Function):
    """``F.linear(F.gelu(x), weight, bias)`` saving x [..., in], weight [out, in] (or [in, out] when
    ``transposed``) and bias [out]."""

    @staticmethod
    @custom_fwd
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                transposed: bool = False):
        out = _linear(F.gelu(x, approximate=approximate), weight, bias, transposed)
        ctx.approximate, ctx.transposed = approximate, transposed
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    @custom_bwd
    def backward(ctx, dout: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        dout2 = dout.reshape(-1, dout.shape[-1])
        with gathered(weight, bias):
            if need_w:
                h = F.gelu(x, approximate=ctx.approximate).to(dout.dtype)
                h2 = h.reshape(-1, h.shape[-1])
                dweight = (h2.t() @ dout2 if ctx.transposed else dout2.t() @ h2).to(weight.dtype)
            if need_x:
                w = weight.to(dout.dtype)
                dh = (dout @ (w.t() if ctx.transposed else w)).to(x.dtype)
                dx = torch.ops.aten.gelu_backward(dh, x, approximate=ctx.approximate)
        if need_b:
            dbias = dout2.sum(0).to(bias.dtype)
        return dx, dweight, dbias, None, None


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(h, weight, bias)
    h2 = h.reshape(-1, h.shape[-1])  # as transformers' Conv1D computes it
    out = h2 @ weight if bias is None else torch.addmm(bias, h2, weight)
    return out.view(*h.shape[:-1], weight.shape[-1])


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none", *, transposed: bool = False) -> torch.Tensor:
    """``F.linear(F.gelu(x, approximate), weight, bias)`` keeping only x for backward (GELU recomputed).
    ``transposed``: ``weight`` is [in, out], as in transformers' ``Conv1D``."""
    check_approximate(approximate)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and needs_grad):
        return _linear(F.gelu(x, approximate=approximate), weight, bias, transposed)
    return GeluLinearFunction.apply(x, weight, bias, approximate, transposed)

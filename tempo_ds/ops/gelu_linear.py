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

Custom ops ``tempo_ds::gelu_linear_fwd(x, weight, bias, approximate, transposed, compute_dtype)`` and
``tempo_ds::gelu_linear_bwd(...) -> [dx, dweight, dbias]`` (an empty tensor for a gradient not needed),
with fake implementations, joined by ``register_autograd``. Autocast is resolved in the wrapper into
``compute_dtype`` (``_library.autocast_dtype``); both ops run with autocast off and cast the matmul
operands themselves, as autocast would (float64 stays). The weight and bias reach the op uncast and are
saved as the Parameter objects; a ZeRO-3 partitioned weight is gathered inside the backward op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._library import LIB, autocast_dtype, no_autocast
from ._zero import gathered, held_parameters, hold_parameters
from .gelu import check_approximate

__all__ = ["gelu_linear"]


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(h, weight, bias)
    h2 = h.reshape(-1, h.shape[-1])  # as transformers' Conv1D computes it
    out = h2 @ weight if bias is None else torch.addmm(bias, h2, weight)
    return out.view(*h.shape[:-1], weight.shape[-1])


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """As autocast casts a matmul operand: floating tensors to ``dtype``, float64 left alone."""
    if t is None or dtype is None or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if compute_dtype is None or dtype == torch.float64 else compute_dtype


@torch.library.custom_op(f"{LIB}::gelu_linear_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, transposed: bool,
         compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    with no_autocast(x):
        h = _cast(F.gelu(x, approximate=approximate), compute_dtype)
        return _linear(h, _cast(weight, compute_dtype), _cast(bias, compute_dtype), transposed)


@_fwd.register_fake
def _(x, weight, bias, approximate, transposed, compute_dtype):
    out = weight.shape[-1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out), dtype=_out_dtype(x, weight, compute_dtype))


@torch.library.custom_op(f"{LIB}::gelu_linear_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
         transposed: bool, compute_dtype: Optional[torch.dtype], needs: list[bool]) -> list[torch.Tensor]:
    """[dx, dweight, dbias]; an empty tensor for each gradient ``needs`` leaves out. The operations and
    roundings of autograd's GELU then Linear, with the matmuls in ``compute_dtype`` under autocast."""
    need_x, need_w, need_b = needs
    dx, dweight, dbias = (dout.new_empty(0) for _ in range(3))
    dout2 = dout.reshape(-1, dout.shape[-1])
    with no_autocast(dout), gathered(weight, bias):
        if need_w:
            h = _cast(F.gelu(x, approximate=approximate), compute_dtype).to(dout.dtype)
            h2 = h.reshape(-1, h.shape[-1])
            dweight = (h2.t() @ dout2 if transposed else dout2.t() @ h2).to(weight.dtype)
        if need_x:
            w = _cast(weight, compute_dtype).to(dout.dtype)
            dh = (dout @ (w.t() if transposed else w)).to(x.dtype)
            dx = torch.ops.aten.gelu_backward(dh, x, approximate=approximate)
        if need_b:
            # CUDA autocast sums in float32 (``sum`` is on its float32 list)
            wide = compute_dtype is not None and dout.is_cuda and dout.dtype != torch.float64
            dbias = dout2.sum(0, dtype=torch.float32 if wide else None).to(bias.dtype)
    return [dx, dweight, dbias]


@_bwd.register_fake
def _(dout, x, weight, bias, approximate, transposed, compute_dtype, needs):
    need_x, need_w, need_b = needs
    return [x.new_empty(x.shape) if need_x else dout.new_empty(0),
            weight.new_empty(weight.shape) if need_w else dout.new_empty(0),
            bias.new_empty(bias.shape) if need_b and bias is not None else dout.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, transposed, compute_dtype = inputs
    ctx.approximate, ctx.transposed, ctx.compute_dtype = approximate, transposed, compute_dtype
    ctx.save_for_backward(x, weight, bias)  # x only: weight and bias are the Parameter objects
    hold_parameters(ctx, weight, bias)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    weight, bias = held_parameters(ctx, weight, bias)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    dx, dweight, dbias = _bwd(dout, x, weight, bias, ctx.approximate, ctx.transposed, ctx.compute_dtype,
                              [need_x, need_w, need_b])
    return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None, None, None, None)


torch.library.register_autograd(f"{LIB}::gelu_linear_fwd", _backward, setup_context=_setup_context)


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none", *, transposed: bool = False) -> torch.Tensor:
    """``F.linear(F.gelu(x, approximate), weight, bias)`` keeping only x for backward (GELU recomputed).
    ``transposed``: ``weight`` is [in, out], as in transformers' ``Conv1D``."""
    check_approximate(approximate)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and needs_grad):
        return _linear(F.gelu(x, approximate=approximate), weight, bias, transposed)
    return _fwd(x, weight, bias, approximate, transposed, autocast_dtype(x))

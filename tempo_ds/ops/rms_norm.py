"""In-place RMSNorm (LLaMA family): the backward starts from the output ``y``, not the input ``x``.

Forward over the last dimension (``N`` elements), statistics in float32 (float64 for float64 input)::

    rstd = 1 / sqrt(mean(x^2) + eps)        xhat = x * rstd        y = w * xhat

with HuggingFace ``LlamaRMSNorm``'s rounding by default (``casting="llama"``): ``xhat`` is rounded to
the input dtype, then multiplied by ``w``, so ``y`` has the promoted dtype of ``x`` and ``w`` (bfloat16 x
with a float32 weight gives a float32 ``y``). ``casting="torch"`` rounds once at the end to the input
dtype, as ``torch.nn.functional.rms_norm`` does; ``eps=None`` then means torch's default
``torch.finfo(x.dtype).eps``.

Backward, with ``gw = g * w``::

    dx = rstd * (gw - xhat * mean(gw * xhat))        dw = sum_rows g * xhat

HuggingFace's eager module keeps ``x``, ``x * rstd`` and ``rstd`` (two activations); this op keeps ``y``,
``rstd`` and rebuilds ``xhat = y / w``. As for LayerNorm (``tempo_ds.ops.layer_norm``, whose module
docstring derives the rule and the scheme), a column whose weight is below the smallest normal number of
``y``'s dtype, NaN, or large enough for ``y`` to overflow cannot be rebuilt; with no host sync and a saved
set fixed by shapes, the op always keeps a side buffer: ``xhat`` (rounded to x's dtype, which is HF's
``xhat`` in the "llama" casting) of the ``K = side_columns(N)`` worst columns, ranked on the device, and
backward replaces those of them that break the rule. Exact with up to ``K`` bad columns (``K = max(8,
N/64)``, at most ``N``); ``keep_input=True`` keeps ``x`` instead, exact for any weight. Bytes kept for
``M`` rows: ``M*N*y.element_size() + 4*M + M*K*x.element_size() + 8*K``, and the ``M*N`` part is shared
with the Linear layers that read ``y`` next.

Accuracy (max abs error against float64 maths, 2048 x 1024). ``casting="llama"``: the forward equals
HF's bit for bit; as a ratio to HF's own error, float32 dx 1.07, dw 0.85; bfloat16 dx 0.83, dw 0.90;
float16 dx 0.66, dw 0.99 (HF's weight gradient also uses the rounded ``xhat``). ``casting="torch"``:
``torch.nn.functional.rms_norm`` differentiates from ``x``, so the weight gradient rebuilt from the
rounded ``y`` errs by up to about one more unit roundoff of ``|dw|``: 1.45x PyTorch's error in bfloat16
here, up to 3x on small shapes (13 x 37); dx stays within 1.5x. Float64 input is computed in float64
(HF's module computes in float32 even then).

On the Triton path the kernels write and patch the side buffer themselves (``tempo_ds.kernels.layer_norm``);
the backward starts from ``y`` with no ``[M, N]`` temporary besides ``dx``. On the PyTorch path the backward
runs aten's fused LayerNorm backward with mean 0 and adds back the
``rstd * mean(gw)`` term that LayerNorm subtracts (RMSNorm has no mean to differentiate), because CPU
PyTorch has no RMSNorm backward kernel.

The ops: ``tempo_ds::inplace_rms_norm_fwd`` and ``_bwd``, triton ops joined by ``register_autograd``
(``tempo_ds.ops._library``): on CUDA torch.compile sees the column ranking and the launches of the LayerNorm
kernels (``rms=True``), elsewhere they call the opaque ``_fwd_opaque`` / ``_bwd_opaque`` (HF's operations,
numerics pinned); nothing reads a device value on the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tempo_ds.ops._library import LIB, kernels_visible, no_autocast, triton_op
from tempo_ds.ops._zero import gathered, held_parameters, hold_parameters
from tempo_ds.ops.layer_norm import (acc_dtype, column_scores, fits_kernel, patch_xhat, rebuild_xhat, side_buffer,
                                     side_columns, side_columns_of)

__all__ = ["inplace_rms_norm"]

CASTINGS = ("llama", "torch")


def _triton_forward(x, weight, eps: float, casting: str, out_dtype: torch.dtype, k: int):
    """``(y, rstd, side, idx)`` from the LayerNorm kernel with ``rms=True``, which writes the side buffer."""
    from tempo_ds.kernels import layer_norm as kernel

    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    side, idx = side_columns_of(x2, weight, None, out_dtype, k)
    y2, _, rstd = kernel.norm_forward(x2.contiguous(), weight, None, eps, rms=True, out_dtype=out_dtype,
                                      cast_before_weight=casting == "llama", side=side, idx=idx)
    return y2.view(x.shape), rstd, side, idx


@torch.library.custom_op(f"{LIB}::inplace_rms_norm_fwd_opaque", mutates_args=())
def _fwd_opaque(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, casting: str, out_dtype: torch.dtype,
                save: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_fwd`` by HF's operations (or the interpreted kernel), opaque to torch.compile."""
    n = x.shape[-1]
    k = side_columns(n, weight is not None) if save == "output" else 0
    with no_autocast(x):
        if fits_kernel(x, n):
            return _triton_forward(x, weight, eps, casting, out_dtype, k)
        x2 = x.reshape(-1, n)
        acc = acc_dtype(x.dtype)
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if casting == "llama":  # HuggingFace LlamaRMSNorm, operation for operation
            xhat = (xf * rstd).to(x.dtype)
            y = weight * xhat if weight is not None else xhat
        else:
            y = xf * rstd
            y = (y * weight.to(acc) if weight is not None else y).to(x.dtype)
        y = y.contiguous()
        rstd = rstd.reshape(-1)
        side, idx = side_buffer(x2, weight, None, out_dtype, k, lambda cols: cols.to(rstd.dtype) * rstd[:, None])
        return y, rstd, side, idx


@_fwd_opaque.register_fake
def _(x, weight, eps, casting, out_dtype, save):
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])
    k = side_columns(n, weight is not None) if save == "output" else 0
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty((m,), dtype=acc_dtype(x.dtype)), x.new_empty((m, k)),
            x.new_empty((k,), dtype=torch.int64))


def _kernels():
    from tempo_ds.kernels import layer_norm as kernel

    return kernel._norm_fwd_kernel, kernel._norm_bwd_kernel


@triton_op(f"{LIB}::inplace_rms_norm_fwd", kernels=_kernels)
def _fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, casting: str, out_dtype: torch.dtype,
         save: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, rstd, side, idx)``: y contiguous [*, N] in ``out_dtype``; rstd [M]; side [M, K] (x's dtype) and
    idx [K] int64 only when ``save == "output"`` (else K = 0). On CUDA the column ranking and the kernel launch
    themselves (visible to torch.compile), elsewhere the opaque op."""
    n = x.shape[-1]
    if kernels_visible(x) and fits_kernel(x, n):
        k = side_columns(n, weight is not None) if save == "output" else 0
        with no_autocast(x):
            return _triton_forward(x, weight, eps, casting, out_dtype, k)
    return _fwd_opaque(x, weight, eps, casting, out_dtype, save)


def _triton_backward(grad, src, rstd, side, idx, weight, from_output: bool, x_dtype: torch.dtype, needs):
    """[dx, dweight] from the LayerNorm kernel with ``rms=True``, which patches the bad kept columns itself."""
    from tempo_ds.kernels import layer_norm as kernel

    need_x, need_w = needs
    n = src.shape[-1]
    slot = None
    if from_output and idx.numel():
        slot = kernel.side_slots(idx, n, column_scores(weight, None, src.dtype, n)[1].index_select(0, idx))
    dx, dw, _ = kernel.norm_backward(grad.reshape(-1, n), src.reshape(-1, n).contiguous(), weight, None, None,
                                     rstd, rms=True, from_output=from_output, x_dtype=x_dtype,
                                     need_weight_grads=need_w, side=side, slot=slot)
    return [dx.view(src.shape) if need_x else grad.new_empty(0),
            dw.to(weight.dtype) if need_w else grad.new_empty(0)]


@torch.library.custom_op(f"{LIB}::inplace_rms_norm_bwd_opaque", mutates_args=())
def _bwd_opaque(grad: torch.Tensor, src: torch.Tensor, rstd: torch.Tensor, side: torch.Tensor, idx: torch.Tensor,
                weight: Optional[torch.Tensor], from_output: bool, x_dtype: torch.dtype,
                needs: list[bool]) -> list[torch.Tensor]:
    """``_bwd`` by PyTorch operations (or the interpreted kernel), opaque to torch.compile."""
    need_x, need_w = needs
    n = src.shape[-1]
    acc = rstd.dtype
    with no_autocast(grad), gathered(weight):
        if fits_kernel(src, n):
            return _triton_backward(grad, src, rstd, side, idx, weight, from_output, x_dtype, needs)
        w = None if weight is None else weight.to(acc)
        if from_output:
            xhat = rebuild_xhat(src.reshape(-1, n), w, None, acc)
            if idx.numel():
                patch_xhat(xhat, side, idx, column_scores(weight, None, src.dtype, n)[1])
        else:
            xhat = src.reshape(-1, n).to(acc) * rstd[:, None]
        g = grad.reshape(-1, n).to(acc)
        # summed over rows like autograd sums HF's broadcast product (aten's LayerNorm backward
        # accumulates rows in a single float32 sum: 5x the error at 2048 rows)
        dw = (g * xhat).sum(0) if need_w else None
        dx = None
        if need_x:
            r = rstd[:, None]
            # aten's backward wants the input; with mean 0 any x with x * rstd = xhat will do
            dx, _, _ = torch.ops.aten.native_layer_norm_backward(
                g, xhat.div_(r), (n,), torch.zeros_like(r), r, w, None, [True, False, False])
            mean_gw = (g @ w if w is not None else g.sum(-1)).unsqueeze(-1).div_(n)
            dx = torch.addcmul(dx, r, mean_gw)
        return [dx.view(src.shape).to(x_dtype) if need_x else grad.new_empty(0),
                dw.to(weight.dtype) if need_w else grad.new_empty(0)]


@_bwd_opaque.register_fake
def _(grad, src, rstd, side, idx, weight, from_output, x_dtype, needs):
    need_x, need_w = needs
    return [src.new_empty(src.shape, dtype=x_dtype) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad.new_empty(0)]


@triton_op(f"{LIB}::inplace_rms_norm_bwd", kernels=_kernels)
def _bwd(grad: torch.Tensor, src: torch.Tensor, rstd: torch.Tensor, side: torch.Tensor, idx: torch.Tensor,
         weight: Optional[torch.Tensor], from_output: bool, x_dtype: torch.dtype,
         needs: list[bool]) -> list[torch.Tensor]:
    """[dx, dweight] (an empty tensor for one ``needs`` leaves out); ``src`` is ``y`` when ``from_output``,
    else ``x``. On CUDA the kernel launch itself, elsewhere the opaque op."""
    if kernels_visible(src) and fits_kernel(src, src.shape[-1]):
        with no_autocast(grad), gathered(weight):
            return _triton_backward(grad, src, rstd, side, idx, weight, from_output, x_dtype, needs)
    return _bwd_opaque(grad, src, rstd, side, idx, weight, from_output, x_dtype, needs)


def _setup_context(ctx, inputs, output):
    x, weight, eps, casting, out_dtype, save = inputs
    y, rstd, side, idx = output
    ctx.from_output, ctx.x_dtype = save == "output", x.dtype
    if save == "output":  # y (shared with the next Linears), rstd, the side buffer; the Parameter itself
        ctx.save_for_backward(y, rstd, side, idx, weight)
    elif save == "input":
        ctx.save_for_backward(x, rstd, None, None, weight)
    hold_parameters(ctx, weight)


def _backward(ctx, grad, *_):
    src, rstd, side, idx, weight = ctx.saved_tensors
    weight, = held_parameters(ctx, weight)
    need_x, need_w = ctx.needs_input_grad[:2]
    need_w = need_w and weight is not None
    if side is None:
        side, idx = rstd.new_empty((0, 0)), torch.empty(0, dtype=torch.int64, device=rstd.device)
    dx, dw = _bwd(grad, src, rstd, side, idx, weight, ctx.from_output, ctx.x_dtype, [need_x, need_w])
    return dx if need_x else None, dw if need_w else None, None, None, None, None


torch.library.register_autograd(f"{LIB}::inplace_rms_norm_fwd", _backward, setup_context=_setup_context)


def inplace_rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = 1e-6, *,
                     casting: str = "llama", keep_input: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension that keeps its output (not its input) for backward.

    ``casting="llama"`` computes exactly what HuggingFace's ``LlamaRMSNorm`` does (result in the promoted
    dtype of ``x`` and ``weight``); ``casting="torch"`` what ``torch.nn.functional.rms_norm`` does (result
    in ``x``'s dtype; ``eps=None`` means ``torch.finfo(x.dtype).eps``). ``weight`` is 1-D or None. Keeps
    ``y``, ``rstd`` and the side buffer (module docstring); ``keep_input=True`` keeps ``x`` and ``rstd``
    instead, exact for any weight.
    """
    if casting not in CASTINGS:
        raise ValueError(f"casting={casting!r}: expected one of {CASTINGS}")
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the last dimension of x "
                         f"{tuple(x.shape)}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if casting == "llama" and weight is not None else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    save = "none" if not needs_grad else "input" if keep_input else "output"
    return _fwd(x, weight, float(eps), casting, out_dtype, save)[0]

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

HuggingFace's eager module keeps ``x``, ``x * rstd`` and ``rstd`` (two activations); this op keeps ``y`` and
``rstd`` and rebuilds ``xhat = y / w``: ``M*N*y.element_size() + 4*M`` bytes for ``M`` rows, and the
``M*N`` part is shared with the Linear layers that read ``y`` next. As for LayerNorm
(``tempo_ds.ops.layer_norm``, whose module docstring derives the rule), a call whose weight has an entry
below the smallest normal number of ``y``'s dtype, or one large enough for ``y`` to overflow, keeps
``x`` instead; the decision depends only on the weight, so a checkpoint recompute keeps the same
tensors.

Accuracy (max abs error against float64 maths, 2048 x 1024). ``casting="llama"``: the forward equals
HF's bit for bit; as a ratio to HF's own error, float32 dx 1.07, dw 0.85; bfloat16 dx 0.83, dw 0.90;
float16 dx 0.66, dw 0.99 (HF's weight gradient also uses the rounded ``xhat``). ``casting="torch"``:
``torch.nn.functional.rms_norm`` differentiates from ``x``, so the weight gradient rebuilt from the
rounded ``y`` errs by up to about one more unit roundoff of ``|dw|``: 1.45x PyTorch's error in bfloat16
here, up to 3x on small shapes (13 x 37); dx stays within 1.5x. Float64 input is computed in float64
(HF's module computes in float32 even then).

On the PyTorch path the backward runs aten's fused LayerNorm backward with mean 0 and adds back the
``rstd * mean(gw)`` term that LayerNorm subtracts (RMSNorm has no mean to differentiate), because CPU
PyTorch has no RMSNorm backward kernel.
"""
from __future__ import annotations

import torch

from tempo_ds.ops._autocast import custom_bwd, custom_fwd
from tempo_ds.ops._zero import gathered
from tempo_ds.ops.layer_norm import acc_dtype, fits_kernel, output_is_invertible, rebuild_xhat

__all__ = ["inplace_rms_norm", "InplaceRMSNormFunction"]

CASTINGS = ("llama", "torch")


class InplaceRMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension that keeps ``y`` and ``rstd`` for backward.

    Shapes: ``x`` [*, N]; ``weight`` [N] or None; returns ``y`` [*, N] in ``out_dtype``. ``save`` is
    ``"output"`` (keep ``y`` and ``rstd``: [*, 1] float32 on the PyTorch path, [M] on the Triton path),
    ``"input"`` (keep ``x`` and ``rstd``) or ``"none"``.
    """

    @staticmethod
    @custom_fwd
    def forward(ctx, x, weight, eps, casting, out_dtype, save):
        n = x.shape[-1]
        ctx.save, ctx.triton, ctx.x_dtype = save, fits_kernel(x, n), x.dtype
        if ctx.triton:
            from tempo_ds.kernels import layer_norm as kernel

            y2, _, rstd = kernel.norm_forward(x.reshape(-1, n).contiguous(), weight, None, eps, rms=True,
                                              out_dtype=out_dtype, cast_before_weight=casting == "llama")
            y = y2.view(x.shape)
        else:
            acc = acc_dtype(x.dtype)
            xf = x.to(acc)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            if casting == "llama":  # HuggingFace LlamaRMSNorm, operation for operation
                xhat = (xf * rstd).to(x.dtype)
                y = weight * xhat if weight is not None else xhat
            else:
                y = xf * rstd
                y = (y * weight.to(acc) if weight is not None else y).to(x.dtype)
        if save == "output":
            ctx.save_for_backward(y, rstd, weight)
        elif save == "input":
            ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    @custom_bwd
    def backward(ctx, grad):
        src, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        from_output = ctx.save == "output"
        n = src.shape[-1]
        with gathered(weight):
            if ctx.triton:
                from tempo_ds.kernels import layer_norm as kernel

                dx, dw, _ = kernel.norm_backward(grad.reshape(-1, n), src.reshape(-1, n), weight, None, None, rstd,
                                                 rms=True, from_output=from_output, x_dtype=ctx.x_dtype,
                                                 need_weight_grads=need_w)
                dx = dx.view(src.shape)
            else:
                acc = rstd.dtype
                w, g = None if weight is None else weight.to(acc), grad.to(acc)
                xhat = rebuild_xhat(src, w, None, acc) if from_output else src.to(acc) * rstd
                # summed over rows like autograd sums HF's broadcast product (aten's LayerNorm backward
                # accumulates rows in a single float32 sum: 5x the error at 2048 rows)
                dw = (g * xhat).sum(tuple(range(g.dim() - 1))) if need_w else None
                if need_x:
                    # aten's backward wants the input; with mean 0 any x with x * rstd = xhat will do
                    dx, _, _ = torch.ops.aten.native_layer_norm_backward(
                        g, xhat.div_(rstd), (n,), torch.zeros_like(rstd), rstd, w, None, [True, False, False])
                    mean_gw = (g @ w if w is not None else g.sum(-1)).unsqueeze(-1).div_(n)
                    dx = torch.addcmul(dx, rstd, mean_gw)
        return (dx.to(ctx.x_dtype) if need_x else None, dw.to(weight.dtype) if need_w else None,
                None, None, None, None)


def inplace_rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = 1e-6, *,
                     casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dimension that keeps its output (not its input) for backward.

    ``casting="llama"`` computes exactly what HuggingFace's ``LlamaRMSNorm`` does (result in the promoted
    dtype of ``x`` and ``weight``); ``casting="torch"`` what ``torch.nn.functional.rms_norm`` does (result
    in ``x``'s dtype; ``eps=None`` means ``torch.finfo(x.dtype).eps``). ``weight`` is 1-D or None.
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
    if not needs_grad:
        save = "none"
    elif output_is_invertible(weight, None, out_dtype, x.shape[-1]):
        save = "output"
    else:
        save = "input"
    return InplaceRMSNormFunction.apply(x, weight, eps, casting, out_dtype, save)

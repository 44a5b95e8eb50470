"""In-place LayerNorm: the backward starts from the output ``y``, which the next Linear keeps anyway.

Forward (statistics in float32 for float16/bfloat16/float32 inputs, float64 for float64), per row of the
``N = prod(normalized_shape)`` trailing elements::

    mu = mean(x)    rstd = 1 / sqrt(mean((x - mu)^2) + eps)    xhat = (x - mu) * rstd    y = xhat * w + b

Backward, with ``gw = g * w``::

    dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))    dw = sum_rows g * xhat    db = sum_rows g

PyTorch keeps ``x``, ``mu`` and ``rstd``. This op keeps ``y`` and ``rstd`` and rebuilds
``xhat = (y - b) / w`` (Tempo, Andoorveedu et al. 2022). Bytes kept for backward, for ``M`` rows:
``M*N*y.element_size() + 4*M`` - and the ``M*N`` part is shared with the Linear that follows, so the
LayerNorm costs only its ``rstd``. (The weight and bias are kept too, as Parameter objects: no bytes.)

When the output does not determine ``xhat``
-------------------------------------------
``y`` is rounded to its dtype: ``|dy| <= u*|y|`` (``u`` = unit roundoff) down to the subnormal range,
where the absolute error is at most ``u*tiny`` (``tiny`` = smallest normal number). So the rebuilt value
errs by::

    |d xhat_j| <= u*|xhat_j| + u*|b_j|/|w_j| + u*tiny/|w_j|

The first term is the error of rounding ``xhat`` itself, the floor any saved low-precision activation
has. The other two are amplification: ``w_j = 0`` gives 0/0 (Tempo's released code turns every
gradient of the row into NaN), and a ``w_j`` small next to ``b_j`` cancels ``y_j - b_j`` (Tempo's lost
accuracy for small weights in float16). We keep the output only when, for every ``j``::

    |w_j| >= tiny        and        |b_j| <= BIAS_RATIO_LIMIT * |w_j|        (BIAS_RATIO_LIMIT = 1)

and no ``|y_j|`` can overflow (``|w_j|*sqrt(N) + |b_j| <= max``, since ``|xhat| <= sqrt(N)``); otherwise
this call keeps ``x`` and ``mu`` like PyTorch and its gradients are PyTorch's. The bound is relative to
``b_j``, not to ``max|w|``: with ``b = 0`` any non-zero normal ``w_j`` divides out exactly (``y_j/w_j``
errs by ``u``), while ``|b_j|/|w_j|`` of 2 already doubles the error. Measured against the correctly
rounded float16/bfloat16 gradients (4096 rows x 256, ``w`` in [0.5, 1.5]): at ``|b|/|w| = 1`` the
weight gradient errs 1.0-1.6x as much, at 2 up to 2.0x, at 4 about 3x, at 8 about 7x; the input
gradient stays within 1.3x throughout (its ``xhat`` term is multiplied by ``mean(gw*xhat)``, and the
``y - b`` error cancels in ``gw*xhat = g*(y - b)``). Limit 1 keeps every gradient within 2x.

Accuracy. Within that rule the one error this op adds is the rebuilt ``xhat``'s, at most about one unit
roundoff per element; summed over rows it reaches the weight gradient as about one more unit roundoff
of ``|dw|``. Max abs error against float64, as a ratio to PyTorch's CPU op (2048 x 1024, weights in
+-[0.5, 1.5], biases in [-0.5, 0.5]): float32 y 1.00, dx 0.94, dw 1.02, db 1.00; float16 dx 0.46, dw
0.04; bfloat16 dx 0.47, dw 0.06 (PyTorch's CPU kernel rounds its statistics to 16 bits). As a ratio to
the correctly rounded result instead, float16/bfloat16 dx is 1.01 and dw 1.02-1.10 at that size, and dw
up to 3x on small shapes (13-512 rows x 37), where a correctly rounded result can be luckily exact.

The decision reads only ``w``, ``b``, the output dtype and ``N``. None of them changes between a forward
and its checkpoint recompute (the optimizer steps after backward), so both keep the same tensors
(DESIGN.md section 5, rule 9). It costs one tiny reduction over ``N`` and one device-to-host sync per call
that will be differentiated; under ``no_grad`` (e.g. a reentrant checkpoint's first pass) nothing is
checked and nothing is saved.

Autocast: CUDA autocast runs ``layer_norm`` in float32, CPU autocast leaves it alone; this op does the
same, so it returns the dtype ``torch.nn.functional.layer_norm`` would. As with any op that keeps its
output (``torch.sigmoid``, ``torch.exp``), modifying ``y`` in place before backward makes autograd raise.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from tempo_ds.ops._autocast import custom_bwd, custom_fwd
from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops._zero import gathered

__all__ = ["inplace_layer_norm", "InplaceLayerNormFunction", "output_is_invertible", "BIAS_RATIO_LIMIT"]

BIAS_RATIO_LIMIT = 1.0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and backward are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_is_invertible(weight: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                         n: int) -> bool:
    """Whether ``xhat = (y - b) / w`` can be rebuilt from an output of ``out_dtype`` about as accurately
    as rounding ``xhat`` itself (module docstring): every ``|w_j| >= tiny``, ``|b_j| <= |w_j|``, and
    ``|w_j|*sqrt(n) + |b_j|`` below the dtype's maximum. NaN weights count as not invertible."""
    if weight is None:
        return True
    info = torch.finfo(out_dtype)
    w = weight.detach().abs().to(acc_dtype(out_dtype))
    b = bias.detach().abs().to(w.dtype) if bias is not None else torch.zeros_like(w)
    ok = (w >= info.tiny) & (b <= BIAS_RATIO_LIMIT * w) & (w * math.sqrt(n) + b <= info.max)
    return bool(ok.all())


def fits_kernel(x: torch.Tensor, n: int) -> bool:
    """Whether rows of ``n`` elements of ``x`` go to the Triton kernel (``use_triton`` and a row fits a block)."""
    if not use_triton(x) or x.dtype == torch.float64:
        return False
    from tempo_ds.kernels import layer_norm as kernel

    return n <= kernel.MAX_FUSED_N


def _as_acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _torch_forward(x, shape, weight, bias, eps):
    """``(y, mean, rstd)`` from aten's fused kernel, statistics in ``acc_dtype(x.dtype)``."""
    acc = acc_dtype(x.dtype)
    w, b = _as_acc(weight, acc), _as_acc(bias, acc)
    if x.dtype == acc:
        return torch.native_layer_norm(x, shape, w, b, eps)
    if x.device.type == "cpu":
        # the CPU kernel for 16-bit input with a float32 weight returns float32 statistics (with a 16-bit
        # weight, or none, it rounds them to 16 bits)
        w = w if w is not None else torch.ones(shape, dtype=acc, device=x.device)
        return torch.native_layer_norm(x, shape, w, b, eps)
    y, mean, rstd = torch.native_layer_norm(x.to(acc), shape, w, b, eps)
    return y.to(x.dtype), mean, rstd


def rebuild_xhat(y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """``(y - b) / w`` in ``acc`` (``w``, ``b`` already in it), always a new tensor. ``y`` is converted
    first: on CPU, arithmetic mixing 16-bit and float32 tensors is tens of times slower than either."""
    y = y.to(acc)
    if w is None:
        return y.clone() if b is None else y - b
    return y / w if b is None else torch.addcmul(-b / w, y, w.reciprocal())


class InplaceLayerNormFunction(torch.autograd.Function):
    """LayerNorm over the trailing ``normalized_shape`` that keeps ``y`` and ``rstd`` for backward.

    Shapes: ``x`` [*, *normalized_shape]; ``weight``, ``bias`` normalized_shape or None; returns ``y`` of
    x's shape and dtype. ``save`` is ``"output"`` (keep ``y`` and ``rstd``: [*, 1...] float32 on the
    PyTorch path, [M] on the Triton path), ``"input"`` (keep ``x``, ``mu`` and ``rstd``) or ``"none"``.
    """

    @staticmethod
    @custom_fwd
    def forward(ctx, x, weight, bias, normalized_shape, eps, save):
        n = math.prod(normalized_shape)
        ctx.normalized_shape, ctx.save, ctx.triton = tuple(normalized_shape), save, fits_kernel(x, n)
        ctx.x_dtype = x.dtype
        if ctx.triton:
            from tempo_ds.kernels import layer_norm as kernel

            y2, mean, rstd = kernel.norm_forward(
                x.reshape(-1, n).contiguous(), None if weight is None else weight.reshape(n),
                None if bias is None else bias.reshape(n), eps, rms=False, out_dtype=x.dtype,
                store_mean=save == "input")
            y = y2.view(x.shape)
        else:
            y, mean, rstd = _torch_forward(x, normalized_shape, weight, bias, eps)
        if save == "output":
            ctx.save_for_backward(y, rstd, weight, bias)
        elif save == "input":
            ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y

    @staticmethod
    @custom_bwd
    def backward(ctx, grad):
        if ctx.save == "output":
            src, rstd, weight, bias = ctx.saved_tensors
            mean = None
        else:
            src, mean, rstd, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        shape, from_output = ctx.normalized_shape, ctx.save == "output"
        with gathered(weight, bias):
            if ctx.triton:
                from tempo_ds.kernels import layer_norm as kernel

                n = math.prod(shape)
                dx, dw, db = kernel.norm_backward(
                    grad.reshape(-1, n), src.reshape(-1, n), None if weight is None else weight.reshape(n),
                    None if bias is None else bias.reshape(n), mean, rstd, rms=False, from_output=from_output,
                    x_dtype=ctx.x_dtype, need_weight_grads=need_w or need_b)
                dx = dx.view(src.shape)
                dw = None if dw is None else dw.view(shape)
                db = None if db is None else db.view(shape)
            else:
                acc = rstd.dtype
                w, b = _as_acc(weight, acc), _as_acc(bias, acc)
                if from_output:
                    # aten's backward wants the input; with mean 0 any x with x * rstd = xhat will do
                    src, mean = rebuild_xhat(src, w, b, acc).div_(rstd), torch.zeros_like(rstd)
                dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                    grad.to(acc), src.to(acc), shape, mean, rstd, w, b, [need_x, need_w, need_b])
        return (dx.to(ctx.x_dtype) if need_x else None,
                dw.to(weight.dtype) if need_w else None,
                db.to(bias.dtype) if need_b else None, None, None, None)


def inplace_layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` that keeps its output (not its input) for backward.

    Same arguments and result. Falls back to keeping the input for this call when ``weight`` has zero or
    tiny entries, or entries small next to ``bias`` (see the module docstring), so gradients stay exact.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.float()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad:
        save = "none"
    elif output_is_invertible(weight, bias, x.dtype, math.prod(shape)):
        save = "output"
    else:
        save = "input"
    return InplaceLayerNormFunction.apply(x, weight, bias, shape, eps, save)

"""LayerNorm that keeps its input (as ``F.layer_norm`` does) but computes every gradient in float32.

Forward, per row of the ``N`` trailing elements (statistics in float32, float64 for float64 input)::

    mu = mean(x)    rstd = 1 / sqrt(mean((x - mu)^2) + eps)    y = (x - mu) * rstd * w + b

Backward, with ``xhat = (x - mu) * rstd`` and ``gw = g * w``::

    dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))    dw = sum_rows g * xhat    db = sum_rows g

Saved for backward: ``x`` itself (the bytes ``F.layer_norm`` keeps), ``mu`` and ``rstd`` as float32 per row
(8 bytes a row, as PyTorch's CUDA kernel keeps them), and the weight and bias Parameter objects. The
difference from ``F.layer_norm`` is precision only: PyTorch's CPU backward for 16-bit inputs sums the
weight and bias gradients over rows in 16 bits (15-40x the error of a float32 sum); here the backward runs
on float32 copies and rounds each gradient once. Float32 inputs give exactly ``F.layer_norm``'s results.

This is the path for norms that must keep their input: ``TempoTransformerLayer`` with
``normalize_invertible`` off.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tempo_ds.ops._zero import gathered

__all__ = ["layer_norm_fp32_grads"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


@torch.library.custom_op("tempo_ds::layer_norm_fp32_fwd", mutates_args=())
def _forward(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc(x.dtype)
    y, mean, rstd = torch.ops.aten.native_layer_norm(x.to(acc), normalized_shape, _up(weight, acc), _up(bias, acc), eps)
    return y.to(x.dtype), mean, rstd


@_forward.register_fake
def _(x, normalized_shape, weight, bias, eps):
    stats = x.shape[:x.dim() - len(normalized_shape)] + (1,) * len(normalized_shape)
    acc = _acc(x.dtype)
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


@torch.library.custom_op("tempo_ds::layer_norm_fp32_bwd", mutates_args=())
def _backward(grad: torch.Tensor, x: torch.Tensor, normalized_shape: Sequence[int], mean: torch.Tensor,
              rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); an entry not asked for by ``mask`` (or whose parameter is None) is an empty tensor."""
    acc = mean.dtype
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad.to(acc), x.to(acc), normalized_shape, mean, rstd,
                                                           _up(weight, acc), _up(bias, acc), list(mask))
    return (x.new_empty(0) if dx is None else dx.to(x.dtype), x.new_empty(0) if dw is None else dw.to(weight.dtype),
            x.new_empty(0) if db is None else db.to(bias.dtype))


@_backward.register_fake
def _(grad, x, normalized_shape, mean, rstd, weight, bias, mask):
    return (torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(weight) if mask[1] else x.new_empty(0),
            torch.empty_like(bias) if mask[2] else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _autograd_backward(ctx, grad, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, _, need_w, need_b, _ = ctx.needs_input_grad
    mask = [need_x, need_w and weight is not None, need_b and bias is not None]
    with gathered(weight, bias):
        dx, dw, db = _backward(grad, x, ctx.normalized_shape, mean, rstd, weight, bias, mask)
    return (dx if mask[0] else None), None, (dw if mask[1] else None), (db if mask[2] else None), None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def layer_norm_fp32_grads(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` keeping the same input for backward, with float32 statistics and gradients (module
    docstring). Under CUDA autocast the result is float32, as autocast runs ``layer_norm``."""
    normalized_shape = [int(n) for n in ((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)]
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != tuple(normalized_shape):
        raise ValueError(f"normalized_shape {tuple(normalized_shape)} does not match the trailing dimensions of x "
                         f"{tuple(x.shape)}")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.float()
    return _forward(x, normalized_shape, weight, bias, float(eps))[0]

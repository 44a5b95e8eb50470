"""Seed dropout: dropout that keeps no mask for backward.

Forward::

    seed      = draw_seed()                                 one int from the global CPU generator
    keep[n]   = _rng.uniform_u32(seed, n) >= floor(p 2^32)  n = row-major (logical) index of the element
    y         = x * keep / (1 - p)

Backward::

    dx        = dy * keep / (1 - p)                         keep regenerated from the seed

Saved for backward: nothing (the seed and p are Python numbers on ``ctx``). ``F.dropout`` keeps a mask
of the input's size (one byte per element on CUDA, one input-dtype element on CPU).

The mask depends only on the seed and the element's logical index, never on strides or the device, so
the PyTorch path here and the Triton kernel (``tempo_ds.kernels.dropout``) build the same mask bit for
bit, and every checkpoint flavour, which restores the global RNG before recomputing, draws the same seed
again (DESIGN.md section 5, rule 2). Masks are regenerated in chunks, which bounds the int64 temporaries of
the hash: ``_rng.CHUNK`` elements on accelerators, ``CPU_CHUNK`` on the CPU, where temporaries that stay in
cache make the hash ~14x faster than 4M-element chunks (9 vs 130 ns per element, measured on 1 thread).

Like ``F.dropout``, a dropped element is multiplied by zero, so an inf or nan there still turns into nan
(an fp16 loss scaler sees the overflow either way).
"""
from __future__ import annotations

import torch

from tempo_ds.ops import _rng
from tempo_ds.ops._autocast import custom_bwd, custom_fwd
from tempo_ds.ops._dispatch import use_triton

__all__ = ["seed_dropout", "fill_keep_mask"]

CPU_CHUNK = 1 << 15


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")


def _scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _chunk(device: torch.device) -> int:
    return CPU_CHUNK if device.type == "cpu" else _rng.CHUNK


def fill_keep_mask(out: torch.Tensor, seed: int, p: float, start: int) -> torch.Tensor:
    """Fill the flat bool tensor ``out`` with the keep mask of elements ``start .. start + out.numel() - 1``."""
    chunk = _chunk(out.device)
    for c in range(0, out.numel(), chunk):
        count = min(chunk, out.numel() - c)
        out[c:c + count] = _rng.keep_mask(seed, p, start + c, count, out.device)
    return out


def apply_seed_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / (1 - p)`` with ``keep`` regenerated from ``seed``: a new contiguous tensor of x's shape."""
    if x.dtype != torch.float64 and use_triton(x):  # the kernel scales in float32
        from tempo_ds.kernels import dropout as kernel

        return kernel.apply_seed_mask(x, p, seed)
    flat = x.reshape(-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_flat = out.view(-1)
    scale = _scale(p)
    chunk = _chunk(x.device)
    for start in range(0, flat.numel(), chunk):
        count = min(chunk, flat.numel() - start)
        keep = _rng.keep_mask(seed, p, start, count, x.device)
        torch.mul(flat[start:start + count], keep, out=out_flat[start:start + count])
        out_flat[start:start + count].mul_(scale)
    return out


class SeedDropoutFunction(torch.autograd.Function):
    """``y = x * keep(seed) / (1 - p)``; x and y of any shape; saves no tensor."""

    @staticmethod
    @custom_fwd
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return apply_seed_mask(x, p, seed)

    @staticmethod
    @custom_bwd
    def backward(ctx, grad: torch.Tensor):
        # The same masked scaling of the gradient; through the Function again, so it is differentiable too.
        return SeedDropoutFunction.apply(grad, ctx.p, ctx.seed), None, None


def seed_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout like ``F.dropout(x, p, training)`` whose mask is regenerated from a seed instead of saved.

    ``p == 0`` or ``training=False`` returns ``x`` itself (no seed drawn); ``p == 1`` returns zeros (times x,
    so inf and nan still give nan, as in ``F.dropout``).
    """
    _check_p(p)
    if p == 0.0 or not training:
        return x
    seed = _rng.draw_seed()
    if torch.is_grad_enabled() and x.requires_grad:
        return SeedDropoutFunction.apply(x, p, seed)
    return apply_seed_mask(x, p, seed)

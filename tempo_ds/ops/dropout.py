"""Seed dropout: dropout that keeps no mask for backward.

Forward::

    seed      = draw_seed(x.device)                         1-element int64 tensor from the device's generator
    keep[n]   = _rng.uniform_u32(seed, n) >= floor(p 2^32)  n = row-major (logical) index of the element
    y         = x * keep / (1 - p)

Backward::

    dx        = dy * keep / (1 - p)                         keep regenerated from the seed

Saved for backward: nothing but the seed (an 8-byte device tensor, an input of the op, kept on ``ctx``
rather than through ``save_for_backward`` so that "nothing saved" stays the meter's figure: it is no
activation, the same value comes back from any recompute, and 8 bytes cannot leak). ``F.dropout`` keeps a
mask of the input's size (one byte per element on CUDA, one input-dtype element on CPU).

The op is ``tempo_ds::seed_dropout_fwd(x, seed, p)``, a triton op (``tempo_ds.ops._library``): on CUDA
torch.compile sees the kernel launch, elsewhere it calls the opaque ``tempo_ds::seed_dropout_fwd_opaque``
(the chunked PyTorch path, or the interpreted kernel). Its backward is the same op applied to the gradient,
so it is differentiable again. The seed is drawn in the wrapper and reaches the op as a tensor: nothing reads
it on the host (DESIGN.md section 5, rules 10-11), so ``torch.compile(fullgraph=True)`` and ``torch.export``
trace through.

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
from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops._library import LIB, draw_seed, kernels_visible, triton_op

__all__ = ["seed_dropout", "fill_keep_mask"]

CPU_CHUNK = 1 << 15


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")


def _scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _chunk(device: torch.device) -> int:
    return CPU_CHUNK if device.type == "cpu" else _rng.CHUNK


def fill_keep_mask(out: torch.Tensor, seed, p: float, start: int) -> torch.Tensor:
    """Fill the flat bool tensor ``out`` with the keep mask of elements ``start .. start + out.numel() - 1``;
    ``seed`` an int or a 1-element int64 tensor."""
    chunk = _chunk(out.device)
    for c in range(0, out.numel(), chunk):
        count = min(chunk, out.numel() - c)
        out[c:c + count] = _rng.keep_mask(seed, p, start + c, count, out.device)
    return out


def apply_seed_mask(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """``x * keep / (1 - p)`` with ``keep`` regenerated from ``seed`` (int or 1-element int64 tensor): a new
    contiguous tensor of x's shape."""
    if _kernel_path(x):
        from tempo_ds.kernels import dropout as kernel

        return kernel.apply_seed_mask(x, p, seed)  # the launcher loads a tensor seed on the device
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


def _kernel_path(x: torch.Tensor) -> bool:
    return x.dtype != torch.float64 and use_triton(x)  # the kernel scales in float32


@torch.library.custom_op(f"{LIB}::seed_dropout_fwd_opaque", mutates_args=())
def _fwd_opaque(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x * keep(seed) / (1 - p)`` by the chunked PyTorch path (or the interpreted kernel), opaque to
    torch.compile."""
    return apply_seed_mask(x, p, seed)


@_fwd_opaque.register_fake
def _(x, seed, p):
    return x.new_empty(x.shape)


def _kernels():
    from tempo_ds.kernels import dropout as kernel

    return (kernel._seed_dropout_kernel,)


@triton_op(f"{LIB}::seed_dropout_fwd", kernels=_kernels)
def _fwd(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x * keep(seed) / (1 - p)``: a new contiguous tensor of x's shape and dtype."""
    if kernels_visible(x) and _kernel_path(x):
        from tempo_ds.kernels import dropout as kernel

        return kernel.apply_seed_mask(x, p, seed)
    return _fwd_opaque(x, seed, p)


def _setup_context(ctx, inputs, output):
    _, seed, p = inputs
    ctx.seed, ctx.p = seed, p  # the seed: 8 bytes, an input, equal in any recompute (module docstring)


def _backward(ctx, grad):
    # The same masked scaling of the gradient, through the op again, so it is differentiable too.
    return _fwd(grad, ctx.seed, ctx.p), None, None


torch.library.register_autograd(f"{LIB}::seed_dropout_fwd", _backward, setup_context=_setup_context)


def seed_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout like ``F.dropout(x, p, training)`` whose mask is regenerated from a seed instead of saved.

    ``p == 0`` or ``training=False`` returns ``x`` itself (no seed drawn); ``p == 1`` returns zeros (times x,
    so inf and nan still give nan, as in ``F.dropout``). Saves nothing for backward but the 8-byte seed.
    """
    _check_p(p)
    if p == 0.0 or not training:
        return x
    return _fwd(x, draw_seed(x.device), float(p))

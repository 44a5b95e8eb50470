"""Seed dropout in Triton: the counter hash of ``tempo_ds.ops._rng``, bit for bit, in uint32 arithmetic.

Triton's tutorial *04-low-memory-dropout* shows the idea: instead of storing a dropout mask, keep one
seed and regenerate the mask from ``(seed, offset)`` whenever it is needed. The tutorial draws the
random numbers with Philox (``tl.rand``); we use a smaller integer hash instead, because the same mask
must also come out of plain PyTorch on any device (CPU included), and a few 32-bit multiplies and
shifts are easy to write identically in both. The hash (see ``tempo_ds/ops/_rng.py``)::

    mix32(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x5BD1E995; x ^= x >> 16
    key      = mix32(seed + hi * 0x27D4EB2F)           hi, lo = index >> 32, index & 0xFFFFFFFF
    u32      = mix32(mix32(lo ^ key) + key)
    keep     = u32 >= floor(p * 2**32)

All of it is uint32 arithmetic, which wraps mod 2**32 in Triton just as the ``& 0xFFFFFFFF`` does in the
PyTorch version. The threshold is compared in int64 so that ``p == 1`` (threshold 2**32) drops everything.

``mix32`` and ``uniform_u32`` are ``@triton.jit`` helpers that ``kernels/attention.py`` calls too, so
attention dropout uses the same mask on both paths.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tempo_ds.kernels._launch import launcher, seed_tensor
from tempo_ds.kernels._spec import POINTER, SHORT, spec

BLOCK = 1024
TENSOR_SEED = True  # the launchers take the seed as a 1-element int64 device tensor (an int still works)


@triton.jit
def mix32(x):
    """The 32-bit finaliser (x is uint32; multiplications wrap mod 2**32)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x5BD1E995
    x ^= x >> 16
    return x


@triton.jit
def uniform_u32(seed, index):
    """Hash of the int64 element ``index`` under ``seed``: uint32, identical to ``_rng.uniform_u32``."""
    hi = (index >> 32).to(tl.uint32)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    key = mix32(seed.to(tl.uint32) + hi * 0x27D4EB2F)
    return mix32(mix32(lo ^ key) + key)


@triton.jit(do_not_specialize=["start"])
def _seed_dropout_kernel(x_ptr, out_ptr, n, start, seed_ptr, threshold, scale, BLOCK: tl.constexpr):
    # One program per BLOCK elements of the flat (row-major) tensor; start + the element's flat index is
    # the counter of the hash, so the mask does not depend on how the work is split. The seed is read from
    # device memory: drawing it never syncs the host.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    seed = tl.load(seed_ptr)
    x = tl.load(x_ptr + offs, mask=inside)
    keep = uniform_u32(seed, start + offs).to(tl.int64) >= threshold
    # x * keep first (exact: x, 0 or nan for a dropped inf), then the scale in float32, like PyTorch's
    # ``torch.mul(x, keep).mul_(scale)`` for every floating dtype but float64.
    y = (x * keep.to(x.dtype)).to(tl.float32) * scale
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


def apply_seed_mask(x: torch.Tensor, p: float, seed, start: int = 0) -> torch.Tensor:
    """``x * keep / (1 - p)`` with the mask of ``(seed, start + flat index)`` (``_rng.keep_mask(seed, p, start,
    x.numel())``); a new contiguous tensor of x's shape. ``seed``: a 1-element int64 tensor on x's device
    (``tempo_ds.ops._library.draw_seed``), or an int (copied to the device)."""
    from tempo_ds.ops._rng import drop_threshold

    src = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = src.numel()
    if n:
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        launcher(_seed_dropout_kernel)[(triton.cdiv(n, BLOCK),)](
            src, out, n, start, seed_tensor(seed, x.device), drop_threshold(p), scale, BLOCK=BLOCK)
    return out


def aot_specializations(full: bool = False, arch: int = 90) -> list[dict]:
    """The dropout kernel for every dtype the op sends it (fp32/bf16/fp16; ``full``) or bf16 alone. ``start`` is
    never specialized (``do_not_specialize``); ``n`` and ``threshold`` arrive as int64 where they may pass
    2**31 (the threshold is 2**32 when p == 1)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if full else (torch.bfloat16,)
    return [spec(f"dropout.seed_mask[{SHORT[dt]}]", _seed_dropout_kernel,
                 {"x_ptr": POINTER[dt], "out_ptr": POINTER[dt], "n": "i32", "start": "i64", "seed_ptr": "*i64",
                  "threshold": "i64", "scale": "fp32"}, {"BLOCK": BLOCK}, num_warps=4)
            for dt in dtypes]

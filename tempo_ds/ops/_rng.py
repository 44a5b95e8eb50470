"""Randomness that is regenerated instead of stored: a seed from the global RNG plus a counter hash.

A dropout mask is a pure function of ``(seed, element index)``, so backward (and any checkpoint
recompute) rebuilds it from one integer instead of keeping a mask. The seed is drawn from the default
CPU generator, which every checkpoint flavour restores before recomputing (DESIGN.md section 5, rule 2);
a private ``torch.Generator`` would not be restored and would give silently wrong gradients.

The hash is defined on 32-bit words so the PyTorch path here and the Triton kernels produce the same
bits (all arithmetic mod 2**32)::

    mix32(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x5BD1E995; x ^= x >> 16
    key       = mix32(seed + hi * 0x27D4EB2F)          hi, lo = index >> 32, index & 0xFFFFFFFF
    u32       = mix32(mix32(lo ^ key) + key)
    keep      = u32 >= floor(p * 2**32)                (p == 1 drops everything)
"""
from __future__ import annotations

import torch

__all__ = ["draw_seed", "mix32", "uniform_u32", "keep_mask", "drop_threshold", "CHUNK"]

M32 = 0xFFFFFFFF
C1, C2, C_HI = 0x7FEB352D, 0x5BD1E995, 0x27D4EB2F
CHUNK = 1 << 22  # elements per chunk when regenerating a mask: bounds int64 temporaries to ~32 MiB each


def draw_seed() -> int:
    """A 31-bit seed from the default CPU generator (restored by every checkpoint flavour)."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixing function on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * C1) & M32
    x = x ^ (x >> 15)
    x = (x * C2) & M32
    return x ^ (x >> 16)


def _mix32_int32_(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` in place on int32 tensors: multiplication wraps mod 2**32 and the shifts are masked to be
    logical, so the bits equal the int64 definition at a quarter of the memory traffic."""
    x ^= (x >> 16) & 0xFFFF
    x *= C1
    x ^= (x >> 15) & 0x1FFFF
    x *= C2
    x ^= (x >> 16) & 0xFFFF
    return x


def _as_int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def uniform_u32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The hash of each int64 element index under ``seed``, as int64 values in [0, 2**32)."""
    hi = index >> 32
    first = hi.reshape(-1)[:1]
    if index.numel() and bool((hi == first).all()):  # the usual case: one 2**32 window, one key
        key = _as_int32(int(mix32((first * C_HI + seed) & M32).item()))
    else:
        key = mix32((hi * C_HI + seed) & M32)
        key = torch.where(key >= 1 << 31, key - (1 << 32), key).to(torch.int32)
    x = (index & M32).to(torch.int32)
    x ^= key
    _mix32_int32_(x)
    x += key
    return _mix32_int32_(x).to(torch.int64) & M32


def drop_threshold(p: float) -> int:
    """Elements whose hash is below this are dropped (2**32 when p == 1: all)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")
    return min(int(p * 2**32), 2**32)


def keep_mask(seed: int, p: float, start: int, count: int, device) -> torch.Tensor:
    """Bool mask of the elements ``start .. start+count-1`` that survive dropout with probability ``p``."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return uniform_u32(seed, index) >= drop_threshold(p)

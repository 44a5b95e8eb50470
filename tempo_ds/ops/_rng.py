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


def uniform_u32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The hash of each int64 element index under ``seed``, as int64 values in [0, 2**32)."""
    key = mix32(((index >> 32) * C_HI + seed) & M32)
    return mix32((mix32((index & M32) ^ key) + key) & M32)


def drop_threshold(p: float) -> int:
    """Elements whose hash is below this are dropped (2**32 when p == 1: all)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")
    return min(int(p * 2**32), 2**32)


def keep_mask(seed: int, p: float, start: int, count: int, device) -> torch.Tensor:
    """Bool mask of the elements ``start .. start+count-1`` that survive dropout with probability ``p``."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return uniform_u32(seed, index) >= drop_threshold(p)

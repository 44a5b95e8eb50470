"""Randomness that is regenerated instead of stored: a seed from the global RNG plus a counter hash.

A dropout mask is a pure function of ``(seed, element index)``, so backward (and any checkpoint
recompute) rebuilds it from one integer instead of keeping a mask. The seed is drawn from the default
generator of the input's device (``tempo_ds.ops._library.draw_seed``: a 1-element int64 device tensor,
never read on the host), which every checkpoint flavour restores before recomputing (DESIGN.md section 5,
rule 2); a private ``torch.Generator`` would not be restored and would give silently wrong gradients.
Every function here takes the seed as that tensor or as a Python int (the same bits either way) and never
reads a device value on the host (rule 10).

The hash is defined on 32-bit words so the PyTorch path here and the Triton kernels produce the same
bits (all arithmetic mod 2**32)::

    mix32(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x5BD1E995; x ^= x >> 16
    key       = mix32(seed + hi * 0x27D4EB2F)          hi, lo = index >> 32, index & 0xFFFFFFFF
    u32       = mix32(mix32(lo ^ key) + key)
    keep      = u32 >= floor(p * 2**32)                (p == 1 drops everything)
"""
from __future__ import annotations

import torch

__all__ = ["draw_seed", "mix32", "uniform_u32", "uniform_u32_range", "keep_mask", "drop_threshold", "CHUNK"]

M32 = 0xFFFFFFFF
C1, C2, C_HI = 0x7FEB352D, 0x5BD1E995, 0x27D4EB2F
CHUNK = 1 << 22  # elements per chunk when regenerating a mask: bounds int64 temporaries to ~32 MiB each


def draw_seed() -> int:
    """A 31-bit seed from the default CPU generator, as a Python int (the value ``_library.draw_seed`` gives on
    CPU). Reads a tensor on the host, so no op calls it: it is for references in tests and benchmarks."""
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


def _to_int32(key):
    """A key in [0, 2**32) as the int32 with the same bits (Python int or int64 tensor)."""
    if isinstance(key, torch.Tensor):
        return torch.where(key >= 1 << 31, key - (1 << 32), key).to(torch.int32)
    return key - (1 << 32) if key >= 1 << 31 else key


def _key(seed, hi):
    """``mix32(seed + hi * C_HI)`` as int32 bits; ``seed`` an int or a 1-element int64 tensor, ``hi`` an int or
    an int64 tensor. A tensor in gives a tensor out; nothing is read on the host."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    return _to_int32(mix32((hi * C_HI + seed) & M32))


def _hash_low_words(lo: torch.Tensor, key) -> torch.Tensor:
    """``mix32(mix32(lo ^ key) + key)`` for int64 ``lo`` in [0, 2**32), as int64 in [0, 2**32)."""
    x = lo.to(torch.int32)
    x ^= key
    _mix32_int32_(x)
    x += key
    return _mix32_int32_(x).to(torch.int64) & M32


def uniform_u32(seed, index: torch.Tensor) -> torch.Tensor:
    """The hash of each int64 element index under ``seed`` (int or 1-element int64 tensor), as int64 values in
    [0, 2**32). One key per element: use :func:`uniform_u32_range` for a contiguous range of indices."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(index.device)
    return _hash_low_words(index & M32, _key(seed, index >> 32))


def uniform_u32_range(seed, start: int, count: int, device) -> torch.Tensor:
    """``uniform_u32(seed, arange(start, start + count))``, one key per 2**32 window of indices (the window
    bounds are host integers, so choosing them reads nothing from the device)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device)
    out = torch.empty(count, dtype=torch.int64, device=device)
    pos = 0
    while pos < count:
        hi = (start + pos) >> 32
        stop = min(count, ((hi + 1) << 32) - start)
        lo = torch.arange((start + pos) & M32, ((start + stop - 1) & M32) + 1, dtype=torch.int64, device=device)
        out[pos:stop] = _hash_low_words(lo, _key(seed, hi))
        pos = stop
    return out


def drop_threshold(p: float) -> int:
    """Elements whose hash is below this are dropped (2**32 when p == 1: all)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")
    return min(int(p * 2**32), 2**32)


def keep_mask(seed, p: float, start: int, count: int, device) -> torch.Tensor:
    """Bool mask of the elements ``start .. start+count-1`` that survive dropout with probability ``p``;
    ``seed`` an int or a 1-element int64 tensor."""
    return uniform_u32_range(seed, start, count, device) >= drop_threshold(p)

"""Bit packing: n codes of b bits each stored in exactly ceil(n * b / 8) bytes.

Eight codes of b bits make b bytes, so codes are packed in groups of eight into one little-endian
integer of 8*b bits and split into b bytes. When b divides 8 that layout is simply 8 // b codes per
byte, lowest bits first, and is computed in uint8. Used for the 1-bit branch mask of in-place GELU and the
b-bit codes of few-bit activations.
"""
from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in range(1, 9):
        raise ValueError(f"bits={bits!r} is not supported; allowed values: 1..8")


def _pack_within_bytes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits`` divides 8: each byte holds 8 // bits whole codes, so uint8 arithmetic suffices."""
    per = 8 // bits
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    flat = flat.to(torch.uint8)
    if nbytes * per != n:
        flat = torch.cat([flat, flat.new_zeros(nbytes * per - n)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    return (flat.view(nbytes, per) << shifts).sum(1, dtype=torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the integer tensor ``codes`` (values in [0, 2**bits)) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if 8 % bits == 0:
        return _pack_within_bytes(flat, bits)
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = flat
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(groups, 8) << shifts).sum(dim=1, dtype=torch.int64)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].clone() if out.numel() != packed_nbytes(n, bits) else out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.view(-1, 1) >> shifts) & ((1 << bits) - 1)).view(-1)[:n]
    groups = (n + 7) // 8
    full = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    full[: packed.numel()] = packed
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (full.view(groups, bits) << byte_shifts).sum(dim=1, dtype=torch.int64)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)

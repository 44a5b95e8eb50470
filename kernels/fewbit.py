"""Triton kernels of the few-bit activations (``tempo_ds.ops.fewbit``): one pass forward, one backward.

Forward, per element (computed in fp32, stored in the input's dtype)::

    y    = f(x)                                   the exact activation
    code = sum_j [x > borders[j]]                 interval index, 0 .. 2**bits - 1 (nan: NAN_CODE)
           or  not (x <= lo or x >= hi)           "band" tables (exact ReLU6 / Hardtanh: one bit)

and the codes are packed, ``bits`` bits each, exactly as ``tempo_ds.ops._bits.pack_bits`` does: eight
consecutive codes make one little-endian word ``sum_k code_k << (bits * k)`` of ``bits`` bytes. A program
handles BLOCK elements = BLOCK / 8 words, so it writes whole words and n elements take ceil(n bits / 8)
bytes in all (the last word is cut at that length). x is read once; y and the codes are written once.

Backward::

    code     = (word >> (bits * k)) & (2**bits - 1)        unpacked in registers
    grad_in  = 0 if level[code] == 0 else grad_out * level[code]     in fp32, rounded to grad's dtype

Comparisons and products are the PyTorch path's, in the same precision (fp32 for fp16/bf16/fp32 inputs),
so codes and gradients agree bit for bit. y agrees to the accuracy of fp32 math: on CUDA tanh, expm1 and
log1p come from libdevice; under ``TRITON_INTERPRET=1``, which lacks libdevice, from the portable
formulas below. float64 inputs take the PyTorch path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from tempo_ds.kernels._launch import launcher
from tempo_ds.kernels._spec import POINTER, SHORT, spec

__all__ = ["ACTS", "forward", "backward"]

BLOCK = 1024  # elements per program: a multiple of 8, so programs own whole packed words

ACTS = {name: i for i, name in enumerate([
    "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "softplus", "elu", "celu", "selu", "mish", "logsigmoid",
    "softsign", "tanhshrink", "hardswish", "relu", "leaky_relu", "relu6", "hardtanh"])}

# Globals a @triton.jit function reads must be tl.constexpr: the compiler refuses plain floats (the interpreter
# does not notice, so only the ahead-of-time compile check, tempo_ds.kernels.aot, catches that).
_SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
_SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)


@triton.jit
def _expm1(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.expm1(x)
    else:
        # Kahan: (u - 1) * x / log(u) cancels the rounding of u = exp(x); for x <= 0 (below -20 the
        # result is -1 in fp32). The guards keep the unused branches free of log(0) and 0 / 0.
        xc = tl.where(x < -20.0, -20.0, x)               # nan stays nan
        u = tl.exp(xc)
        lg = tl.log(u)
        r = tl.where(u == 1.0, xc, (u - 1.0) * xc / tl.where(lg == 0.0, 1.0, lg))
        return tl.where(x < -20.0, -1.0, r)


@triton.jit
def _log1p(z, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.log1p(z)
    else:
        # for z >= 0: log(u) * z / (u - 1) with u = 1 + z cancels the rounding of u
        u = 1.0 + z
        return tl.where(u == 1.0, z, tl.log(u) * z / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)
    else:
        a = tl.abs(x)
        e = _expm1(-2.0 * a, LIBDEVICE)               # in (-1, 0]
        t = -e / (2.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def _softplus(x, LIBDEVICE: tl.constexpr):
    # PyTorch's softplus (beta 1, threshold 20); log1p(exp(x)) = max(x, 0) + log1p(exp(-|x|))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)), LIBDEVICE))


@triton.jit
def _activation(x, ACT: tl.constexpr, p0, p1, LIBDEVICE: tl.constexpr):
    """f(x) in fp32; p0, p1: the LeakyReLU slope / the Hardtanh and ReLU6 limits."""
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x), LIBDEVICE))
    elif ACT == 2:
        y = x * tl.sigmoid(x)
    elif ACT == 3:
        y = _tanh(x, LIBDEVICE)
    elif ACT == 4:
        y = tl.sigmoid(x)
    elif ACT == 5:
        y = _softplus(x, LIBDEVICE)
    elif ACT == 6 or ACT == 7:
        y = tl.where(x > 0, x, _expm1(tl.where(x > 0, 0.0, x), LIBDEVICE))       # nan stays nan
    elif ACT == 8:
        y = _SELU_SCALE * tl.where(x > 0, x, _SELU_ALPHA * _expm1(tl.where(x > 0, 0.0, x), LIBDEVICE))
    elif ACT == 9:
        y = x * _tanh(_softplus(x, LIBDEVICE), LIBDEVICE)
    elif ACT == 10:
        y = tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)), LIBDEVICE)
    elif ACT == 11:
        y = x / (1.0 + tl.abs(x))
    elif ACT == 12:
        y = x - _tanh(x, LIBDEVICE)
    elif ACT == 13:
        y = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 14:
        y = tl.where(x < 0, 0.0, x)                   # NaN passes, as in torch.relu
    elif ACT == 15:
        y = tl.where(x > 0, x, x * p0)
    else:
        y = tl.where(x < p0, p0, tl.where(x > p1, p1, x))
    return y


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (by hand for bf16, as c10::BFloat16 does it: the interpreter's
    own fp32 -> bf16 cast truncates, and the result must not depend on where the kernel runs)."""
    if DTYPE == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = tl.where(v != v, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _fewbit_fwd_kernel(x_ptr, y_ptr, packed_ptr, borders_ptr, n, nbytes, p0, p1,
                       ACT: tl.constexpr, NBORDERS: tl.constexpr, BAND: tl.constexpr, NAN_CODE: tl.constexpr,
                       BITS: tl.constexpr, SAVE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _activation(x, ACT, p0, p1, LIBDEVICE)
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        if BAND:
            lo = tl.load(borders_ptr)
            hi = tl.load(borders_ptr + 1)
            code = 1 - ((x <= lo) | (x >= hi)).to(tl.uint32)
        else:
            code = tl.zeros([BLOCK], dtype=tl.uint32)
            for j in tl.static_range(NBORDERS):
                code += (x > tl.load(borders_ptr + j)).to(tl.uint32)
            if NAN_CODE != 0:
                code = tl.where(x != x, NAN_CODE, code)      # nan compares false: it would get code 0
        code = tl.where(mask, code, 0)
        k = tl.arange(0, 8).to(tl.uint32)
        words = tl.reduce(tl.reshape(code, [BLOCK // 8, 8]) << (k[None, :] * BITS), 1, _or)
        jb = tl.arange(0, 4)
        byte = (words[:, None] >> (jb[None, :] * 8).to(tl.uint32)) & 0xFF
        boffs = (pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8))[:, None] * BITS + jb[None, :]
        tl.store(packed_ptr + boffs, byte.to(tl.uint8), mask=(jb[None, :] < BITS) & (boffs < nbytes))


@triton.jit
def _fewbit_bwd_kernel(g_ptr, dx_ptr, packed_ptr, levels_ptr, n, nbytes,
                       BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    jb = tl.arange(0, 4)
    boffs = (pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8))[:, None] * BITS + jb[None, :]
    byte = tl.load(packed_ptr + boffs, mask=(jb[None, :] < BITS) & (boffs < nbytes), other=0).to(tl.uint32)
    words = tl.reduce(byte << (jb[None, :] * 8).to(tl.uint32), 1, _or)
    k = tl.arange(0, 8).to(tl.uint32)
    codes = (words[:, None] >> (k[None, :] * BITS)) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, [BLOCK])
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    level = tl.load(levels_ptr + codes.to(tl.int32), mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = tl.where(level == 0.0, 0.0, g * level)
    tl.store(dx_ptr + offs, _round_to(dx, dx_ptr.dtype.element_ty), mask=mask)


def _libdevice() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"


def forward(x: torch.Tensor, name: str, params: tuple[float, float], borders: torch.Tensor, band: bool,
            nan_code: int, bits: int, save: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, packed)`` for a contiguous fp16/bf16/fp32 ``x``; ``borders``: fp32 on x's device.

    ``packed`` is None unless ``save``; otherwise a uint8 tensor of ceil(n bits / 8) bytes.
    """
    n = x.numel()
    y = torch.empty_like(x)
    nbytes = (n * bits + 7) // 8
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if save else y   # y: a pointer never used
    if n:
        launcher(_fewbit_fwd_kernel)[(triton.cdiv(n, BLOCK),)](
            x, y, packed, borders, n, nbytes, float(params[0]), float(params[1]),
            ACT=ACTS[name], NBORDERS=borders.numel(), BAND=band, NAN_CODE=nan_code, BITS=bits, SAVE=save,
            LIBDEVICE=_libdevice(), BLOCK=BLOCK)
    return y, (packed if save else None)


def backward(grad: torch.Tensor, packed: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """grad_in for a contiguous fp16/bf16/fp32 ``grad``; ``levels``: fp32 [2**bits] on grad's device."""
    n = grad.numel()
    dx = torch.empty_like(grad)
    if n:
        launcher(_fewbit_bwd_kernel)[(triton.cdiv(n, BLOCK),)](grad, dx, packed, levels, n, packed.numel(),
                                                              BITS=bits, BLOCK=BLOCK)
    return dx


def _forward_spec(name: str, bits: int, dtype: torch.dtype, save: bool = True) -> dict:
    from tempo_ds.ops.fewbit import resolve

    s = resolve(name, bits)
    ptr = POINTER[dtype]
    return spec(f"fewbit.fwd[{name},{bits}bit,{SHORT[dtype]}" + ("" if save else ",nosave") + "]", _fewbit_fwd_kernel,
                {"x_ptr": ptr, "y_ptr": ptr, "packed_ptr": "*u8" if save else ptr, "borders_ptr": "*fp32",
                 "n": "i32", "nbytes": "i32", "p0": "fp32", "p1": "fp32"},
                dict(ACT=ACTS[name], NBORDERS=len(s.borders), BAND=s.band, NAN_CODE=s.nan_code, BITS=bits, SAVE=save,
                     LIBDEVICE=_libdevice(), BLOCK=BLOCK), num_warps=4)


def _backward_spec(bits: int, dtype: torch.dtype) -> dict:
    ptr = POINTER[dtype]
    return spec(f"fewbit.bwd[{bits}bit,{SHORT[dtype]}]", _fewbit_bwd_kernel,
                {"g_ptr": ptr, "dx_ptr": ptr, "packed_ptr": "*u8", "levels_ptr": "*fp32", "n": "i32", "nbytes": "i32"},
                dict(BITS=bits, BLOCK=BLOCK), num_warps=4)


def aot_specializations(full: bool = False, arch: int = 90) -> list[dict]:
    """Forward kernels of every function x bits 1-4 (exact functions: their 1-bit code) and backward kernels of
    every bit width, for fp32/bf16/fp16 (``full``); or a subset with SELU, GELU, SiLU, a band table and the
    no-grad forward. ``LIBDEVICE`` as the launcher decides it (on: the compile check runs without the
    interpreter)."""
    from tempo_ds.fewbit import functions

    if not full:
        return [_forward_spec("selu", 2, torch.bfloat16), _forward_spec("gelu", 4, torch.float16),
                _forward_spec("silu", 3, torch.float32), _forward_spec("hardtanh", 1, torch.bfloat16),
                _forward_spec("mish", 1, torch.bfloat16, save=False),
                _backward_spec(1, torch.bfloat16), _backward_spec(3, torch.float32)]
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name in ACTS:
            for bits in ((1,) if functions.get(name).exact else (1, 2, 3, 4)):
                out.append(_forward_spec(name, bits, dtype))
        out.append(_forward_spec("gelu", 2, dtype, save=False))
        out.extend(_backward_spec(bits, dtype) for bits in (1, 2, 3, 4))
    return out

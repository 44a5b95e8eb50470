"""In-place GELU in Triton: the forward keeps y and one bit, the backward finds x again from them.

The maths
---------
GELU(x) = x * Phi(x) (``approximate="none"``) or x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
(``"tanh"``; 0.5 (1 + tanh u) = sigmoid(2u)). It falls from 0 at -inf to a minimum y_min at x_min
(about -0.752, -0.170) and rises again, so every y in (y_min, 0) has two preimages. Keep y (the next
Linear keeps it anyway) and the bit ``x >= x_min``, and x can be found again in backward::

    s = +sqrt(y - y_min) if bit else -sqrt(y - y_min)

is a smooth coordinate through the minimum (y - y_min ~ GELU''(x_min) (x - x_min)^2 / 2 there, so
x - x_min ~ s: a polynomial in s inverts GELU near x_min, where a polynomial in y cannot). Then:

* |s| <= S_A (|x - x_min| < ~0.2): x = A(s), a degree-8 polynomial good to 2e-8. No Newton step
  there: y is only known to ~1 ulp, and near a minimum that pins x down to ~sqrt(ulp) at best.
* elsewhere a guess good to ~3e-3 -- R(s) on the right branch (x = y beyond s = S_R), L(s) on the
  left, and T(log(-log(-y))) on the left tail where y ~ phi(x) -> 0- -- refined by Newton steps on
  GELU(x) = y (2 for float32 inputs, 1 for fp16/bf16, whose own rounding is far coarser). The step
  is ``f * d / (d * d + damping)``, f = GELU(x) - y, d = GELU'(x): exact Newton off the minimum,
  ~0 inside its polynomial region (damping 1) and where GELU'(x) underflows (damping 1e-30).
* dx = dy * GELU'(x), with GELU'(x) of the last iterate moved to the new x to first order:
  GELU'(x - step) ~ GELU'(x) - GELU''(x) * step.

The forward computes y as PyTorch's CUDA kernel does for the erf form, x * 0.5 * (1 + erf(x / sqrt 2)),
and as x * sigmoid(2u) for the tanh form (Triton has no tanh; this is also exact as y -> 0-, where
1 + tanh(u) cancels). The backward evaluates GELU, GELU', GELU'' accurately everywhere: Phi(x) for
x < -1 is 0.5 * erfc(-x / sqrt 2) with erfc from a rational approximation (Numerical Recipes' erfcc,
relative error < 1.2e-7), since 1 + erf(x / sqrt 2) cancels there and Triton's interpreter has no
erfc. So the Newton steps invert the exact GELU, and the gradient reaches the floor set by the
rounding of y whichever forward produced y. The constants, polynomial coefficients and the float32
split of y_min live in ``tempo_ds.ops.gelu`` (shared with the PyTorch path) and reach the kernel as a
small float32 tensor.

Layout. One program handles BLOCK elements of the flat tensor. The forward packs the branch bits in
the kernel: BLOCK bits are reshaped to [BLOCK / 8, 8], shifted by 0..7 and summed into BLOCK / 8 bytes,
element i at bit i % 8 of byte i // 8 -- exactly ``tempo_ds.ops._bits.pack_bits(bits, 1)``, so either
path can read the other's mask. All arithmetic is float32 whatever the input dtype (float64 tensors
stay on the PyTorch path); the outputs are rounded once, to nearest even, to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tempo_ds.kernels._launch import launcher
from tempo_ds.kernels._spec import POINTER, SHORT, spec
from tempo_ds.ops._bits import packed_nbytes
from tempo_ds.ops._library import device_constant
from tempo_ds.ops.gelu import S_A, S_L, S_R, TABLES, TAU, Y_TINY, _rounded, branch_threshold, newton_steps

BLOCK = 1024

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_K0 = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_K1 = tl.constexpr(0.044715)
_TAU = tl.constexpr(TAU)
_Y_TINY = tl.constexpr(Y_TINY)
_S_A = tl.constexpr(S_A)
_S_R = tl.constexpr(S_R)
_S_L = tl.constexpr(S_L)

# Offsets and degrees of the polynomials in the coefficient tensor (see ``_coefficients``).
_A, _R, _L, _T = tl.constexpr(0), tl.constexpr(9), tl.constexpr(15), tl.constexpr(20)
_DEG_A, _DEG_R, _DEG_L, _DEG_T = tl.constexpr(8), tl.constexpr(5), tl.constexpr(4), tl.constexpr(5)


@triton.jit
def _horner(coef_ptr, OFFSET: tl.constexpr, DEGREE: tl.constexpr, t):
    acc = tl.zeros_like(t) + tl.load(coef_ptr + OFFSET + DEGREE)
    for i in tl.static_range(DEGREE):
        acc = acc * t + tl.load(coef_ptr + OFFSET + DEGREE - 1 - i)
    return acc


@triton.jit
def _normal_cdf(x):
    """Phi(x) in float32 with small relative error for every x (no cancellation as x -> -inf)."""
    z = -x * _SQRT1_2
    az = tl.abs(z)
    t = 1.0 / (1.0 + 0.5 * az)
    p = (-1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    tail = 0.5 * t * tl.exp(p - az * az)          # 0.5 * erfc(|z|)
    return tl.where(x < -1.0, tail, 0.5 + 0.5 * tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    """The forward: PyTorch's CUDA formula for the erf form; x * sigmoid(2u) for the tanh form (Triton has
    no tanh), which is also exact as y -> 0- where 1 + tanh(u) cancels."""
    if TANH:
        v = 2.0 * _K0 * x * (1.0 + _K1 * x * x)
        e = tl.exp(-tl.abs(v))
        y = x * tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(v), no overflow either way
    else:
        y = x * 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    return y


@triton.jit
def _gelu_derivatives(x, TANH: tl.constexpr):
    """GELU(x), GELU'(x), GELU''(x) in float32."""
    if TANH:
        v = 2.0 * _K0 * x * (1.0 + _K1 * x * x)
        dv = 2.0 * _K0 * (1.0 + 3.0 * _K1 * x * x)
        e = tl.exp(-tl.abs(v))
        r = 1.0 / (1.0 + e)
        p = tl.where(v >= 0, r, e * r)
        pq = e * r * r                                       # sigmoid(v) * sigmoid(-v)
        g0 = x * p
        g1 = p + x * pq * dv
        g2 = pq * (2.0 * dv + x * ((1.0 - 2.0 * p) * dv * dv + 12.0 * _K0 * _K1 * x))
    else:
        cdf = _normal_cdf(x)
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        g0 = x * cdf
        g1 = cdf + x * pdf
        g2 = pdf * (2.0 - x * x)
    return g0, g1, g2


@triton.jit
def _rounded_for(v, ptr):
    """float32 ``v`` rounded to nearest-even in the element type of ``ptr``. Spelled out for bfloat16:
    Triton's interpreter truncates float32 -> bfloat16 (a GPU and PyTorch round to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        v = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, bits_ptr, n, threshold, TANH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _rounded_for(_gelu(x, TANH), y_ptr), mask=inside)
    bit = ((x >= threshold) & inside).to(tl.int32)
    byte = tl.sum(tl.reshape(bit, (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :], axis=1)
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=boffs < (n + 7) // 8)


@triton.jit
def _backward_kernel(y_ptr, bits_ptr, dy_ptr, dx_ptr, coef_ptr, n, y_hi, y_lo, y_r, y_l,
                     TANH: tl.constexpr, NEWTON: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    y = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    byte = tl.load(bits_ptr + offs // 8, mask=inside, other=0).to(tl.int32)
    right = ((byte >> (offs % 8).to(tl.int32)) & 1) != 0

    # s = +-sqrt(y - y_min); y - y_hi is exact, y_lo carries the rest of y_min
    s = tl.sqrt(tl.maximum((y - y_hi) - y_lo, 0.0, propagate_nan=tl.PropagateNan.ALL))
    s = tl.where(right, s, -s)
    in_a = tl.abs(s) <= _S_A
    x_a = _horner(coef_ptr, _A, _DEG_A, tl.minimum(tl.maximum(s, -_S_A), _S_A))
    x_r = _horner(coef_ptr, _R, _DEG_R, tl.minimum(tl.maximum(s, _S_A), _S_R)) + tl.maximum(y - y_r, 0.0)
    x_l = _horner(coef_ptr, _L, _DEG_L, tl.minimum(tl.maximum(s, _S_L), -_S_A))
    x_t = _horner(coef_ptr, _T, _DEG_T, tl.log(-tl.log(tl.minimum(tl.maximum(-y, _Y_TINY), -y_l))))
    x = tl.where(in_a, x_a, tl.where(right, x_r, tl.where(s >= _S_L, x_l, x_t)))

    damping = tl.where(in_a, 1.0, _TAU)
    slope = tl.zeros_like(x)
    for _ in tl.static_range(NEWTON):
        g, g1, g2 = _gelu_derivatives(x, TANH)
        step = (g - y) * g1 / (g1 * g1 + damping)
        x = x - step
        slope = g1 - g2 * step
    tl.store(dx_ptr + offs, _rounded_for(dy * slope, dx_ptr), mask=inside)


def _coefficients(approximate: str, device: torch.device) -> torch.Tensor:
    """A, R, L, T of ``TABLES[approximate]`` back to back, float32, on ``device``."""
    tab = TABLES[approximate]
    return device_constant(tab.a + tab.r + tab.l + tab.t, torch.float32, device)


def forward(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GELU(x), packed bits x >= x_min)``: y contiguous with x's shape, bits uint8 [ceil(n / 8)]."""
    src = x.contiguous()
    n = src.numel()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    bits = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=x.device)
    if n:
        launcher(_forward_kernel)[(triton.cdiv(n, BLOCK),)](
            src, y, bits, n, branch_threshold(approximate, x.dtype), TANH=approximate == "tanh", BLOCK=BLOCK)
    return y, bits


def backward(y: torch.Tensor, bits: torch.Tensor, dy: torch.Tensor, approximate: str) -> torch.Tensor:
    """``dy * GELU'(x)`` for the x with GELU(x) = y on the branch in ``bits``; y's shape and dtype."""
    tab = TABLES[approximate]
    y, dy = y.contiguous(), dy.contiguous()
    n = y.numel()
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if n:
        y_hi = _rounded(tab.y_min, torch.float32)
        launcher(_backward_kernel)[(triton.cdiv(n, BLOCK),)](
            y, bits, dy, dx, _coefficients(approximate, y.device), n, y_hi, tab.y_min - y_hi,
            S_R * S_R + tab.y_min, tab.y_l, TANH=approximate == "tanh", NEWTON=newton_steps(y.dtype),
            BLOCK=BLOCK)
    return dx


def _forward_spec(approximate: str, dtype: torch.dtype) -> dict:
    ptr = POINTER[dtype]
    return spec(f"gelu.fwd[{approximate},{SHORT[dtype]}]", _forward_kernel,
                {"x_ptr": ptr, "y_ptr": ptr, "bits_ptr": "*u8", "n": "i32", "threshold": "fp32"},
                dict(TANH=approximate == "tanh", BLOCK=BLOCK), num_warps=4)


def _backward_spec(approximate: str, dtype: torch.dtype) -> dict:
    ptr = POINTER[dtype]
    return spec(f"gelu.bwd[{approximate},{SHORT[dtype]}]", _backward_kernel,
                {"y_ptr": ptr, "bits_ptr": "*u8", "dy_ptr": ptr, "dx_ptr": ptr, "coef_ptr": "*fp32", "n": "i32",
                 **{a: "fp32" for a in ("y_hi", "y_lo", "y_r", "y_l")}},
                dict(TANH=approximate == "tanh", NEWTON=newton_steps(dtype), BLOCK=BLOCK), num_warps=4)


def aot_specializations(full: bool = False, arch: int = 90) -> list[dict]:
    """Forward and backward kernels for both GELU forms and fp32/bf16/fp16 (``full``; the backward's Newton
    steps depend on the dtype), or the erf forward in bf16 and the backward in bf16 (tanh) and fp32 (erf)."""
    if not full:
        return [_forward_spec("none", torch.bfloat16), _backward_spec("tanh", torch.bfloat16),
                _backward_spec("none", torch.float32)]
    return [make(a, dt) for dt in (torch.float32, torch.bfloat16, torch.float16) for a in ("none", "tanh")
            for make in (_forward_spec, _backward_spec)]

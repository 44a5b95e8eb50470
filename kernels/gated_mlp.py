"""The elementwise part of a gated MLP in Triton: ``h = act(g) * u`` forward; ``dg``, ``du`` and ``h`` in one
backward pass.

The maths
---------
``act`` is SiLU (``x * sigmoid(x)``, Llama's SwiGLU) or the tanh approximation of GELU (Gemma's GeGLU)::

    silu(x)      = x / (1 + exp(-x))
    silu'(x)     = s * (1 + x * (1 - s)),          s = 1 / (1 + exp(-x))
    gelu_tanh(x) = 0.5 * x * (1 + tanh(b * (x + k * x^3))),          b = sqrt(2 / pi), k = 0.044715
    gelu_tanh'(x) = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * b * (1 + 3 k x^2),   t = tanh(b * (x + k x^3))

Forward ``a = act(g)``, ``h = a * u``. Backward, given ``dh`` (= ``dout @ W_down``)::

    da = dh * u        dg = da * act'(g)        du = dh * a        h = a * u   (for dW_down = dout^T h)

Rounding. PyTorch runs ``act``, ``*`` and ``act_backward`` as three kernels, each rounding its result to the
tensor dtype; this kernel computes in float32 and rounds at the same three points (``a``, ``h``; ``da``,
``dg``, ``du``), so bfloat16/float16 results take the same roundings as the unfused model. The formulas
are written in the order of PyTorch's CUDA kernels (``x / (1 + exp(-x))`` with an IEEE division, libdevice
``expf``/``tanhf``), so the CUDA results should agree with PyTorch's to the bit except where the two
compilers contract a multiply-add differently; that is unverified (no GPU here), and the op's tests hold
the kernel to a few units in the last place of the PyTorch path. Under Triton's interpreter (CPU tests)
``exp`` and ``tanh`` come from NumPy, because libdevice functions are stubs there.

Layout. ``g`` and ``u`` are [rows, cols] views with unit column stride and any row stride -- two separate
Linear outputs, or the two halves of one fused ``gate_up_proj`` output (row stride ``2 * cols``), read in
place. Outputs are written with their own row stride, so ``dg`` and ``du`` can land in the two halves of
one ``[rows, 2 * cols]`` gradient. Program (r, c) handles BLOCK columns of row r; offsets are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import launcher

BLOCK = 512  # common MLP widths (1536, 5632, 11008, 14336) are multiples of 512, not all of 1024
ACTIVATIONS = ("silu", "gelu_tanh")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), PyTorch's M_SQRT2 * M_2_SQRTPI * 0.5
_KAPPA = tl.constexpr(0.044715)

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _tanh(x):
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)


@triton.jit
def _rounded(v, ptr):
    """float32 ``v`` rounded to nearest-even in the element type of ``ptr``, back in float32. Spelled out for
    bfloat16: Triton's interpreter truncates float32 -> bfloat16 (a GPU and PyTorch round to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        v = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _act(x, GELU: tl.constexpr):
    if GELU:
        inner = _BETA * (x + _KAPPA * (x * x * x))
        y = 0.5 * x * (1.0 + _tanh(inner))
    else:
        y = tl.math.div_rn(x, 1.0 + _exp(-x))
    return y


@triton.jit
def _act_backward(dy, x, GELU: tl.constexpr):
    if GELU:
        x_sq = x * x
        inner = _BETA * (x + _KAPPA * (x_sq * x))
        t = _tanh(inner)
        left = 0.5 * x
        right = 1.0 + t
        left_derivative = 0.5 * right
        right_derivative = left * (1.0 - t * t) * (_BETA * (1.0 + 3.0 * _KAPPA * x_sq))
        dx = dy * (left_derivative + right_derivative)
    else:
        s = tl.math.div_rn(1.0, 1.0 + _exp(-x))
        dx = dy * s * (1.0 + x * (1.0 - s))
    return dx


@triton.jit
def gated_forward_kernel(g_ptr, u_ptr, h_ptr, cols, g_stride, u_stride, h_stride,
                         GELU: tl.constexpr, BLOCK: tl.constexpr):
    """h = act(g) * u, rounded as PyTorch's two kernels round (a, then h)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = c < cols
    g = tl.load(g_ptr + row * g_stride + c, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + c, mask=inside, other=0.0).to(tl.float32)
    a = _rounded(_act(g, GELU), g_ptr)
    h = _rounded(a * u, h_ptr)
    tl.store(h_ptr + row * h_stride + c, h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def gated_backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, cols, dh_stride, g_stride, u_stride,
                          dg_stride, du_stride, h_stride, GELU: tl.constexpr, STORE_H: tl.constexpr,
                          BLOCK: tl.constexpr):
    """dg = act'(g) * (dh * u), du = dh * act(g), and (STORE_H) h = act(g) * u, with PyTorch's roundings."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = c < cols
    dh = tl.load(dh_ptr + row * dh_stride + c, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + c, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + c, mask=inside, other=0.0).to(tl.float32)
    a = _rounded(_act(g, GELU), g_ptr)
    da = _rounded(dh * u, dg_ptr)
    dg = _rounded(_act_backward(da, g, GELU), dg_ptr)
    du = _rounded(dh * a, du_ptr)
    tl.store(dg_ptr + row * dg_stride + c, dg.to(dg_ptr.dtype.element_ty), mask=inside)
    tl.store(du_ptr + row * du_stride + c, du.to(du_ptr.dtype.element_ty), mask=inside)
    if STORE_H:
        h = _rounded(a * u, h_ptr)
        tl.store(h_ptr + row * h_stride + c, h.to(h_ptr.dtype.element_ty), mask=inside)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these [rows, cols] views: one dtype among float32/bfloat16/float16, unit
    column stride."""
    dtype = tensors[0].dtype
    return dtype in _DTYPES and all(t.dtype == dtype and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)
                                    for t in tensors)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(cols, BLOCK)


def forward(g: torch.Tensor, u: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(g) * u`` for [rows, cols] views ``g``, ``u`` (see ``supports``), into ``out`` (a new contiguous
    tensor by default)."""
    rows, cols = g.shape
    h = torch.empty((rows, cols), dtype=g.dtype, device=g.device) if out is None else out
    if rows and cols:
        launcher(gated_forward_kernel)[_grid(rows, cols)](
            g, u, h, cols, g.stride(0), u.stride(0), h.stride(0), GELU=activation == "gelu_tanh", BLOCK=BLOCK)
    return h


def backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, dg: torch.Tensor,
             du: torch.Tensor, h: torch.Tensor | None = None) -> None:
    """Write ``dg``, ``du`` (and ``h`` unless None) for [rows, cols] views, all of ``g``'s dtype."""
    rows, cols = g.shape
    if not (rows and cols):
        return
    store_h = h is not None
    h_arg = h if store_h else dg  # never written when STORE_H is false
    launcher(gated_backward_kernel)[_grid(rows, cols)](
        dh, g, u, dg, du, h_arg, cols, dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
        h_arg.stride(0), GELU=activation == "gelu_tanh", STORE_H=store_h, BLOCK=BLOCK)


def aot_specializations(full: bool = False) -> list[dict]:
    """The launches ``forward`` and ``backward`` make, for ahead-of-time compilation with
    ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90 | 80, 32))``: every
    dtype (float32, bfloat16, float16) and both activations, forward and backward (with and without ``h``)
    when ``full``; otherwise three representatives (the CI subset): bfloat16 SiLU forward and backward with
    ``h``, and float32 GELU-tanh backward without ``h`` (the other activation, dtype and ``STORE_H``).
    Strides and ``cols`` are i32 here (Triton's type for ints below 2**31). The dispatch uses one block size."""
    specs = []
    for dtype, ty in _DTYPES.items():
        for activation in ACTIVATIONS:
            gelu = activation == "gelu_tanh"
            p = f"*{ty}"
            specs.append({
                "name": f"gated_forward_{ty}_{activation}", "fn": gated_forward_kernel,
                "signature": {"g_ptr": p, "u_ptr": p, "h_ptr": p, "cols": "i32", "g_stride": "i32",
                              "u_stride": "i32", "h_stride": "i32", "GELU": "constexpr", "BLOCK": "constexpr"},
                "constexprs": {"GELU": gelu, "BLOCK": BLOCK}})
            for store_h in (True, False):
                specs.append({
                    "name": f"gated_backward_{ty}_{activation}{'_h' if store_h else ''}", "fn": gated_backward_kernel,
                    "signature": {"dh_ptr": p, "g_ptr": p, "u_ptr": p, "dg_ptr": p, "du_ptr": p, "h_ptr": p,
                                  "cols": "i32", "dh_stride": "i32", "g_stride": "i32", "u_stride": "i32",
                                  "dg_stride": "i32", "du_stride": "i32", "h_stride": "i32", "GELU": "constexpr",
                                  "STORE_H": "constexpr", "BLOCK": "constexpr"},
                    "constexprs": {"GELU": gelu, "STORE_H": store_h, "BLOCK": BLOCK}})
    if full:
        return specs
    subset = ("gated_forward_bf16_silu", "gated_backward_bf16_silu_h", "gated_backward_fp32_gelu_tanh")
    return [s for s in specs if s["name"] in subset]

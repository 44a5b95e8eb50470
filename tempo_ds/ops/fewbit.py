"""Few-bit activations: the exact activation forward, a b-bit code per element kept for backward.

Forward (x of any shape, fp32 / fp16 / bf16 / fp64)::

    y        = f(x)                              the PyTorch op itself (bit-identical to it)
    code[n]  = sum_j [x[n] > borders[j]]         which of the 2**b intervals x fell in, b = 1..4
    packed   = pack_bits(code, b)                exactly ceil(numel * b / 8) bytes

Backward::

    grad_in[n] = 0                               if level[code[n]] == 0
               = grad_out[n] * level[code[n]]    otherwise

where ``(borders, levels)`` is a table: a piecewise-constant approximation q of f' (optimal in the
weighted L2 sense, see ``tempo_ds.fewbit``). The order of the arithmetic is fixed, and the Triton kernel
(``tempo_ds.kernels.fewbit``) follows it exactly: x is compared in fp32 (fp64 for fp64 inputs) with the
borders rounded to fp32; the product is taken in fp32 (fp64), level as fp32, and rounded once to
grad_out's dtype - the "opmath" rule of PyTorch's own pointwise backward kernels. A zero level gives
an exact +0 gradient even for an inf or nan grad_out, as PyTorch's piecewise derivatives do (a select,
not a product). With these rules the exact 1-bit tables for ReLU, LeakyReLU, ReLU6 and Hardtanh give
PyTorch's gradients bit for bit. ReLU6 and Hardtanh use a "band" code, 1 strictly inside (lo, hi).

Special inputs: +inf falls in the last interval, -inf in the first. A nan input gives a nan output and
the last code: for ReLU that passes the gradient, as PyTorch's ReLU backward does (it tests the
output); for the band tables it means "inside", as PyTorch's Hardtanh backward does on CUDA and in its
scalar CPU loop (its vectorised CPU loop gives 0). LeakyReLU alone gives nan the code 0 (the slope), as
PyTorch does.

Saved for backward: the packed codes only, ceil(n * b / 8) bytes (bf16 GELU at 2 bits: 0.25 bytes per
element instead of PyTorch's 2). The table is a tuple of Python floats on ctx, its device copies cached.
Nothing is saved, and no code computed, when the input does not require grad or grad mode is off.

Where it pays (DESIGN.md section 6): the code replaces the activation's *input*; it frees memory only if
nothing else keeps that input. In ``Linear -> GELU -> Linear`` the first Linear's output is kept by
nobody but GELU, yet GELU's output is kept by the second Linear when that Linear's weight trains. So
against plain PyTorch few-bit GELU saves the 2 bytes of the GELU input and keeps the second Linear's
input, like in-place GELU (``tempo_ds.ops.inplace_gelu``), which is exact. It wins outright when the
second Linear is frozen (adapter / LoRA fine-tuning of the other weights): that Linear keeps nothing
for its weight's gradient, so the activation's footprint drops from 2 bytes (bf16 input) to b/8 bytes
per element - asserted with the meter in tests/test_fewbit_op.py.

The PyTorch path works on any device and runs in chunks of ``CHUNK`` elements, which bounds its
temporaries; it packs with uint8 / int32 arithmetic into exactly the layout of
``tempo_ds.ops._bits.pack_bits``. The Triton path handles fp16/bf16/fp32 on CUDA.

Custom ops: ``tempo_ds::fewbit_fwd(x, name, bits, borders, levels, band, nan_code) -> (y, packed)`` and
``tempo_ds::fewbit_bwd(grad, packed, levels, bits) -> grad_in``, the table passed as lists of floats: triton
ops (``tempo_ds.ops._library``: on CUDA torch.compile sees the kernel launches, elsewhere they call the opaque
``fewbit_fwd_opaque`` / ``fewbit_bwd_opaque``), joined by ``register_autograd``; both run with autocast off
(the activation is computed in x's dtype, as the ``torch.nn`` modules are on CPU). The output is always contiguous.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from tempo_ds.fewbit import functions, tables
from tempo_ds.ops._bits import packed_nbytes
from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops._library import LIB, device_constant, kernels_visible, no_autocast, triton_op

__all__ = ["fewbit", "FewBitFunction", "FewBitSpec", "resolve", "reference_backward"]

CHUNK = 1 << 20  # a multiple of 8: chunks start on whole packed bytes


class FewBitSpec(NamedTuple):
    """Everything the op needs to know about one activation + table, as hashable Python values."""

    name: str
    bits: int
    borders: tuple[float, ...]
    levels: tuple[float, ...]
    band: bool
    nan_code: int

    @property
    def params(self) -> tuple[float, float]:
        """Forward parameters of the exact variants: LeakyReLU's slope, Hardtanh's (lo, hi)."""
        if self.name == "leaky_relu":
            return self.levels[0], 0.0
        if self.band:
            return self.borders[0], self.borders[1]
        return 0.0, 0.0


def resolve(name: str, bits: int = 2, table=None) -> FewBitSpec:
    """Check ``name``/``bits``/``table`` and turn them into a :class:`FewBitSpec`.

    ``table=None`` takes the shipped table (``tempo_ds.fewbit.table(name, bits)``), resolved once per
    ``(name, bits)``; a given ``(borders, levels)`` must have ``2**bits`` levels and is read on the host
    each call (pass Python floats, or build a module once, to keep a training step free of reads).
    """
    if table is None:
        return _shipped(name, bits)
    return _resolve(name, bits, table)


_SHIPPED: dict = {}


def _shipped(name: str, bits: int) -> FewBitSpec:
    if (name, bits) not in _SHIPPED:
        _SHIPPED[name, bits] = _resolve(name, bits, None)
    return _SHIPPED[name, bits]


# A host constant: torch.compile calls it rather than tracing it (which would read the table's tensors). This is
# what torch.compiler.assume_constant_result sets; calling that would import torch._dynamo (and triton) with
# tempo_ds, seconds of import time and a triton imported before TRITON_INTERPRET can be set.
_shipped._dynamo_marked_constant = True


def _resolve(name: str, bits: int, table) -> FewBitSpec:
    act = functions.get(name)
    if not act.exact and bits not in range(1, 5):
        raise ValueError(f"bits={bits!r} is not supported; allowed values: 1..4")
    if table is None:
        table = tables.table(name, bits)
    borders = tuple(float(b) for b in torch.as_tensor(table[0], dtype=torch.float64).reshape(-1))
    levels = tuple(float(v) for v in torch.as_tensor(table[1], dtype=torch.float64).reshape(-1))
    if act.exact:
        if bits != 1 or len(levels) != 2 or len(borders) != (2 if act.band else 1):
            raise ValueError(f"{name} is exact with a 1-bit code: bits must be 1 and the table "
                             f"({2 if act.band else 1} borders, 2 levels), got bits={bits}, "
                             f"{len(borders)} borders, {len(levels)} levels")
    elif len(levels) != 2 ** bits or len(borders) != len(levels) - 1:
        raise ValueError(f"a {bits}-bit table has {2 ** bits} levels and {2 ** bits - 1} borders, got "
                         f"{len(levels)} levels and {len(borders)} borders")
    if any(not b < c for b, c in zip(borders, borders[1:])) or not all(map(math.isfinite, borders + levels)):
        raise ValueError("table borders must be finite and increasing, and levels finite")
    return FewBitSpec(name, bits, borders, levels, act.band, 0 if name == "leaky_relu" else len(levels) - 1)


_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return device_constant(values, dtype, device)


def _exact_forward(x: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    """The PyTorch op itself, with the exact variants' parameters read off their tables."""
    if spec.name == "leaky_relu":
        return torch.nn.functional.leaky_relu(x, spec.params[0])
    if spec.band:
        return torch.nn.functional.hardtanh(x, *spec.params)
    return functions.get(spec.name).forward(x)


def _codes(x: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    """Interval index (or band bit) of each element of the flat ``x``, as uint8.

    ``(K - 1) - sum_j [x <= b_j]`` is ``sum_j [x > b_j]`` for every number and K - 1 for nan.
    """
    xs = x.to(_opmath(x.dtype))
    b = _constant(spec.borders, xs.dtype, x.device)
    if spec.band:
        return ((xs <= b[0]) | (xs >= b[1])).logical_not_().view(torch.uint8)
    if spec.nan_code == 0:
        code = torch.zeros(xs.shape, dtype=torch.uint8, device=x.device)
        for j in range(b.numel()):
            code.add_((xs > b[j]).view(torch.uint8))
    else:
        code = torch.full(xs.shape, b.numel(), dtype=torch.uint8, device=x.device)
        for j in range(b.numel()):
            code.sub_((xs <= b[j]).view(torch.uint8))
    return code


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_bits(codes, bits)`` for contiguous uint8 codes, in whole-word int64 arithmetic.

    Eight codes, read as one little-endian int64 w (code k in byte k; every platform PyTorch runs on is
    little-endian), make the 8b-bit word sum_k ((w >> (8 - b) k) & (M << b k)), M = 2**b - 1, whose low
    b bytes are the packed group.
    """
    n = codes.numel()
    if n % 8:
        codes = torch.cat([codes, codes.new_zeros(8 - n % 8)])
    w = codes.view(torch.int64)
    mask = (1 << bits) - 1
    word = w & mask
    for k in range(1, 8):
        word |= (w >> ((8 - bits) * k)) & (mask << (bits * k))
    return word.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)[:packed_nbytes(n, bits)]


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``unpack_bits(packed, bits, n)`` as uint8, the inverse of :func:`_pack`."""
    groups = -(-n // 8)
    buf = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
    buf[:, :bits] = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())]).view(groups, bits)
    word = buf.view(torch.int64).view(-1)
    mask = (1 << bits) - 1
    codes = word & mask
    for k in range(1, 8):
        codes |= (word << ((8 - bits) * k)) & (mask << (8 * k))
    return codes.view(torch.uint8)[:n]


@functools.lru_cache(maxsize=256)
def _lookup_table(values: tuple, bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` per code, arranged for :func:`_per_element`: for 1, 2 or 4 bits [256, 8 // bits], the
    values of the codes packed in each possible byte (one lookup per byte); for 3 bits [2**3, 1]."""
    if 8 % bits:
        return _constant(values, dtype, device)[:, None]
    byte = torch.arange(256, device=device)[:, None]
    codes = (byte >> (bits * torch.arange(8 // bits, device=device))) & ((1 << bits) - 1)
    return _constant(values, dtype, device)[codes]


def _kernel_path(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype != torch.float64


def _triton_forward(x: torch.Tensor, spec: FewBitSpec, save: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    from tempo_ds.kernels import fewbit as kernel

    borders = _constant(spec.borders, torch.float32, x.device)
    y, packed = kernel.forward(x.contiguous(), spec.name, spec.params, borders, spec.band, spec.nan_code,
                               spec.bits, save)
    return y.view(x.shape), packed


def _triton_backward(grad: torch.Tensor, packed: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    from tempo_ds.kernels import fewbit as kernel

    levels = _constant(spec.levels, torch.float32, grad.device)
    return kernel.backward(grad.contiguous(), packed, levels, spec.bits).view(grad.shape)


def _forward(x: torch.Tensor, spec: FewBitSpec, save: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _kernel_path(x):
        return _triton_forward(x, spec, save)
    y = _exact_forward(x, spec)
    if not save:
        return y, None
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(packed_nbytes(n, spec.bits), dtype=torch.uint8, device=x.device)
    for start in range(0, n, CHUNK):
        chunk = _pack(_codes(flat[start:start + CHUNK], spec), spec.bits)
        first = start * spec.bits // 8
        packed[first:first + chunk.numel()] = chunk
    return y, packed


def _backward(grad: torch.Tensor, packed: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    if _kernel_path(grad):
        return _triton_backward(grad, packed, spec)
    levels = _constant(spec.levels, _opmath(grad.dtype), grad.device)
    flat = grad.reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=grad.dtype, device=grad.device)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        first = start * spec.bits // 8
        chunk = packed[first:first + packed_nbytes(count, spec.bits)]
        index = chunk.int() if 8 % spec.bits == 0 else _unpack(chunk, spec.bits, count).int()
        table = _lookup_table(spec.levels, spec.bits, levels.dtype, grad.device)
        scaled = torch.index_select(table, 0, index).view(-1)[:count]
        scaled.mul_(flat[start:start + count])          # in opmath: grad upcast exactly, one product
        if 0.0 in spec.levels:                          # a select, as PyTorch's piecewise derivatives: the
            bits_of = _INT[levels.dtype]                # product's bits AND 0 where the level is 0, else ~0
            keep = (tuple(0 if v == 0.0 else -1 for v in spec.levels), spec.bits, bits_of, grad.device)
            scaled.view(bits_of).bitwise_and_(torch.index_select(_lookup_table(*keep), 0, index).view(-1)[:count])
        out[start:start + count] = scaled               # one rounding to grad's dtype
    return out.view(grad.shape)


def reference_backward(grad: torch.Tensor, x: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    """The backward rule applied directly to ``x`` (no packing): what the op must equal bit for bit."""
    levels = _constant(spec.levels, _opmath(grad.dtype), grad.device)
    level = levels[_codes(x.reshape(-1), spec).long()].view(x.shape)
    product = grad.to(levels.dtype) * level
    return torch.where(level == 0, torch.zeros_like(product), product).to(grad.dtype)


def _spec(name, bits, borders, levels, band, nan_code) -> FewBitSpec:
    return FewBitSpec(name, bits, tuple(borders), tuple(levels), band, nan_code)


@torch.library.custom_op(f"{LIB}::fewbit_fwd_opaque", mutates_args=())
def _fwd_opaque(x: torch.Tensor, name: str, bits: int, borders: list[float], levels: list[float], band: bool,
                nan_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x) contiguous, packed codes)`` by the PyTorch path (or the interpreted kernel), opaque to
    torch.compile."""
    with no_autocast(x):
        y, packed = _forward(x, _spec(name, bits, borders, levels, band, nan_code), save=True)
        return y.contiguous(), packed


@_fwd_opaque.register_fake
def _(x, name, bits, borders, levels, band, nan_code):
    return x.new_empty(x.shape), x.new_empty(packed_nbytes(x.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op(f"{LIB}::fewbit_bwd_opaque", mutates_args=())
def _bwd_opaque(grad: torch.Tensor, packed: torch.Tensor, levels: list[float], bits: int) -> torch.Tensor:
    """``grad * level[code]`` by the PyTorch path (or the interpreted kernel), opaque to torch.compile."""
    with no_autocast(grad):
        return _backward(grad, packed, FewBitSpec("", bits, (), tuple(levels), False, 0)).contiguous()


@_bwd_opaque.register_fake
def _(grad, packed, levels, bits):
    return grad.new_empty(grad.shape)


def _kernels():
    from tempo_ds.kernels import fewbit as kernel

    return kernel._fewbit_fwd_kernel, kernel._fewbit_bwd_kernel


@triton_op(f"{LIB}::fewbit_fwd", kernels=_kernels)
def _fwd(x: torch.Tensor, name: str, bits: int, borders: list[float], levels: list[float], band: bool,
         nan_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x) contiguous, packed codes uint8 [ceil(n * bits / 8)])``: the kernel launch on CUDA (visible to
    torch.compile), the opaque op elsewhere."""
    if kernels_visible(x) and _kernel_path(x):
        with no_autocast(x):
            return _triton_forward(x, _spec(name, bits, borders, levels, band, nan_code), save=True)
    return _fwd_opaque(x, name, bits, borders, levels, band, nan_code)


@triton_op(f"{LIB}::fewbit_bwd", kernels=_kernels)
def _bwd(grad: torch.Tensor, packed: torch.Tensor, levels: list[float], bits: int) -> torch.Tensor:
    """``grad * level[code]`` (an exact 0 where the level is 0): grad's shape and dtype, contiguous."""
    if kernels_visible(grad) and _kernel_path(grad):
        with no_autocast(grad):
            return _triton_backward(grad, packed, FewBitSpec("", bits, (), tuple(levels), False, 0))
    return _bwd_opaque(grad, packed, levels, bits)


def _setup_context(ctx, inputs, output):
    ctx.levels, ctx.bits = inputs[4], inputs[2]
    ctx.save_for_backward(output[1])  # the packed codes only


def _grad(ctx, grad, _dpacked):
    (packed,) = ctx.saved_tensors
    return _bwd(grad, packed, ctx.levels, ctx.bits), None, None, None, None, None, None


torch.library.register_autograd(f"{LIB}::fewbit_fwd", _grad, setup_context=_setup_context)


def _apply(x: torch.Tensor, spec: FewBitSpec) -> torch.Tensor:
    """The custom op on ``x``: ``f(x)``, keeping the packed codes when autograd records it."""
    return _fwd(x, spec.name, spec.bits, list(spec.borders), list(spec.levels), spec.band, spec.nan_code)[0]


class FewBitFunction:
    """``FewBitFunction.apply(x, spec)``: ``f(x)`` through the custom op (kept for callers of the former
    autograd Function); saves the packed codes [ceil(n b / 8)] only."""

    apply = staticmethod(_apply)


def fewbit(x: torch.Tensor, name: str, bits: int = 2, table=None) -> torch.Tensor:
    """``f(x)`` for the activation ``name``, keeping a ``bits``-bit code per element for backward.

    ``name``: see ``tempo_ds.fewbit.FUNCTIONS`` (e.g. "gelu", "gelu_tanh", "silu"; "relu",
    "leaky_relu", "relu6", "hardtanh" are exact at bits=1). ``table``: ``(borders, levels)``, e.g. from
    ``tempo_ds.fewbit.solve`` or ``calibrate``; default the shipped optimal table.
    """
    spec = resolve(name, bits, table)
    if torch.is_grad_enabled() and x.requires_grad:
        return _apply(x, spec)
    return _forward(x, spec, save=False)[0]

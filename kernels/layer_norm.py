"""LayerNorm and RMSNorm in Triton, with a backward that starts from the *output* instead of the input.

This file follows Triton's tutorial *05-layer-norm* (one program per row in forward; a backward that
accumulates the weight gradients per block of rows and reduces them afterwards) and changes what the
backward reads, as Tempo (Andoorveedu et al., NeurIPS 2022, "in-place LayerNorm") proposed.

Forward, per row ``x`` of ``N`` elements, statistics in float32::

    LayerNorm:  mu = mean(x)       rstd = 1 / sqrt(mean((x - mu)^2) + eps)     xhat = (x - mu) * rstd
    RMSNorm:    mu = 0             rstd = 1 / sqrt(mean(x^2) + eps)             xhat = x * rstd
    y = xhat * w + b               (w, b optional; b only for LayerNorm)

RMSNorm has two rounding conventions. ``CAST_BEFORE_WEIGHT`` follows HuggingFace's ``LlamaRMSNorm``:
``xhat`` is rounded to the input dtype first and the product with ``w`` is rounded to the output dtype
(the promotion of input and weight dtypes). Without it, as ``torch.nn.functional.rms_norm``, everything is
computed in float32 and rounded once to the input dtype.

Backward. With ``g`` the incoming gradient and ``gw = g * w``, differentiating ``xhat`` gives::

    LayerNorm:  dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))
    RMSNorm:    dx = rstd * (gw - xhat * mean(gw * xhat))
    dw = sum over rows of g * xhat          db = sum over rows of g

Everything needs ``xhat``, not ``x``. The tutorial (and PyTorch) keep ``x`` and recompute ``xhat``;
the next Linear layer keeps ``y`` anyway, so keeping ``y`` plus one ``rstd`` per row and rebuilding
``xhat = (y - b) / w`` (``FROM_OUTPUT``) saves a whole activation. That fails in a column whose ``w`` is
zero, tiny next to ``b``, NaN or large enough to overflow (``tempo_ds.ops.layer_norm`` derives the rule).

The side buffer (``HAS_SIDE``). The caller ranks the columns on the device and picks ``K`` of them
(``IDX [K]``, ``K = max(8, N/64)``); their ``xhat`` is kept per row in ``SIDE [M, K]`` (x's dtype).

* Forward, after the row is normalised, reads the ``K`` columns ``x[row, IDX]`` again (from cache: the row
  was just loaded) and writes ``SIDE[row, :] = round((x[IDX] - mu) * rstd)``: the same float32 operations
  as the row's own ``xhat``, so it is that value rounded to x's dtype (exactly what ``CAST_BEFORE_WEIGHT``
  multiplies). A ``BLOCK_K``-wide gather costs ``K`` registers' worth, not a second ``N``-wide vector.
* Backward (``FROM_OUTPUT``) sees the choice as ``SLOT [N]`` int16 (``K <= 256`` for ``N <= 16384``):
  ``SLOT[j] = s`` when column ``j = IDX[s]`` is to be patched, ``-1`` otherwise, and uses per column::

      xhat_j = SIDE[row, SLOT[j]]       if SLOT[j] >= 0     (a masked gather: K of the N lanes load)
      xhat_j = (y_j - b_j) / w_j        otherwise

  The caller sets ``SLOT[j] = -1`` for kept columns whose weight obeys the rule, so well-conditioned weights
  give exactly the rebuilt gradients. ``tl.where`` selects, so the NaN of ``0/0`` in a patched column never
  reaches a sum. Every later formula (``c1 = mean(gw*xhat)``, ``c2 = mean(gw)``, ``dx``, ``dw += g*xhat``)
  takes the patched ``xhat``, so ``dx`` and ``dw`` are those of the true ``xhat`` to one rounding of it;
  ``db`` never needs ``xhat``. Cost per row: ``2*N`` bytes of slots read from cache (shared by all rows,
  like ``w`` and ``b``) and ``K`` side elements; no ``[M, N]`` temporary beyond ``dx``. (A separate pass
  over the ``K`` columns would avoid the slot read but must still keep the patched columns' ``0/0`` out of
  the row sums, i.e. know them per column in the row pass, and would write ``dx`` of those columns twice.)

With ``FROM_OUTPUT=False`` the kernel starts from the saved ``x`` and ``mean`` (PyTorch's saved set).

``dw`` and ``db`` are sums over all rows. Each of ``G`` programs walks a contiguous block of rows,
accumulates its partial sums in float32 registers and writes one row of a ``[G, N]`` buffer; the caller
sums the ``G`` rows. ``G`` is about two programs per streaming multiprocessor, so the buffer is a few
hundred rows, never ``[rows, N]`` (early Liger-Kernel RMSNorm releases allocate exactly that,
``dW = torch.zeros_like(X)``, which counts towards peak memory). ``dx`` goes to a new buffer rather than
over the incoming gradient, which autograd may still hold (``retain_grad``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tempo_ds.kernels._launch import launcher, multiprocessor_count
from tempo_ds.kernels._spec import POINTER, SHORT, spec

# One row must fit in one block: 64 KB of the widest dtype, as in the tutorial.
MAX_FUSED_N = 65536 // 4


@triton.jit
def _add(a, b):
    # ``tl.reduce(v, 0, _add)`` is ``tl.sum(v)``. ``tl.sum`` and ``tl.zeros`` are themselves ``@triton.jit``
    # functions, bound to the compiler or to the interpreter once, when triton is first imported; using
    # only builtins lets this file run under the interpreter whenever it is imported with TRITON_INTERPRET=1.
    return a + b


@triton.jit
def _norm_fwd_kernel(X, Y, W, B, MEAN, RSTD, SIDE, IDX, stride_x, stride_y, N, K, eps,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     CAST_BEFORE_WEIGHT: tl.constexpr, STORE_MEAN: tl.constexpr, HAS_SIDE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if RMS:
        mean = 0.0
        var = tl.reduce(x * x, 0, _add) / N
    else:
        mean = tl.reduce(x, 0, _add) / N
        centred = tl.where(inside, x - mean, 0.0)
        var = tl.reduce(centred * centred, 0, _add) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = (x - mean) * rstd
    if CAST_BEFORE_WEIGHT:
        y = y.to(X.dtype.element_ty).to(tl.float32)
    if HAS_W:
        y = y * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    if HAS_SIDE:
        # the K kept columns again, from cache: (x - mean) * rstd as above, rounded once to x's dtype
        ks = tl.arange(0, BLOCK_K)
        kept = ks < K
        idx = tl.load(IDX + ks, mask=kept, other=0)
        xk = tl.load(X + row * stride_x + idx, mask=kept, other=0.0).to(tl.float32)
        tl.store(SIDE + row * K + ks, ((xk - mean) * rstd).to(SIDE.dtype.element_ty), mask=kept)
    tl.store(RSTD + row, rstd)
    if STORE_MEAN:
        tl.store(MEAN + row, mean)


@triton.jit
def _norm_bwd_kernel(DY, DX, SRC, W, B, MEAN, RSTD, SIDE, SLOT, DW_PART, DB_PART, M, N, K, rows_per_program,
                     stride_dy, stride_dx, stride_src,
                     RMS: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_SIDE: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    dw_acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    db_acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        src = tl.load(SRC + row * stride_src + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        # w and b are read again for every row (from cache) rather than held in registers across the loop:
        # at 16384 columns the two float32 accumulators already fill most of a thread's registers.
        w = 1.0
        b = 0.0
        if HAS_W:
            w = tl.load(W + cols, mask=inside, other=1.0).to(tl.float32)
        if HAS_B and FROM_OUTPUT:
            b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        if FROM_OUTPUT:
            xhat = (src - b) / w
            if HAS_SIDE:
                # like w and b, the slots are re-read per row (from cache) rather than held in registers
                slot = tl.load(SLOT + cols, mask=inside, other=-1).to(tl.int32)
                patched = inside & (slot >= 0)
                kept = tl.load(SIDE + row * K + slot, mask=patched, other=0.0).to(tl.float32)
                xhat = tl.where(patched, kept, xhat)
        elif RMS:
            xhat = src * rstd
        else:
            xhat = (src - tl.load(MEAN + row)) * rstd
        xhat = tl.where(inside, xhat, 0.0)
        g = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        gw = g * w
        c1 = tl.reduce(gw * xhat, 0, _add) / N
        if RMS:
            dx = (gw - xhat * c1) * rstd
        else:
            c2 = tl.reduce(gw, 0, _add) / N
            dx = (gw - c2 - xhat * c1) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
        if PARTIALS and HAS_W:
            dw_acc += g * xhat
        if PARTIALS and HAS_B:
            db_acc += g
    if PARTIALS and HAS_W:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=inside)
    if PARTIALS and HAS_B:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=inside)


def _launch(n: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of ``n`` elements, as in the tutorial; the backward of the widest rows
    takes 16 warps: at 8 its per-thread share of the row (64 columns of dw, db, the row and its gradient)
    spills 0.3-0.7 KB of registers per thread, at 16 about a third of that (``tempo-ds aot``)."""
    block = max(triton.next_power_of_2(n), 16)
    if backward and block >= MAX_FUSED_N:
        return block, 16
    return block, min(max(block // 256, 1), 8)


def _programs(m: int, device: torch.device) -> int:
    """Backward programs: about two per streaming multiprocessor (a few under the CPU interpreter)."""
    if device.type == "cuda":
        return max(1, min(m, 2 * multiprocessor_count(device)))
    return max(1, min(m, 4))


def side_slots(idx: torch.Tensor, n: int, patch: torch.Tensor | None = None) -> torch.Tensor:
    """``SLOT [n]`` int16 for the backward kernel: ``s`` at column ``idx[s]``, ``-1`` elsewhere, and ``-1`` too where
    ``patch`` ([len(idx)] bool, optional) is False. Device operations over ``n`` elements, nothing read on the
    host."""
    k = idx.numel()
    if k > 2**15 - 1:
        raise ValueError(f"{k} side columns do not fit int16 slots (at most 32767; N <= {MAX_FUSED_N} gives 256)")
    pos = torch.arange(k, dtype=torch.int16, device=idx.device)
    if patch is not None:
        pos = torch.where(patch, pos, -1)
    return torch.full((n,), -1, dtype=torch.int16, device=idx.device).scatter_(0, idx, pos)


def _block_k(k: int) -> int:
    return max(triton.next_power_of_2(k), 16)


def norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                 rms: bool, out_dtype: torch.dtype, cast_before_weight: bool = False, store_mean: bool = False,
                 side: torch.Tensor | None = None, idx: torch.Tensor | None = None):
    """Normalise the rows of ``x`` ([M, N], contiguous rows).

    Returns ``(y [M, N] out_dtype, mean [M] float32 or None, rstd [M] float32)``; ``mean`` only when
    ``store_mean`` (LayerNorm whose backward will start from ``x``). With ``side`` ([M, K], contiguous) and
    ``idx`` ([K] int64 columns) the kernel also writes ``xhat`` of the columns ``idx`` into ``side``.
    """
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device) if store_mean else None
    has_side = side is not None and side.shape[1] > 0
    if m:
        block, warps = _launch(n)
        launcher(_norm_fwd_kernel)[(m,)](
            x, y, weight if weight is not None else rstd, bias if bias is not None else rstd,
            mean if store_mean else rstd, rstd, side if has_side else x, idx if has_side else rstd,
            x.stride(0), y.stride(0), n, side.shape[1] if has_side else 0, eps,
            RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, CAST_BEFORE_WEIGHT=cast_before_weight,
            STORE_MEAN=store_mean, HAS_SIDE=has_side, BLOCK_N=block,
            BLOCK_K=_block_k(side.shape[1]) if has_side else 1, num_warps=warps)
    return y, mean, rstd


def norm_backward(grad: torch.Tensor, src: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  mean: torch.Tensor | None, rstd: torch.Tensor, *, rms: bool, from_output: bool,
                  x_dtype: torch.dtype, need_weight_grads: bool, side: torch.Tensor | None = None,
                  slot: torch.Tensor | None = None):
    """Gradients of ``norm_forward``.

    ``src`` ([M, N]) is the saved output ``y`` when ``from_output`` (``xhat = (y - b) / w``, or
    ``side[:, slot[j]]`` where ``slot[j] >= 0`` when ``side`` [M, K] and ``slot`` [N] are given), else the
    saved input ``x`` (``xhat = (x - mean) * rstd``). Returns ``(dx [M, N] x_dtype, dw [N] float32 or
    None, db [N] float32 or None)``; ``dw`` (``db``) only when ``need_weight_grads`` and there is a
    weight (bias).
    """
    m, n = src.shape
    grad = grad.contiguous()
    dx = torch.empty((m, n), dtype=x_dtype, device=src.device)
    programs = _programs(m, src.device)
    need_dw, need_db = need_weight_grads and weight is not None, need_weight_grads and bias is not None
    has_side = from_output and side is not None and side.shape[1] > 0

    def partial_sums(needed):
        # zeros, not empty: with no rows no program writes them
        return torch.zeros((programs, n), dtype=torch.float32, device=src.device) if needed else rstd

    dw_part, db_part = partial_sums(need_dw), partial_sums(need_db)
    if m:
        block, warps = _launch(n, backward=True)
        launcher(_norm_bwd_kernel)[(programs,)](
            grad, dx, src, weight if weight is not None else rstd, bias if bias is not None else rstd,
            mean if mean is not None else rstd, rstd, side.contiguous() if has_side else src,
            slot if has_side else rstd, dw_part, db_part, m, n, side.shape[1] if has_side else 0,
            triton.cdiv(m, programs), grad.stride(0), dx.stride(0), src.stride(0),
            RMS=rms, FROM_OUTPUT=from_output, HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_SIDE=has_side, PARTIALS=need_dw or need_db, BLOCK_N=block, num_warps=warps)
    return dx, dw_part.sum(0) if need_dw else None, db_part.sum(0) if need_db else None


HIDDEN_SIZES = (256, 1024, 4096, MAX_FUSED_N)  # one per BLOCK_N the CI subset or the full matrix compiles


def _side_k(n):
    return max(8, -(-n // 64))  # tempo_ds.ops.layer_norm.side_columns for an affine norm of n >= 8 columns


def _forward_spec(n, dtype, *, rms, cast_before_weight=False, store_mean=False, side=True, w_dtype=None):
    block, warps = _launch(n)
    ptr, w_ptr = POINTER[dtype], POINTER[w_dtype or dtype]
    kind = "rms" if rms else "ln"
    k = _side_k(n)
    return spec(f"layer_norm.fwd[{kind},n{block},{SHORT[dtype]}" + (",cast_before_weight" if cast_before_weight else "")
                + (",mean" if store_mean else "") + (",side" if side else "") + "]", _norm_fwd_kernel,
                {"X": ptr, "Y": ptr, "W": w_ptr, "B": w_ptr, "MEAN": "*fp32", "RSTD": "*fp32", "SIDE": ptr,
                 "IDX": "*i64", "stride_x": "i32", "stride_y": "i32", "N": "i32", "K": "i32", "eps": "fp32"},
                dict(RMS=rms, HAS_W=True, HAS_B=not rms, CAST_BEFORE_WEIGHT=cast_before_weight, STORE_MEAN=store_mean,
                     HAS_SIDE=side, BLOCK_N=block, BLOCK_K=_block_k(k) if side else 1), num_warps=warps,
                divisible_by_16=("stride_x", "stride_y", "N") + (("K",) if side and k % 16 == 0 else ()))


def _backward_spec(n, dtype, *, rms, from_output, w_dtype=None):
    """From the output always with the side buffer (the op keeps one whenever the norm is affine)."""
    block, warps = _launch(n, backward=True)
    ptr, w_ptr = POINTER[dtype], POINTER[w_dtype or dtype]
    kind = "rms" if rms else "ln"
    k = _side_k(n)
    return spec(f"layer_norm.bwd[{kind},n{block},{SHORT[dtype]},from_" + ("output" if from_output else "input") + "]",
                _norm_bwd_kernel,
                {"DY": ptr, "DX": ptr, "SRC": ptr, "W": w_ptr, "B": w_ptr, "MEAN": "*fp32", "RSTD": "*fp32",
                 "SIDE": ptr, "SLOT": "*i16", "DW_PART": "*fp32", "DB_PART": "*fp32", "M": "i32", "N": "i32",
                 "K": "i32", "rows_per_program": "i32", "stride_dy": "i32", "stride_dx": "i32", "stride_src": "i32"},
                dict(RMS=rms, FROM_OUTPUT=from_output, HAS_W=True, HAS_B=not rms, HAS_SIDE=from_output, PARTIALS=True,
                     BLOCK_N=block),
                num_warps=warps, divisible_by_16=("N", "stride_dy", "stride_dx", "stride_src")
                + (("K",) if from_output and k % 16 == 0 else ()))


def aot_specializations(full: bool = False, arch: int = 90) -> list[dict]:
    """LayerNorm and RMSNorm forward (writing the side buffer, or keeping the mean, or neither: ``no_grad``) and
    backward (from the output with the side buffer, and from the input) at every BLOCK_N of ``HIDDEN_SIZES`` (up
    to the fused maximum, 16384) for fp32/bf16/fp16 (``full``), or the widest rows in bf16 plus a few narrower
    ones."""
    if not full:
        return [_forward_spec(MAX_FUSED_N, torch.bfloat16, rms=False),
                _backward_spec(MAX_FUSED_N, torch.bfloat16, rms=False, from_output=True),
                _backward_spec(MAX_FUSED_N, torch.bfloat16, rms=True, from_output=False),
                _forward_spec(4096, torch.float16, rms=True, cast_before_weight=True),
                _backward_spec(1024, torch.float32, rms=False, from_output=False)]
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in HIDDEN_SIZES:
            out += [_forward_spec(n, dtype, rms=False), _forward_spec(n, dtype, rms=False, store_mean=True, side=False),
                    _forward_spec(n, dtype, rms=False, side=False), _forward_spec(n, dtype, rms=True),
                    _forward_spec(n, dtype, rms=True, cast_before_weight=True)]
            out += [_backward_spec(n, dtype, rms=rms, from_output=fo) for rms in (False, True) for fo in (True, False)]
    return out

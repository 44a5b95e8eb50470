"""In-place LayerNorm: the backward starts from the output ``y``, which the next Linear keeps anyway.

Forward (statistics in float32 for float16/bfloat16/float32 inputs, float64 for float64), per row of the
``N = prod(normalized_shape)`` trailing elements::

    mu = mean(x)    rstd = 1 / sqrt(mean((x - mu)^2) + eps)    xhat = (x - mu) * rstd    y = xhat * w + b

Backward, with ``gw = g * w``::

    dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))    dw = sum_rows g * xhat    db = sum_rows g

PyTorch keeps ``x``, ``mu`` and ``rstd``. This op keeps ``y`` and ``rstd`` and rebuilds
``xhat = (y - b) / w`` (Tempo, Andoorveedu et al. 2022), plus a small side buffer for the columns where
that fails (below). The ``M*N`` bytes of ``y`` are shared with the Linear that follows, so the LayerNorm
costs its ``rstd`` and the side buffer, about ``N/64`` of ``y``. (The weight and bias are kept too, as
Parameter objects: no bytes.)

When the output does not determine ``xhat``
-------------------------------------------
``y`` is rounded to its dtype: ``|dy| <= u*|y|`` (``u`` = unit roundoff) down to the subnormal range,
where the absolute error is at most ``u*tiny`` (``tiny`` = smallest normal number). So the rebuilt value
errs by::

    |d xhat_j| <= u*|xhat_j| + u*|b_j|/|w_j| + u*tiny/|w_j|

The first term is the error of rounding ``xhat`` itself, the floor any saved low-precision activation
has. The other two are amplification: ``w_j = 0`` gives 0/0 (Tempo's released code turns every
gradient of the row into NaN), and a ``w_j`` small next to ``b_j`` cancels ``y_j - b_j`` (Tempo's lost
accuracy for small weights in float16). Column ``j`` is *good* when::

    |w_j| >= tiny        and        |b_j| <= BIAS_RATIO_LIMIT * |w_j|        (BIAS_RATIO_LIMIT = 1)

and no ``|y_j|`` can overflow (``|w_j|*sqrt(N) + |b_j| <= max``, since ``|xhat| <= sqrt(N)``). The bound is
relative to ``b_j``, not to ``max|w|``: with ``b = 0`` any non-zero normal ``w_j`` divides out exactly
(``y_j/w_j`` errs by ``u``), while ``|b_j|/|w_j|`` of 2 already doubles the error. Measured against the
correctly rounded float16/bfloat16 gradients (4096 rows x 256, ``w`` in [0.5, 1.5]): at ``|b|/|w| = 1``
the weight gradient errs 1.0-1.6x as much, at 2 up to 2.0x, at 4 about 3x, at 8 about 7x; the input
gradient stays within 1.3x throughout (its ``xhat`` term is multiplied by ``mean(gw*xhat)``, and the
``y - b`` error cancels in ``gw*xhat = g*(y - b)``). Limit 1 keeps every gradient within 2x.

Bad columns without a host sync: the side buffer
------------------------------------------------
Which columns are bad is a device value; deciding on the host what to keep would be a device-to-host
sync on every call, and the kept set would depend on a device value (DESIGN.md section 5, rules 9-10).
No scheme without a sync can be exact for every weight and keep fewer bytes than ``x``: a column with
``w_j = 0`` outputs ``b_j`` whatever ``x`` holds, so ``y`` carries nothing about it, yet ``dw_j =
sum_rows g*xhat_j`` needs every ``xhat_j``; a fixed saved set that covers ``w = 0`` everywhere is ``x``
itself. So the op keeps, whatever the weight (shapes only decide it)::

    y [M, N]  (shared with the next Linear)     rstd [M]  (statistics dtype)
    side [M, K]  (x's dtype)                   idx [K]  (int64)        K = side_columns(N)

``idx`` are the ``K`` worst columns, ranked on the device by ``(|b_j| + tiny)/|w_j|`` (infinite for NaN
weights and for columns whose output may overflow) with ``topk``, and ``side`` holds ``xhat`` of those
columns, rounded to ``x``'s dtype. Backward rebuilds ``xhat = (y - b)/w`` and replaces, with
``torch.where`` on the device, the columns of ``idx`` that break the rule by their kept ``xhat``
(``K = min(N, max(SIDE_MIN, ceil(N / SIDE_FRACTION)))``, ``SIDE_MIN = 8``, ``SIDE_FRACTION = 64``).

* At most ``K`` bad columns (a few zero or tiny weights, weights small next to their bias, NaN weights,
  weights large enough to overflow): every column's ``xhat`` is known to one rounding of the output
  dtype, and the gradients keep the accuracy stated below (within 2x of PyTorch's own error).
* More than ``K`` bad columns: the ``K`` worst are exact as above; every other column ``j`` has a score
  no larger than the ``(K+1)``-th largest, ``s_(K+1)``, so its rebuilt ``xhat`` errs by at most
  ``u*|xhat| + u*s_(K+1)``: finite while fewer than ``K + 1`` weights are zero, NaN in the affected
  rows' gradients (loud, never silently wrong) when more are. ``keep_input=True`` keeps ``x`` and the
  mean instead, PyTorch's saved set, exact for any weight (e.g. a zero-initialised weight).

Cost: ``M*K`` elements of ``x``'s dtype plus ``8*K`` bytes per call, about ``N/64`` of ``y``'s bytes
(``2*K`` bytes per row in 16 bits: 32 bytes at ``N = 1024``, 128 at 4096 -- 1.6% of ``y``; ``K = 8``
below ``N = 512``); the statistics of the old fallback (``x`` and the mean, ``M*N`` elements) are never
kept. Forward adds a ``topk`` over ``N`` and a gather of ``M*K`` elements; backward a ``where`` over
``M*K``. On the Triton path (``tempo_ds.kernels.layer_norm``) the forward kernel writes ``side`` itself
(the ``K`` columns re-read from cache) and the backward kernel reads ``y`` and patches the bad kept columns
from ``side`` per row (an int16 slot per column, computed on the device from ``idx`` and the rule), so no
``[M, N]`` temporary besides ``dx`` exists in either direction. Bytes kept for backward, for ``M`` rows: ``M*N*e + M*4 + M*K*e + 8*K`` (``e`` = x's element
size), of which the ``M*N*e`` part is shared with the Linear that follows.

Accuracy. Within the rule the one error this op adds is the rebuilt ``xhat``'s, at most about one unit
roundoff per element; summed over rows it reaches the weight gradient as about one more unit roundoff
of ``|dw|``. Max abs error against float64, as a ratio to PyTorch's CPU op (2048 x 1024, weights in
+-[0.5, 1.5], biases in [-0.5, 0.5]): float32 y 1.00, dx 0.94, dw 1.02, db 1.00; float16 dx 0.46, dw
0.04; bfloat16 dx 0.47, dw 0.06 (PyTorch's CPU kernel rounds its statistics to 16 bits). As a ratio to
the correctly rounded result instead, float16/bfloat16 dx is 1.01 and dw 1.02-1.10 at that size, and dw
up to 3x on small shapes (13-512 rows x 37), where a correctly rounded result can be luckily exact.

The ops: ``tempo_ds::inplace_layer_norm_fwd`` and ``_bwd``, triton ops joined by ``register_autograd``
(``tempo_ds.ops._library``): on CUDA torch.compile sees the column ranking and the kernel launches, elsewhere
they call the opaque ``_fwd_opaque`` / ``_bwd_opaque`` (aten's fused kernels, numerics pinned). Nothing in forward or
backward reads a device value on the host, so ``torch.compile(fullgraph=True)`` and ``torch.export``
trace through. Under ``no_grad`` (e.g. a reentrant checkpoint's first pass) nothing is ranked, gathered
or saved.

Autocast: CUDA autocast runs ``layer_norm`` in float32, CPU autocast leaves it alone; this op does the
same (the wrapper casts to float32 before the op), so it returns the dtype ``torch.nn.functional.layer_norm``
would. As with any op that keeps its output (``torch.sigmoid``, ``torch.exp``), modifying ``y`` in place
before backward makes autograd raise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops._library import LIB, kernels_visible, no_autocast, triton_op
from tempo_ds.ops._zero import gathered, held_parameters, hold_parameters

__all__ = ["inplace_layer_norm", "output_is_invertible", "column_scores", "side_columns", "BIAS_RATIO_LIMIT",
           "SIDE_MIN", "SIDE_FRACTION"]

BIAS_RATIO_LIMIT = 1.0
SIDE_MIN, SIDE_FRACTION = 8, 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and backward are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def side_columns(n: int, affine: bool) -> int:
    """``K``, the columns whose ``xhat`` the side buffer keeps: 0 without weight and bias (``xhat = y``)."""
    return min(n, max(SIDE_MIN, -(-n // SIDE_FRACTION))) if affine else 0


def column_scores(weight: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, bad)`` per column, on the weight's device, nothing read on the host.

    ``bad``: the rule of the module docstring fails (``|w| < tiny``, ``|b| > BIAS_RATIO_LIMIT*|w|``, a
    possible overflow, NaN). ``score = (|b| + tiny)/|w|``, infinite where the output may overflow or the
    weight is NaN: the bound on the amplification of the rebuild error, by which the side buffer ranks.
    """
    like = weight if weight is not None else bias
    info, acc = torch.finfo(out_dtype), acc_dtype(out_dtype)
    cols = like.numel()
    w = (weight.detach().reshape(-1).abs().to(acc) if weight is not None
         else torch.ones(cols, dtype=acc, device=like.device))
    b = (bias.detach().reshape(-1).abs().to(acc) if bias is not None
         else torch.zeros(cols, dtype=acc, device=like.device))
    fits = w * math.sqrt(n) + b <= info.max  # False for NaN too, as every comparison below
    # methods, not the operators ~ and &: their Python bindings take a device guard, which a CUDA launch traced
    # on a host without CUDA (tests/test_triton_op.py) cannot have
    bad = (w >= info.tiny).logical_and_(b <= BIAS_RATIO_LIMIT * w).logical_and_(fits).logical_not_()
    score = torch.where(fits, (b + info.tiny) / w, math.inf).nan_to_num_(nan=math.inf)
    return score, bad


def output_is_invertible(weight: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                         n: int) -> bool:
    """Diagnostic (reads the device on the host; the op never calls it): whether every column of an output
    of ``out_dtype`` gives back ``xhat = (y - b)/w`` about as accurately as rounding ``xhat`` itself, so that
    no column needs the side buffer (module docstring)."""
    if weight is None and bias is None:
        return True
    return not bool(column_scores(weight, bias, out_dtype, n)[1].any())


def fits_kernel(x: torch.Tensor, n: int) -> bool:
    """Whether rows of ``n`` elements of ``x`` go to the Triton kernel (``use_triton`` and a row fits a block)."""
    if not use_triton(x) or x.dtype == torch.float64:
        return False
    from tempo_ds.kernels import layer_norm as kernel

    return n <= kernel.MAX_FUSED_N


def _as_acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _torch_forward(x, shape, weight, bias, eps):
    """``(y, mean, rstd)`` from aten's fused kernel, statistics in ``acc_dtype(x.dtype)``."""
    acc = acc_dtype(x.dtype)
    w, b = _as_acc(weight, acc), _as_acc(bias, acc)
    if x.dtype == acc:
        return torch.native_layer_norm(x, shape, w, b, eps)
    if x.device.type == "cpu":
        # the CPU kernel for 16-bit input with a float32 weight returns float32 statistics (with a 16-bit
        # weight, or none, it rounds them to 16 bits)
        w = w if w is not None else torch.ones(shape, dtype=acc, device=x.device)
        return torch.native_layer_norm(x, shape, w, b, eps)
    y, mean, rstd = torch.native_layer_norm(x.to(acc), shape, w, b, eps)
    return y.to(x.dtype), mean, rstd


def rebuild_xhat(y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """``(y - b) / w`` in ``acc`` (``w``, ``b`` already in it), always a new tensor. ``y`` is converted
    first: on CPU, arithmetic mixing 16-bit and float32 tensors is tens of times slower than either."""
    y = y.to(acc)
    if w is None:
        return y.clone() if b is None else y - b
    return y / w if b is None else torch.addcmul(-b / w, y, w.reciprocal())


def side_columns_of(x2: torch.Tensor, weight, bias, out_dtype: torch.dtype, k: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``(side [M, k] uninitialised in x's dtype, idx [k] int64)``: the ``k`` worst-scored columns, ranked on
    the device, for rows ``x2`` [M, N]; the Triton forward fills ``side`` itself."""
    side = x2.new_empty((x2.shape[0], k))
    if k == 0:
        return side, torch.empty(0, dtype=torch.int64, device=x2.device)
    score, _ = column_scores(weight, bias, out_dtype, x2.shape[1])
    return side, torch.topk(score, k, sorted=False).indices


def side_buffer(x2: torch.Tensor, weight, bias, out_dtype: torch.dtype, k: int, xhat_of) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """``(side [M, k] in x's dtype, idx [k] int64)``: ``xhat`` of the ``k`` worst-scored columns of the rows
    ``x2`` [M, N]; ``xhat_of(columns)`` turns those columns of ``x2`` into ``xhat`` (statistics dtype)."""
    _, idx = side_columns_of(x2, weight, bias, out_dtype, k)
    if k == 0:
        return x2.new_empty((x2.shape[0], 0)), idx
    return xhat_of(x2.index_select(1, idx)).to(x2.dtype), idx


def patch_xhat(xhat: torch.Tensor, side: torch.Tensor, idx: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Replace in ``xhat`` [M, N] (in place) the columns of ``idx`` that ``bad`` [N] marks by ``side``."""
    if idx.numel():
        cols = idx.expand(xhat.shape[0], idx.numel())
        kept = torch.where(bad.index_select(0, idx), side.to(xhat.dtype), torch.gather(xhat, 1, cols))
        xhat.scatter_(1, cols, kept)  # several times faster on CPU than index_copy_ along dim 1
    return xhat


def _stat_shape(x: torch.Tensor, k: int) -> tuple[int, ...]:
    """aten's shape for statistics of ``x`` normalised over its last ``k`` dimensions."""
    return (*x.shape[:x.dim() - k], *([1] * k))


SAVES = ("none", "output", "input")


def _triton_forward(x, weight, bias, n: int, eps: float, save: str, k: int):
    """``(y, mean, rstd, side, idx)`` from the kernel, which writes the side buffer itself."""
    from tempo_ds.kernels import layer_norm as kernel

    x2 = x.reshape(-1, n)
    side, idx = side_columns_of(x2, weight, bias, x.dtype, k)
    y2, mean, rstd = kernel.norm_forward(
        x2.contiguous(), None if weight is None else weight.reshape(n), None if bias is None else bias.reshape(n),
        eps, rms=False, out_dtype=x.dtype, store_mean=save == "input", side=side, idx=idx)
    return y2.view(x.shape), (mean if save == "input" else rstd.new_empty(0)), rstd, side, idx


@torch.library.custom_op(f"{LIB}::inplace_layer_norm_fwd_opaque", mutates_args=())
def _fwd_opaque(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                normalized_shape: list[int], eps: float,
                save: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_fwd`` by aten's kernels (or the interpreted Triton kernel), opaque to torch.compile."""
    n = math.prod(normalized_shape)
    k = side_columns(n, weight is not None or bias is not None) if save == "output" else 0
    with no_autocast(x):
        if fits_kernel(x, n):
            return _triton_forward(x, weight, bias, n, eps, save, k)
        x2 = x.reshape(-1, n)
        y, mean, rstd = _torch_forward(x, normalized_shape, weight, bias, eps)
        y = y.contiguous()
        rstd = rstd.reshape(-1)
        mean = mean.reshape(-1)
        side, idx = side_buffer(x2, weight, bias, x.dtype, k,
                                lambda cols: (cols.to(rstd.dtype) - mean[:, None]) * rstd[:, None])
        return y, (mean if save == "input" else rstd.new_empty(0)), rstd, side, idx


@_fwd_opaque.register_fake
def _(x, weight, bias, normalized_shape, eps, save):
    n = math.prod(normalized_shape)
    m = math.prod(x.shape[:x.dim() - len(normalized_shape)])
    k = side_columns(n, weight is not None or bias is not None) if save == "output" else 0
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((m if save == "input" else 0,), dtype=acc),
            x.new_empty((m,), dtype=acc), x.new_empty((m, k)), x.new_empty((k,), dtype=torch.int64))


def _kernels():
    from tempo_ds.kernels import layer_norm as kernel

    return kernel._norm_fwd_kernel, kernel._norm_bwd_kernel


@triton_op(f"{LIB}::inplace_layer_norm_fwd", kernels=_kernels)
def _fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalized_shape: list[int],
         eps: float, save: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd, side, idx)``: y contiguous of x's shape and dtype; rstd [M]; mean [M] only when
    ``save == "input"`` (else [0]); side [M, K] and idx [K] only when ``save == "output"`` (else K = 0). On CUDA
    the column ranking and the kernel launch themselves (visible to torch.compile), elsewhere the opaque op."""
    n = math.prod(normalized_shape)
    if kernels_visible(x) and fits_kernel(x, n):
        k = side_columns(n, weight is not None or bias is not None) if save == "output" else 0
        with no_autocast(x):
            return _triton_forward(x, weight, bias, n, eps, save, k)
    return _fwd_opaque(x, weight, bias, normalized_shape, eps, save)


def _triton_backward(grad, src, mean, rstd, side, idx, weight, bias, normalized_shape, needs):
    """[dx, dweight, dbias] from the kernel, which patches the bad kept columns from ``side`` itself."""
    from tempo_ds.kernels import layer_norm as kernel

    need_x, need_w, need_b = needs
    shape, n = tuple(normalized_shape), math.prod(normalized_shape)
    from_output = mean is None
    slot = None
    if from_output and idx.numel():
        slot = kernel.side_slots(idx, n, column_scores(weight, bias, src.dtype, n)[1].index_select(0, idx))
    dx, dw, db = kernel.norm_backward(
        grad.reshape(-1, n), src.reshape(-1, n).contiguous(), None if weight is None else weight.reshape(n),
        None if bias is None else bias.reshape(n), mean, rstd, rms=False, from_output=from_output,
        x_dtype=src.dtype, need_weight_grads=need_w or need_b, side=side, slot=slot)
    return [dx.view(src.shape) if need_x else grad.new_empty(0),
            dw.view(shape).to(weight.dtype) if need_w else grad.new_empty(0),
            db.view(shape).to(bias.dtype) if need_b else grad.new_empty(0)]


@torch.library.custom_op(f"{LIB}::inplace_layer_norm_bwd_opaque", mutates_args=())
def _bwd_opaque(grad: torch.Tensor, src: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor,
                side: torch.Tensor, idx: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                normalized_shape: list[int], needs: list[bool]) -> list[torch.Tensor]:
    """``_bwd`` by aten's kernels (or the interpreted Triton kernel), opaque to torch.compile."""
    need_x, need_w, need_b = needs
    shape, n = tuple(normalized_shape), math.prod(normalized_shape)
    from_output = mean is None
    acc = rstd.dtype
    with no_autocast(grad), gathered(weight, bias):
        if fits_kernel(src, n):
            return _triton_backward(grad, src, mean, rstd, side, idx, weight, bias, normalized_shape, needs)
        if from_output:
            xhat = rebuild_xhat(src.reshape(-1, n), None if weight is None else weight.reshape(n).to(acc),
                                None if bias is None else bias.reshape(n).to(acc), acc)
            if idx.numel():
                patch_xhat(xhat, side, idx, column_scores(weight, bias, src.dtype, n)[1])
            # aten's backward wants an input; with mean 0 any x with x * rstd = xhat will do
            x2, mean = xhat.div_(rstd[:, None]), torch.zeros_like(rstd)
        else:
            x2 = src.reshape(-1, n)
        stat = _stat_shape(src, len(shape))
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            grad.to(acc), (x2.view(src.shape) if from_output else src).to(acc), shape, mean.view(stat), rstd.view(stat),
            _as_acc(weight, acc), _as_acc(bias, acc), [need_x, need_w, need_b])
        return [dx.view(src.shape).to(src.dtype) if need_x else grad.new_empty(0),
                dw.to(weight.dtype) if need_w else grad.new_empty(0),
                db.to(bias.dtype) if need_b else grad.new_empty(0)]


@_bwd_opaque.register_fake
def _(grad, src, mean, rstd, side, idx, weight, bias, normalized_shape, needs):
    need_x, need_w, need_b = needs
    return [src.new_empty(src.shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad.new_empty(0),
            bias.new_empty(bias.shape) if need_b else grad.new_empty(0)]


@triton_op(f"{LIB}::inplace_layer_norm_bwd", kernels=_kernels)
def _bwd(grad: torch.Tensor, src: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor, side: torch.Tensor,
         idx: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalized_shape: list[int],
         needs: list[bool]) -> list[torch.Tensor]:
    """[dx, dweight, dbias] (an empty tensor for each one ``needs`` leaves out). ``src`` is the output ``y``
    when ``mean`` is None, else the input ``x``. On CUDA the kernel launch itself, elsewhere the opaque op."""
    if kernels_visible(src) and fits_kernel(src, math.prod(normalized_shape)):
        with no_autocast(grad), gathered(weight, bias):
            return _triton_backward(grad, src, mean, rstd, side, idx, weight, bias, normalized_shape, needs)
    return _bwd_opaque(grad, src, mean, rstd, side, idx, weight, bias, normalized_shape, needs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, normalized_shape, eps, save = inputs
    y, mean, rstd, side, idx = output
    ctx.normalized_shape = normalized_shape
    if save == "output":  # y (shared with the next Linear), rstd, the side buffer; Parameters as themselves
        ctx.save_for_backward(y, None, rstd, side, idx, weight, bias)
    elif save == "input":
        ctx.save_for_backward(x, mean, rstd, None, None, weight, bias)
    hold_parameters(ctx, weight, bias)


def _backward(ctx, grad, *_):
    src, mean, rstd, side, idx, weight, bias = ctx.saved_tensors
    weight, bias = held_parameters(ctx, weight, bias)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w, need_b = need_w and weight is not None, need_b and bias is not None
    if side is None:
        side, idx = rstd.new_empty((0, 0)), torch.empty(0, dtype=torch.int64, device=rstd.device)
    dx, dw, db = _bwd(grad, src, mean, rstd, side, idx, weight, bias, ctx.normalized_shape, [need_x, need_w, need_b])
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None)


torch.library.register_autograd(f"{LIB}::inplace_layer_norm_fwd", _backward, setup_context=_setup_context)


def inplace_layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5, *, keep_input: bool = False) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` that keeps its output (not its input) for backward.

    Same arguments and result. Keeps ``y``, ``rstd`` and the side buffer (``xhat`` of the ``K`` columns
    whose weights rebuild it worst, module docstring), so gradients stay exact with up to ``K`` zero, tiny
    or bias-dominated weights, with no host sync. ``keep_input=True`` keeps ``x``, the mean and ``rstd``
    instead (PyTorch's saved set): exact for any weight, e.g. one initialised to zero.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.float()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    save = "none" if not needs_grad else "input" if keep_input else "output"
    return _fwd(x, weight, bias, list(shape), float(eps), save)[0]

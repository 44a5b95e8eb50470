"""q/k RMSNorm fused with RoPE (Qwen3, Gemma 3, OLMo 2): keeps the rotated output that attention keeps anyway.

Forward, for a projection ``x`` [B, S, H, D] (``q_proj(h).view(B, S, H, D)``), HuggingFace's operations in
HuggingFace's order::

    y   = rms_norm(x)                      over D per head, or over H*D (OLMo 2's norm over the projection)
    q   = y.transpose(1, 2)                [B, H, S, D]
    out = q * cos + rotate_half(q) * sin   cos, sin [B, S, D] broadcast over heads (``apply_rotary_pos_emb``)

The norm is ``tempo_ds::inplace_rms_norm_fwd`` (Llama's rounding, or OLMo 2's / Gemma's float32 scale), so the
forward equals HF's bit for bit on the PyTorch path (on CUDA the RMSNorm kernel sums in another order: one ulp,
as for ``tempo_ds.ops.inplace_rms_norm``). With ``h = D/2`` and halves ``1, 2`` of the last dimension RoPE is
``o1 = c1*y1 - s1*y2``, ``o2 = c2*y2 + s2*y1``. Backward::

    dy1 = c1*g1 + s2*g2        dy2 = c2*g2 - s1*g1                       (the transpose, in float32)
    y1 = (c2*o1 + s1*o2)/det   y2 = (c1*o2 - s2*o1)/det,  det = c1*c2 + s1*s2   (the inverse, from the output)

then the RMSNorm backward from ``y`` and ``rstd`` (``tempo_ds::inplace_rms_norm_bwd``, ``xhat = y / w``).

HF keeps, per q or k, the norm's float32 input and ``x * rstd`` (and RoPE keeps only its tables); tempo_ds's
plain in-place norm keeps ``y``, which nothing else holds. This op keeps ``out`` -- the very tensor attention
keeps for its own backward, so it costs nothing more -- plus one ``rstd`` per row and a side buffer.

Why a side buffer: the un-rotation mixes column ``i`` with its partner ``p(i) = i +- h`` of the same head, so
``y_i`` comes back with an error of about one unit roundoff of ``|o|``, i.e. of ``|y_i| + |y_p(i)|``, and
``xhat_i = y_i / w_i`` with one amplified by ``(|w_i| + |w_p(i)|) / |w_i|``. The op keeps ``xhat`` (rounded to
x's dtype, HF's ``xhat`` in Llama's rounding) of the ``K = side_columns(N)`` columns of largest amplification,
ranked on the device with the columns the plain norm cannot rebuild at all (``|w|`` below the smallest normal,
NaN, overflow: ``tempo_ds.ops.layer_norm.column_scores``) first; backward rebuilds those columns' ``y`` from the
buffer. Bytes kept for ``M`` rows of ``N``: ``out`` (shared with attention) + ``4*M`` + ``M*K*e + 8*K``, and the
weight Parameter itself (Gemma: the float32 scale ``1 + w``, ``4*N``); ``cos``/``sin`` are the model's shared
tables, which HF's RoPE keeps too. When the rotated output would be wider than ``y`` (float32 tables with a
16-bit norm output: Gemma 3 under autocast, where attention keeps its own 16-bit casts), keeping it would cost
more than keeping ``y``: the wrapper then runs the plain in-place norm and HF's rotation.

Rounding: ``y`` is rebuilt in float32 and rounded to its own dtype before the norm backward (which must see
the dtype whose range its column rule uses), so in 16-bit a rebuilt ``y`` may be one unit off; the gradients
are HF's to that rounding (``tests/test_qk_norm_rope.py`` bounds them against float64).

The ops: ``tempo_ds::qk_norm_rope_fwd`` and ``_bwd``, custom ops joined by ``register_autograd``
(``tempo_ds.ops._library``); they call the RMSNorm ops (and so their Triton kernels on CUDA) and read nothing
on the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tempo_ds.ops.rms_norm import inplace_rms_norm  # also registers tempo_ds::inplace_rms_norm_fwd/_bwd
from tempo_ds.ops._library import LIB, no_autocast
from tempo_ds.ops._zero import gathered, held_parameters, hold_parameters
from tempo_ds.ops.layer_norm import acc_dtype, column_scores, side_columns

__all__ = ["qk_norm_rope", "side_columns_of_pairs"]

CASTINGS = ("llama", "torch")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``, operation for operation."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _partner(w: torch.Tensor, d: int) -> torch.Tensor:
    """``w`` [N] with each head's halves swapped: entry ``i`` is the weight of the column RoPE pairs with ``i``."""
    h = d // 2
    wv = w.reshape(-1, d)
    return torch.cat((wv[:, h:], wv[:, :h]), 1).reshape(-1)


def side_columns_of_pairs(weight: torch.Tensor, out_dtype: torch.dtype, n: int, d: int, k: int) -> torch.Tensor:
    """``idx`` [k] int64: the ``k`` columns (of ``n``, heads of ``d``) whose ``xhat`` the un-rotation rebuilds
    worst, ranked on the device: the plain norm's bad columns first, then by ``(|w| + |w_partner|) / |w|``."""
    _, bad = column_scores(weight, None, out_dtype, n)
    w = weight.detach().reshape(-1).abs().to(acc_dtype(out_dtype))
    score = ((w + _partner(w, d)) / w).nan_to_num_(nan=math.inf, posinf=math.inf)
    score = torch.where(bad, math.inf, score)
    return torch.topk(score, k, sorted=False).indices


def _rows(x: torch.Tensor, whole: bool) -> tuple[torch.Tensor, int]:
    n = x.shape[-1] * x.shape[-2] if whole else x.shape[-1]
    return (x.reshape(*x.shape[:-2], n) if whole else x), n


def _fake_out(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=dtype).transpose(1, 2)  # HF's layout: [B, H, S, D] over [B, S, H, D]


@torch.library.custom_op(f"{LIB}::qk_norm_rope_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
         casting: str, norm_dtype: torch.dtype, rope_dtype: torch.dtype, whole: bool,
         save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, H, S, D] in rope_dtype, rstd [M], side [M, K] in x's dtype, idx [K])``; K = 0 unless ``save``."""
    xs, n = _rows(x, whole)
    with no_autocast(x):
        y, rstd, _, _ = torch.ops.tempo_ds.inplace_rms_norm_fwd(xs, weight, eps, casting, norm_dtype, "none")
        q = y.view(x.shape).transpose(1, 2)
        out = (q * cos.unsqueeze(1)) + (_rotate_half(q) * sin.unsqueeze(1))
        if out.dtype != rope_dtype:
            out = out.to(rope_dtype)
        x2 = xs.reshape(-1, n)
        k = side_columns(n, weight is not None) if save else 0
        if k == 0:
            return out, rstd, x2.new_empty((x2.shape[0], 0)), torch.empty(0, dtype=torch.int64, device=x.device)
        idx = side_columns_of_pairs(weight, norm_dtype, n, x.shape[-1], k)
        side = (x2.index_select(1, idx).to(rstd.dtype) * rstd[:, None]).to(x.dtype)
        return out, rstd, side, idx


@_fwd.register_fake
def _(x, weight, cos, sin, eps, casting, norm_dtype, rope_dtype, whole, save):
    _, n = _rows(x, whole)
    m = x.numel() // n
    k = side_columns(n, weight is not None) if save else 0
    return (_fake_out(x, rope_dtype), x.new_empty((m,), dtype=acc_dtype(x.dtype)), x.new_empty((m, k)),
            x.new_empty((k,), dtype=torch.int64))


@torch.library.custom_op(f"{LIB}::qk_norm_rope_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, side: torch.Tensor, idx: torch.Tensor,
         weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, whole: bool, x_dtype: torch.dtype,
         norm_dtype: torch.dtype, needs: list[bool]) -> list[torch.Tensor]:
    """[dx [B, S, H, D], dweight] (an empty tensor for one ``needs`` leaves out)."""
    acc = rstd.dtype
    d = out.shape[-1]
    h = d // 2
    with no_autocast(grad), gathered(weight):
        c, s = cos.unsqueeze(1).to(acc), sin.unsqueeze(1).to(acc)
        c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
        g = grad.to(acc)
        g1, g2 = g[..., :h], g[..., h:]
        dy = torch.cat((c1 * g1 + s2 * g2, c2 * g2 - s1 * g1), -1)
        del g, g1, g2
        o = out.to(acc)
        o1, o2 = o[..., :h], o[..., h:]
        det = c1 * c2 + s1 * s2
        y = torch.cat(((c2 * o1 + s1 * o2) / det, (c1 * o2 - s2 * o1) / det), -1)
        del o, o1, o2
        shape = (out.shape[0], out.shape[2], out.shape[1], d)  # [B, S, H, D]
        n = shape[-1] * shape[-2] if whole else d
        y = y.transpose(1, 2).reshape(-1, n)
        if idx.numel():  # the kept columns' y from their kept xhat (exact where the weight rebuilds)
            y.index_copy_(1, idx, side.to(acc) * weight.detach().to(acc).index_select(0, idx))
        y = y.to(norm_dtype)
        dy = dy.transpose(1, 2).reshape(-1, n).to(norm_dtype)
        dx, dw = torch.ops.tempo_ds.inplace_rms_norm_bwd(dy, y, rstd, side, idx, weight, True, x_dtype, needs)
    return [dx.view(shape) if needs[0] else dx, dw]


@_bwd.register_fake
def _(grad, out, rstd, side, idx, weight, cos, sin, whole, x_dtype, norm_dtype, needs):
    shape = (out.shape[0], out.shape[2], out.shape[1], out.shape[3])
    return [grad.new_empty(shape, dtype=x_dtype) if needs[0] else grad.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else grad.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps, casting, norm_dtype, rope_dtype, whole, save = inputs
    out, rstd, side, idx = output
    ctx.whole, ctx.x_dtype, ctx.norm_dtype = whole, x.dtype, norm_dtype
    # the rotated output (attention keeps the same tensor), rstd, the side buffer, the Parameter itself and the
    # model's shared RoPE tables
    ctx.save_for_backward(out, rstd, side, idx, weight, cos, sin)
    hold_parameters(ctx, weight)


def _backward(ctx, grad, *_):
    out, rstd, side, idx, weight, cos, sin = ctx.saved_tensors
    (weight,) = held_parameters(ctx, weight)
    need_x, need_w = ctx.needs_input_grad[:2]
    need_w = need_w and weight is not None
    dx, dw = _bwd(grad, out, rstd, side, idx, weight, cos, sin, ctx.whole, ctx.x_dtype, ctx.norm_dtype,
                  [need_x, need_w])
    return dx if need_x else None, dw if need_w else None, None, None, None, None, None, None, None, None


torch.library.register_autograd(f"{LIB}::qk_norm_rope_fwd", _backward, setup_context=_setup_context)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6, *, casting: str = "llama", whole: bool = False,
                 cast_back: bool = False) -> torch.Tensor:
    """``apply_rotary_pos_emb``'s rotation of ``rms_norm(x).transpose(1, 2)``, keeping the rotated output.

    ``x`` [B, S, H, D] is a q or k projection viewed per head; the norm runs over D (``whole=False``, Qwen3 and
    Gemma 3 per-head norms) or over H*D (``whole=True``, OLMo 2); ``weight`` is [D] or [H*D] (Gemma: the float32
    scale ``1 + w``); ``casting`` as :func:`tempo_ds.ops.inplace_rms_norm` ("llama": Llama/Qwen3's rounding,
    "torch": OLMo 2's and Gemma's float32 scale). ``cos``/``sin`` [B or 1, S, D] are the rotary tables, which
    must not require grad. ``cast_back`` rounds the result to the norm's dtype (OLMo 2's RoPE). Returns
    [B, H, S, D], HF's values bit for bit. Keeps the result, float32 ``rstd`` per row and the side buffer of the
    module docstring.
    """
    if casting not in CASTINGS:
        raise ValueError(f"casting={casting!r}: expected one of {CASTINGS}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [batch, seq, heads, head_dim] with an even head_dim, got {tuple(x.shape)}")
    b, s, hd, d = x.shape
    n = hd * d if whole else d
    if weight is None or weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) for x {tuple(x.shape)} with whole={whole}, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[-2:] != (s, d) or t.shape[0] not in (1, b):
            raise ValueError(f"{name} must be [batch or 1, seq, head_dim] = [{b} or 1, {s}, {d}], got "
                             f"{tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad; qk_norm_rope does not differentiate the rotary tables")
    norm_dtype = torch.promote_types(x.dtype, weight.dtype) if casting == "llama" else x.dtype
    rope_dtype = norm_dtype if cast_back else torch.promote_types(torch.promote_types(norm_dtype, cos.dtype),
                                                                  sin.dtype)
    save = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if save and rope_dtype.itemsize > norm_dtype.itemsize:
        return _separate(x, weight, cos, sin, float(eps), casting, whole, rope_dtype)
    return _fwd(x, weight, cos, sin, float(eps), casting, norm_dtype, rope_dtype, whole, save)[0]


def _separate(x, weight, cos, sin, eps: float, casting: str, whole: bool, rope_dtype: torch.dtype) -> torch.Tensor:
    """The in-place norm, then HF's rotation: for a rotated output wider than the norm's (float32 tables with a
    16-bit norm output, e.g. Gemma 3 under autocast), where keeping ``y`` costs less than keeping the output."""
    xs, _ = _rows(x, whole)
    q = inplace_rms_norm(xs, weight, eps, casting=casting).view(x.shape).transpose(1, 2)
    out = (q * cos.unsqueeze(1)) + (_rotate_half(q) * sin.unsqueeze(1))
    return out if out.dtype == rope_dtype else out.to(rope_dtype)

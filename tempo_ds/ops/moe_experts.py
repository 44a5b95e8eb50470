"""MoE experts (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) keeping only each routed slot's gate_up output.

Shapes: x [T, h] (tokens), top_k_index / top_k_weights [T, K] (the router's choice and weights),
gate_up_proj [E, 2i, h], down_proj [E, h, i]. The S = T*K routed (token, slot) pairs are sorted by expert
(``perm = sort(top_k_index.reshape(-1)).indices``; token of sorted slot s: ``t(s) = perm[s] // K``,
expert ``e(s)``, weight ``w_s``), so each expert's rows are contiguous and one grouped matmul serves all::

    gu_s  = gate_up_proj[e(s)] x_t(s)                  g_s, u_s = gu_s.chunk(2)      (gu: [S, 2i])
    h_s   = act(g_s) * u_s                             act = SiLU ("silu") or tanh-GELU ("gelu_tanh")
    o_s   = down_proj[e(s)] h_s                        (o: [S, h])
    y_t   = sum over the K slots of t of  w_s * o_s    (in the promoted dtype of o and w, then cast to x's)

Backward, given dy [T, h] (``dy_s = dy_t(s)``)::

    do_s = w_s * dy_s                 dw_s = <dy_s, o_s>        (o recomputed: o = grouped(h, down_proj))
    dh   = grouped(do, down_proj)     d down_proj[e] = sum over s in e of do_s h_s^T
    da   = dh * u;  dg = act_backward(da, g);  du = dh * act(g)            (dgu = [dg | du])
    dx_t = sum over the slots s of t of gate_up_proj[e(s)]^T dgu_s       d gate_up_proj[e] = sum_s dgu_s x_t(s)^T

What is kept. HF's experts forward (``grouped_mm``, transformers' default) keeps, per routed slot: the
gathered input x_t(s) [S, h], gu [S, 2i] (act's input and the product's ``u`` are views of it), act(g)
[S, i], h [S, i] (the down matmul's input) and o [S, h] (the routing-weight product's input) -- ``2h + 4i``
values a slot -- plus the sorted routing weight (4 bytes in float32), three int64 index tensors and the
offsets. This op keeps gu, ``2i`` values a slot, and ``top_k_weights`` [T, K] (4 bytes a slot in float32),
besides ``x`` and ``top_k_index``, which the router keeps already (its Linear keeps its input, ``topk`` its
indices), so with storage de-duplication they cost nothing more; and the two 3-D Parameter objects
themselves (ZeRO-3: never a per-expert slice, a view or a cast copy; the backward gathers them). In
bfloat16: ``4i + 4`` bytes a slot where HF keeps ``4h + 8i + 28``.

The sort is recomputed from ``top_k_index`` in backward (a sort of S integers) rather than keeping ``perm``
(8 bytes a slot). ``h = act(g) * u`` is recomputed, and so is ``o`` (one extra grouped matmul of S x i x h,
a ninth of the experts' forward + backward FLOPs) for the routing-weight gradient, only when
``top_k_weights`` needs a gradient: keeping o would cost ``h`` values a slot, and computing
``dw_s = <dy_s, W_d h_s>`` as ``<W_d^T dy_s, h_s>`` would cost the same matmul and round differently
from HF.

Exact against HF's default ``grouped_mm`` implementation: the same sort, the same grouped matmuls
(``torch.nn.functional.grouped_mm``, the calls its autograd makes in backward), the same elementwise ops
and casts, and the slot sum in the same order, so the output and every gradient are equal bit for bit in
float32 and bfloat16. Against HF's ``eager`` per-expert loop the results differ by reduction order only
(F.linear on each expert's rows vs one grouped matmul; ``index_add_`` in x's dtype in expert order vs a
sum over the K slots in the promoted dtype). Where ``grouped_mm`` is not used (:func:`grouped_ok`: float64,
a shape whose strides are not multiples of 16 bytes, or a dtype this torch's ``grouped_mm`` refuses on the device)
each expert's matmul runs over all S rows and ``torch.where`` keeps its own rows: E times the FLOPs, exact per
row, with no host sync.

No host syncs in this code: routing counts are never read on the host (offsets come from ``searchsorted`` on the
device); what is saved depends only on the flags the wrapper passes. Inside torch: its CUDA ``grouped_mm`` is a
sync-free kernel for bfloat16 on sm_90 / sm_100 only (torch 2.10's GroupedBlas.cpp); for float32 / float16, and
for bfloat16 on other GPUs (sm_80, sm_89, ...), torch runs a per-group loop that reads the offsets on the host,
as HF's experts do there. Decision: that loop (one offsets read per call) is taken over the sync-free masked path,
whose E times the FLOPs (8x for Mixtral, 128x for Qwen3-MoE) would cost far more than the sync.

The ops: ``tempo_ds::moe_experts_fwd`` and ``_bwd``, ``torch.library`` custom ops with fake implementations
joined by ``register_autograd``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import LIB, no_autocast
from ._zero import gathered, held_parameters, hold_parameters
from .gated_mlp import ACTIVATIONS, _act, _act_backward

__all__ = ["moe_experts", "ACTIVATIONS"]

_GROUPED = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# -- routing and grouped matmuls ------------------------------------------------------------------------
def _route(top_k_index: torch.Tensor, num_experts: int):
    """``(expert of each sorted slot, perm, offsets)``: HF's sort, and the int32 end offset of each expert's rows."""
    ids, perm = torch.sort(top_k_index.reshape(-1))
    experts = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    offs = torch.searchsorted(ids, experts, right=True).to(torch.int32)
    return ids, perm, offs


_REFUSED: set = set()  # (device type, dtype) pairs this torch's grouped_mm refused


def grouped_ok(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Whether ``grouped_mm`` runs these operands: a float dtype it has not refused on this device type, rows of
    16-byte multiples."""
    if _GROUPED is None or (device.type, dtype) in _REFUSED:
        return False
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and all(w * dtype.itemsize % 16 == 0 for w in widths)


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """``grouped_mm(a, b, offs)``, or None (remembered) when this torch refuses the dtype on the device: its docs
    promise bfloat16 on CUDA only, while its CUDA fallback loop takes the other dtypes."""
    try:
        return _GROUPED(a, b, offs=offs)
    except RuntimeError as exc:  # an out-of-memory error is no refusal: it must not switch the dtype off for good
        if a.dtype == torch.bfloat16 or a.device.type != "cuda" or isinstance(exc, torch.OutOfMemoryError):
            raise
        _REFUSED.add((a.device.type, a.dtype))
        return None


def _mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Row s of ``a`` [S, k] times ``w[e(s)]`` ([E, k, n]): [S, n]."""
    out = _grouped(a, w, offs) if grouped else None
    if out is not None:
        return out
    out = a.new_zeros((a.shape[0], w.shape[-1]))
    for e in range(w.shape[0]):
        out = torch.where((ids == e)[:, None], a @ w[e], out)
    return out


def _mm_weight(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor, num_experts: int,
               grouped: bool) -> torch.Tensor:
    """Per expert, ``a[rows of e]^T b[rows of e]`` for a [S, m], b [S, n]: [E, m, n]."""
    out = _grouped(a.t(), b, offs) if grouped else None
    if out is not None:
        return out
    return torch.stack([torch.where((ids == e)[:, None], a, 0).t() @ b for e in range(num_experts)])


# -- the ops -------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::moe_experts_fwd", mutates_args=())
def _fwd(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor,
         down_proj: torch.Tensor, activation: str, compute_dtype: torch.dtype,
         save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, gu)``: y [T, h] in x's dtype; gu [S, 2i] in ``compute_dtype`` (sorted by expert) when ``save``,
    else [0, 2i]."""
    num_experts, k = gate_up_proj.shape[0], top_k_index.shape[-1]
    with no_autocast(x):
        ids, perm, offs = _route(top_k_index, num_experts)
        grouped = grouped_ok(compute_dtype, x.device, x.shape[-1], gate_up_proj.shape[1], down_proj.shape[-1])
        xg = x[perm // k].to(compute_dtype)
        gu = _mm(xg, gate_up_proj.to(compute_dtype).transpose(-2, -1), offs, ids, grouped)
        g, u = gu.chunk(2, dim=-1)
        o = _mm(_act(g, activation) * u, down_proj.to(compute_dtype).transpose(-2, -1), offs, ids, grouped)
        weighted = o * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        y = weighted[inv].view(*top_k_index.shape, x.shape[-1]).sum(dim=1).to(x.dtype)
        return y, gu if save else gu.new_empty((0, gu.shape[1]))


@_fwd.register_fake
def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, compute_dtype, save):
    s = top_k_index.numel() if save else 0
    return x.new_empty(x.shape), x.new_empty((s, gate_up_proj.shape[1]), dtype=compute_dtype)


@torch.library.custom_op(f"{LIB}::moe_experts_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
         gu: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str,
         compute_dtype: torch.dtype, needs: list[bool]) -> list[torch.Tensor]:
    """[dx, dtop_k_weights, dgate_up_proj, ddown_proj] (an empty tensor for one ``needs`` leaves out)."""
    need_x, need_w, need_gu, need_d = needs
    cd = compute_dtype
    with no_autocast(dy), gathered(gate_up_proj, down_proj):
        num_experts, k = gate_up_proj.shape[0], top_k_index.shape[-1]  # gathered: a partitioned shape is [0]
        ids, perm, offs = _route(top_k_index, num_experts)
        grouped = grouped_ok(cd, x.device, x.shape[-1], gate_up_proj.shape[1], down_proj.shape[-1])
        tok = perm // k
        w_g = top_k_weights.reshape(-1)[perm]
        dy_g = dy.to(torch.promote_types(cd, top_k_weights.dtype))[tok]  # the slot sum's and unsort's backward
        do = (dy_g * w_g.unsqueeze(-1)).to(cd)
        wd = down_proj.to(cd)
        g, u = gu.chunk(2, dim=-1)
        a = _act(g, activation)
        h = a * u
        dw = dy.new_empty(0)  # each left-out gradient its own empty tensor: outputs must not alias
        if need_w:
            o = _mm(h, wd.transpose(-2, -1), offs, ids, grouped)
            dw = torch.zeros_like(w_g).index_put_((perm,), (dy_g * o).sum(-1).to(w_g.dtype)).view(
                top_k_weights.shape)  # the product's backward casts to w's dtype (bf16 w, float32 experts)
        dwd = _mm_weight(h, do, offs, ids, num_experts, grouped).transpose(-2, -1).to(down_proj.dtype) \
            if need_d else dy.new_empty(0)
        dh = _mm(do, wd, offs, ids, grouped)
        dgu = torch.cat([_act_backward(dh * u, g, activation), dh * a], dim=-1)
        dx, dgup = dy.new_empty(0), dy.new_empty(0)
        if need_gu:
            xg = x[tok].to(cd)
            dgup = _mm_weight(xg, dgu, offs, ids, num_experts, grouped).transpose(-2, -1).to(gate_up_proj.dtype)
        if need_x:
            dxg = _mm(dgu, gate_up_proj.to(cd), offs, ids, grouped).to(x.dtype)
            dx = x.new_zeros(x.shape).index_put_((tok,), dxg, accumulate=True)
        return [dx, dw, dgup, dwd]


@_bwd.register_fake
def _(dy, x, top_k_index, top_k_weights, gu, gate_up_proj, down_proj, activation, compute_dtype, needs):
    need_x, need_w, need_gu, need_d = needs
    e, two_i, h = gate_up_proj.shape
    # the weight gradients come out of the grouped matmul as [E, in, out], transposed to the Parameters' shape
    return [x.new_empty(x.shape) if need_x else dy.new_empty(0),
            top_k_weights.new_empty(top_k_weights.shape) if need_w else dy.new_empty(0),
            gate_up_proj.new_empty((e, h, two_i)).transpose(-2, -1) if need_gu else dy.new_empty(0),
            down_proj.new_empty((e, two_i // 2, h)).transpose(-2, -1) if need_d else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, compute_dtype, save = inputs
    ctx.activation, ctx.compute_dtype = activation, compute_dtype
    # gu, and what the router keeps anyway (x, the routing); the Parameter objects themselves
    ctx.save_for_backward(x, top_k_index, top_k_weights, output[1], gate_up_proj, down_proj)
    hold_parameters(ctx, gate_up_proj, down_proj)


def _backward(ctx, dy, _):
    x, top_k_index, top_k_weights, gu, gate_up_proj, down_proj = ctx.saved_tensors
    gate_up_proj, down_proj = held_parameters(ctx, gate_up_proj, down_proj)
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[4]]
    dx, dw, dgu, dd = _bwd(dy.contiguous(), x, top_k_index, top_k_weights, gu, gate_up_proj, down_proj,
                           ctx.activation, ctx.compute_dtype, needs)
    grads = [g if need else None for g, need in zip((dx, dw, dgu, dd), needs)]
    return grads[0], None, grads[1], grads[2], grads[3], None, None, None


torch.library.register_autograd(f"{LIB}::moe_experts_fwd", _backward, setup_context=_setup_context)


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str = "silu",
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """transformers 5's gated MoE experts forward, ``y_t = sum_k w_tk down[e_tk](act(g) * u)`` with
    ``g, u = (gate_up[e_tk] x_t).chunk(2)``, keeping only the routed gate_up outputs [T*K, 2i] for backward
    (besides x and the routing, which the router keeps, and the Parameters). ``x`` [T, h]; ``top_k_index``
    [T, K] integer expert ids in [0, E); ``top_k_weights`` [T, K] float; ``gate_up_proj`` [E, 2i, h];
    ``down_proj`` [E, h, i]. The matmuls run in ``compute_dtype`` (default: the weights' dtype, as HF's
    ``grouped_mm`` implementation, which ignores autocast). Returns [T, h] in x's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"moe_experts: x must be [T, h] and the projections 3-D, got x {tuple(x.shape)}, "
                         f"gate_up_proj {tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}")
    e, two_i, h = gate_up_proj.shape
    if two_i % 2 or down_proj.shape != (e, h, two_i // 2) or x.shape[1] != h:
        raise ValueError(f"moe_experts: gate_up_proj {tuple(gate_up_proj.shape)} must be [E, 2i, h] and down_proj "
                         f"{tuple(down_proj.shape)} [E, h, i] for x of width {x.shape[1]}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                         f"{tuple(top_k_weights.shape)} must both be [T, K] with T = {x.shape[0]}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex:
        raise ValueError(f"moe_experts: top_k_index must be an integer tensor, got {top_k_index.dtype}")
    compute_dtype = compute_dtype or gate_up_proj.dtype
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, top_k_weights, gate_up_proj, down_proj))
    return _fwd(x, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, compute_dtype, save)[0]

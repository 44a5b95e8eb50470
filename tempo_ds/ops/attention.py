"""Attention that keeps no s x s tensor for backward (``mode="lean"``), and Tempo's sub-layer dropout
recomputation (``mode="tempo"``) for comparison.

Shapes (like ``F.scaled_dot_product_attention``): q [B, H, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv],
output o [B, H, Sq, Dv]. Grouped-query attention: H = G * Hkv and query head h reads key/value head
h // G (``repeat_interleave`` order); k and v are never repeated, neither in what is saved nor in the
temporaries (query heads of one group are stacked as extra rows of one matmul against their k/v head).

Forward maths, per (batch, head), with the mask M (additive, or boolean where True = attend, or both with
``is_causal``: top-left, key j visible to query i when j <= i, as in SDPA)::

    S   = scale * Q K^T + M                 [Sq, Sk]
    lse = log sum_j exp(S_ij)               [Sq]      (-inf for a row that sees no key)
    P   = exp(S - lse)                      [Sq, Sk]  (a fully masked row gives P = 0, O = 0, as SDPA does)
    Z   = keep / (1 - p)                    dropout, keep_ij = hash(seed, ((b*H + h)*Sq + i)*Sk + j)
    O   = (P * Z) V                         [Sq, Dv]

Backward (FlashAttention-2, Dao 2023, Algorithm 2)::

    dV  = (P * Z)^T dO
    dP  = (dO V^T) * Z
    Di  = rowsum(dO * O)                    (= sum_j P_ij dP_ij)
    dS  = P * (dP - Di)
    dQ  = scale * dS K,   dK = scale * dS^T Q,   dM = dS (reduced to the mask's broadcast shape)

Each mode is a pair of ``torch.library`` custom ops (``tempo_ds::attention_lean_fwd`` / ``_bwd``,
``tempo_ds::attention_tempo_fwd`` / ``_bwd``) with fake implementations, joined by ``register_autograd``
(``tempo_ds.ops._library``): ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them. The
lean pair are triton ops: on CUDA torch.compile sees the Triton kernel launches; elsewhere (and for the blocked
PyTorch code) they call the opaque ``attention_lean_fwd_opaque`` / ``_bwd_opaque``.
Autocast is resolved in the wrapper (q, k, v cast as autocast casts them for SDPA; the ops run with
autocast off), and the dropout seed is a 1-element int64 tensor drawn from the default generator of q's
device (``_library.draw_seed``): nothing reads a device value on the host.

What each mode saves (the meter counts storages once, so a fused QKV output counts once either way):

* ``lean``: q, k, v, o and lse ([B, H, Sq] float32; float64 for float64 inputs, for gradcheck), plus the
  mask when one is given (it is an input, usually shared by every layer). No tensor with Sq*Sk
  elements: backward recomputes S and P in blocks of query rows (all heads at once), so the extra peak
  memory is O(block * Sk), and the dropout mask comes back from the seed. The output is laid out as
  [B, Sq, H, Dv] in memory, so ``o.transpose(1, 2)`` (what HF passes to the output projection) is
  contiguous and the projection saves the same storage as we do.
* ``tempo`` (Tempo, Andoorveedu et al. 2022, sub-layer dropout recomputation): q, k, v, the softmax
  output P in the input dtype (Sq*Sk per head) and the dropout keep mask packed to 1 bit per element;
  backward recomputes the dropped P * Z from them instead of keeping it (and a byte mask) around.
* Both keep the 8-byte seed on the autograd context rather than through ``save_for_backward`` (as
  ``seed_dropout`` does): it is an input, not an activation, and every recompute draws the same value.
  Which tensors are kept depends only on shapes and flags, never on a device value.

The seed is drawn per call from the default generator, which every checkpoint flavour restores before it
recomputes, so the recompute regenerates the same mask. ``dropout_p`` is applied whenever it is > 0, like
SDPA's; ``LeanAttention`` passes 0 in eval mode (Tempo's attention dropped in eval mode too; ours does not).

Dispatch (``tempo_ds.ops.attention_dispatch.choose_backend``, a pure function of shapes, dtypes, flags and
the device's capability): on CUDA, ``mode="lean"`` runs SDPA's flash kernel, else its memory-efficient
kernel, whenever one takes the call - with dropout, causal and padding masks - since both keep the same q,
k, v, o, lse (and a Philox seed and offset instead of a dropout mask); only when neither does, the Triton
kernels of ``tempo_ds.kernels.attention`` run (not for float64 or a mask that requires grad), and the
blocked PyTorch code below everywhere else. ``mode="tempo"`` always runs our own code. On CPU our code
always runs: SDPA's CPU flash kernel saves the same figure without dropout (a boolean mask is saved as an
extra float copy), but with dropout it falls back to the math path and saves ~3 s x s tensors per head.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tempo_ds.ops._bits import pack_bits, packed_nbytes, unpack_bits
from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops._library import LIB, autocast_dtype, draw_seed, kernels_visible, no_autocast, triton_op
from tempo_ds.ops.attention_dispatch import AttentionCall, choose_backend
from tempo_ds.ops.dropout import fill_keep_mask

__all__ = ["attention", "plan_for"]

MODES = ("lean", "tempo")
SCORE_BLOCK_ELEMENTS = 1 << 20  # default block: ~1M scores (4 MiB in float32) over all heads at once


# ------------------------------------------------------------------------------------------------
# Blocked PyTorch path
# ------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_block(B: int, H: int, Sq: int, Sk: int) -> int:
    return max(1, min(Sq, SCORE_BLOCK_ELEMENTS // max(1, B * H * Sk)))


def _dropout_scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _new_output(B: int, H: int, Sq: int, Dv: int, like: torch.Tensor) -> torch.Tensor:
    """[B, H, Sq, Dv] stored as [B, Sq, H, Dv]: its transpose(1, 2) is contiguous."""
    return torch.empty(B, Sq, H, Dv, dtype=like.dtype, device=like.device).transpose(1, 2)


class _Block:
    """Scores of query rows ``i0:i1`` for all batches and heads: helpers shared by forward and backward.

    ``q`` [B, H, Sq, D] in the input dtype, ``k_t`` [B, Hkv, D, Sk] and ``v`` [B, Hkv, Sk, Dv] contiguous
    in the compute dtype, ``mask4`` the mask viewed as 4-d (broadcast dims of size 1, never expanded).
    """

    def __init__(self, q, k_t, mask4, causal, scale, p, seed):
        self.q, self.k_t, self.mask4, self.causal, self.scale, self.p, self.seed = q, k_t, mask4, causal, scale, p, seed
        self.B, self.H, self.Sq, self.D = q.shape
        self.Hkv, self.Sk = k_t.shape[1], k_t.shape[3]
        self.G = self.H // self.Hkv
        self.cdt = k_t.dtype

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, *] -> [B, Hkv, G*n, *]: the query heads of one k/v head stacked as rows."""
        return x.reshape(self.B, self.Hkv, self.G * x.shape[2], x.shape[-1])

    def scaled_q(self, i0: int, i1: int) -> torch.Tensor:
        """scale * q[:, :, i0:i1] in the compute dtype, grouped: [B, Hkv, G*n, D]."""
        return self.grouped(self.q[:, :, i0:i1].to(self.cdt) * self.scale)

    def scores(self, qs: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """Masked scores S [B, H, n, Sk] (a fresh tensor) from the grouped, scaled queries ``qs``."""
        s = torch.matmul(qs, self.k_t).view(self.B, self.H, i1 - i0, self.Sk)
        if self.mask4 is not None:
            m = self.mask4 if self.mask4.shape[2] == 1 else self.mask4[:, :, i0:i1]
            if m.dtype == torch.bool:
                s.masked_fill_(~m, -math.inf)
            else:
                s.add_(m.to(self.cdt))
        if self.causal:
            rows = torch.arange(i0, i1, device=s.device)[:, None]
            s.masked_fill_(torch.arange(self.Sk, device=s.device) > rows, -math.inf)
        return s

    def keep(self, i0: int, i1: int) -> torch.Tensor:
        """Dropout keep mask [B, H, n, Sk] of element ((b*H + h)*Sq + i)*Sk + j under the call's seed. Rows
        i0:i1 of one (batch, head) are one contiguous run of indices (all heads are one run when the block
        holds every row)."""
        n = i1 - i0
        keep = torch.empty(self.B, self.H, n, self.Sk, dtype=torch.bool, device=self.q.device)
        if n == self.Sq:
            fill_keep_mask(keep.view(-1), self.seed, self.p, 0)
        else:
            runs = keep.view(self.B * self.H, n * self.Sk)
            for bh in range(self.B * self.H):
                fill_keep_mask(runs[bh], self.seed, self.p, (bh * self.Sq + i0) * self.Sk)
        return keep


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``s`` in place; returns lse. A row of -inf gives P = 0, lse = -inf."""
    if s.shape[-1] == 0:
        return s.new_full(s.shape[:-1], -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    s.sub_(m).exp_()
    l = s.sum(-1, keepdim=True)
    s.div_(torch.where(l == 0, 1.0, l))
    return (m + l.log()).squeeze(-1)


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``x`` over the dims where ``shape`` broadcasts (size 1) - the gradient of a broadcast mask."""
    dims = [d for d, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1]
    return x.sum(dims, keepdim=True) if dims else x


def _lean_forward(q, k, v, mask4, causal, scale, p, seed, block):
    """Blocked forward: (o [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq])."""
    B, H, Sq, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    blk = _Block(q, k.to(cdt).transpose(-1, -2).contiguous(), mask4, causal, scale, p, seed)
    vc = v.to(cdt).contiguous()
    o = _new_output(B, H, Sq, v.shape[-1], q)
    lse = torch.empty(B, H, Sq, dtype=cdt, device=q.device)
    for i0 in range(0, Sq, block):
        i1 = min(i0 + block, Sq)
        s = blk.scores(blk.scaled_q(i0, i1), i0, i1)
        lse[:, :, i0:i1] = _softmax_(s)
        if p > 0:
            s.mul_(blk.keep(i0, i1))
        ob = torch.matmul(blk.grouped(s), vc).view(B, H, i1 - i0, vc.shape[-1])
        if p > 0:
            ob.mul_(_dropout_scale(p))
        o[:, :, i0:i1] = ob
    return o, lse


def _lean_backward(do, q, k, v, o, lse, mask4, causal, scale, p, seed, block, mask_grad):
    """Blocked backward: (dq, dk, dv, dmask4 or None) in the compute dtype."""
    B, H, Sq, D = q.shape
    cdt = _compute_dtype(q.dtype)
    kc = k.to(cdt).contiguous()
    vc = v.to(cdt).contiguous()
    blk = _Block(q, kc.transpose(-1, -2), mask4, causal, scale, p, seed)
    dq = torch.empty(B, H, Sq, D, dtype=cdt, device=q.device)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    dmask = torch.zeros(mask4.shape, dtype=cdt, device=q.device) if mask_grad else None
    lse_safe = lse.to(cdt).masked_fill(torch.isneginf(lse), math.inf)  # fully masked rows: P = 0
    factor = _dropout_scale(p)
    for i0 in range(0, Sq, block):
        i1 = min(i0 + block, Sq)
        n = i1 - i0
        qs = blk.scaled_q(i0, i1)
        s = blk.scores(qs, i0, i1)
        s.sub_(lse_safe[:, :, i0:i1, None]).exp_()  # P
        dob = do[:, :, i0:i1].to(cdt)
        delta = (dob * o[:, :, i0:i1].to(cdt)).sum(-1, keepdim=True)
        dob = blk.grouped(dob)
        dp = torch.matmul(dob, vc.transpose(-1, -2)).view(B, H, n, blk.Sk)
        if p > 0:
            keep = blk.keep(i0, i1)
            dv += torch.matmul(blk.grouped(s * keep).transpose(-1, -2), dob).mul_(factor)
            dp.mul_(keep).mul_(factor)
        else:
            dv += torch.matmul(blk.grouped(s).transpose(-1, -2), dob)
        ds = dp.sub_(delta).mul_(s)
        if dmask is not None:
            if dmask.shape[2] == 1:
                dmask += _sum_to(ds, dmask.shape)
            else:
                dmask[:, :, i0:i1] += _sum_to(ds, dmask[:, :, i0:i1].shape)
        ds = blk.grouped(ds)
        dq[:, :, i0:i1] = torch.matmul(ds, kc).view(B, H, n, D).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), qs)
    return dq, dk, dv, dmask


def _tempo_forward(q, k, v, mask4, causal, scale, p, seed):
    """Unblocked forward: (o, P [B, H, Sq, Sk] in q's dtype, keep [B, H, Sq, Sk] bool or None)."""
    B, H, Sq, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    blk = _Block(q, k.to(cdt).transpose(-1, -2).contiguous(), mask4, causal, scale, p, seed)
    s = blk.scores(blk.scaled_q(0, Sq), 0, Sq)
    _softmax_(s)
    probs = s.to(q.dtype)
    keep = blk.keep(0, Sq) if p > 0 else None
    o = _new_output(B, H, Sq, v.shape[-1], q)
    if keep is None:
        o.copy_(torch.matmul(blk.grouped(s), v.to(cdt)).view(o.shape))
    else:
        o.copy_(torch.matmul(blk.grouped(s * keep), v.to(cdt)).view(o.shape).mul_(_dropout_scale(p)))
    return o, probs, keep


def _tempo_backward(do, q, k, v, probs, keep, mask_shape, scale, p):
    """Backward from the saved P and keep mask: (dq, dk, dv, dmask4 or None) in the compute dtype."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)

    def grouped(x):
        return x.reshape(B, Hkv, H // Hkv * x.shape[2], x.shape[-1])

    P = probs.to(cdt)
    dob = grouped(do.to(cdt))
    dp = torch.matmul(dob, v.to(cdt).transpose(-1, -2)).view(P.shape)
    if keep is not None:
        factor = _dropout_scale(p)
        dv = torch.matmul(grouped(P * keep).transpose(-1, -2), dob).mul_(factor)
        dp.mul_(keep).mul_(factor)
    else:
        dv = torch.matmul(grouped(P).transpose(-1, -2), dob)
    ds = dp.sub_((dp * P).sum(-1, keepdim=True)).mul_(P)
    dmask = _sum_to(ds, mask_shape) if mask_shape is not None else None
    ds = grouped(ds)
    dq = torch.matmul(ds, k.to(cdt)).view(B, H, Sq, D).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), grouped(q.to(cdt) * scale))
    return dq, dk, dv, dmask


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
def _as_4d(mask):
    """The mask viewed as 4-d (leading broadcast dims of size 1), never expanded."""
    return None if mask is None else mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _kernel_seed(seed):
    """The seed as the Triton launchers take it: the device tensor itself (they load it on the device); 0 without
    dropout."""
    return 0 if seed is None else seed


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype)


@torch.library.custom_op(f"{LIB}::attention_lean_fwd_opaque", mutates_args=())
def _lean_fwd_opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     seed: Optional[torch.Tensor], causal: bool, scale: float, p: float, block: int,
                     kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lean_fwd`` by the blocked PyTorch code (or the interpreted kernel), opaque to torch.compile."""
    with no_autocast(q):
        if kernel:
            from tempo_ds.kernels import attention as kern

            return kern.attention_forward(q, k, v, _as_4d(mask), causal, scale, p, _kernel_seed(seed))
        return _lean_forward(q, k, v, _as_4d(mask), causal, scale, p, seed, block)


@_lean_fwd_opaque.register_fake
def _(q, k, v, mask, seed, causal, scale, p, block, kernel):
    B, H, Sq, _ = q.shape
    o = q.new_empty(B, Sq, H, v.shape[-1]).transpose(1, 2)
    return o, q.new_empty(B, H, Sq, dtype=_compute_dtype(q.dtype))


def _lean_kernels():
    from tempo_ds.kernels import attention as kern

    return kern._attn_fwd, kern._attn_bwd_preprocess, kern._attn_bwd_dkdv, kern._attn_bwd_dq


@triton_op(f"{LIB}::attention_lean_fwd", kernels=_lean_kernels)
def _lean_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              seed: Optional[torch.Tensor], causal: bool, scale: float, p: float, block: int,
              kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, Sq, Dv] stored as [B, Sq, H, Dv], lse [B, H, Sq]) from the Triton kernel or the blocked code: on
    CUDA the kernel launch itself (visible to torch.compile), elsewhere the opaque op (``_library``)."""
    if kernel and kernels_visible(q):
        from tempo_ds.kernels import attention as kern

        with no_autocast(q):
            return kern.attention_forward(q, k, v, _as_4d(mask), causal, scale, p, _kernel_seed(seed))
    return _lean_fwd_opaque(q, k, v, mask, seed, causal, scale, p, block, kernel)


@torch.library.custom_op(f"{LIB}::attention_lean_bwd_opaque", mutates_args=())
def _lean_bwd_opaque(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], causal: bool,
                     scale: float, p: float, block: int, kernel: bool, mask_grad: bool) -> list[torch.Tensor]:
    """``_lean_bwd`` by the blocked PyTorch code (or the interpreted kernel), opaque to torch.compile."""
    mask4 = _as_4d(mask)
    with no_autocast(q):
        if kernel:
            from tempo_ds.kernels import attention as kern

            dq, dk, dv = kern.attention_backward(do, q, k, v, o, lse, mask4, causal, scale, p, _kernel_seed(seed))
            dmask = None
        else:
            dq, dk, dv, dmask = _lean_backward(do, q, k, v, o, lse, mask4, causal, scale, p, seed, block, mask_grad)
    dmask = dmask.reshape(mask.shape).to(mask.dtype) if dmask is not None else _empty(q)
    return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask]


@_lean_bwd_opaque.register_fake
def _(do, q, k, v, o, lse, mask, seed, causal, scale, p, block, kernel, mask_grad):
    dmask = mask.new_empty(mask.shape) if mask_grad else _empty(q)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask]


@triton_op(f"{LIB}::attention_lean_bwd", kernels=_lean_kernels)
def _lean_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], causal: bool,
              scale: float, p: float, block: int, kernel: bool, mask_grad: bool) -> list[torch.Tensor]:
    """[dq, dk, dv, dmask] in the dtypes and shapes of q, k, v and the mask (dmask empty unless ``mask_grad``): on
    CUDA the kernel launches themselves (the kernel path never computes dmask), elsewhere the opaque op."""
    if kernel and kernels_visible(q):
        from tempo_ds.kernels import attention as kern

        with no_autocast(q):
            dq, dk, dv = kern.attention_backward(do, q, k, v, o, lse, _as_4d(mask), causal, scale, p,
                                                 _kernel_seed(seed))
        return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _empty(q)]
    return _lean_bwd_opaque(do, q, k, v, o, lse, mask, seed, causal, scale, p, block, kernel, mask_grad)


def _lean_setup_context(ctx, inputs, output):
    q, k, v, mask, seed, causal, scale, p, block, kernel = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, mask)
    ctx.seed = seed  # 8 bytes, an input: kept off the saved-tensor hooks (module docstring)
    ctx.args = (causal, scale, p, block, kernel)


def _lean_backward_op(ctx, do, _dlse):
    q, k, v, o, lse, mask = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _lean_bwd(do, q, k, v, o, lse, mask, ctx.seed, *ctx.args, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None, None


torch.library.register_autograd(f"{LIB}::attention_lean_fwd", _lean_backward_op, setup_context=_lean_setup_context)


@torch.library.custom_op(f"{LIB}::attention_tempo_fwd", mutates_args=())
def _tempo_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               seed: Optional[torch.Tensor], causal: bool, scale: float, p: float,
               keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, P [B, H, Sq, Sk] in q's dtype, the keep mask packed to 1 bit); P and the bits are empty unless
    ``keep`` (something needs a gradient), the bits also without dropout."""
    with no_autocast(q):
        o, probs, keep_mask = _tempo_forward(q, k, v, _as_4d(mask), causal, scale, p, seed)
    if not keep:
        return o, _empty(q), _empty(q, torch.uint8)
    packed = pack_bits(keep_mask, 1) if keep_mask is not None else _empty(q, torch.uint8)
    return o, probs, packed


@_tempo_fwd.register_fake
def _(q, k, v, mask, seed, causal, scale, p, keep):
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    o = q.new_empty(B, Sq, H, v.shape[-1]).transpose(1, 2)
    if not keep:
        return o, _empty(q), _empty(q, torch.uint8)
    nbits = packed_nbytes(B * H * Sq * Sk, 1) if p > 0 else 0
    return o, q.new_empty(B, H, Sq, Sk), q.new_empty(nbits, dtype=torch.uint8)


@torch.library.custom_op(f"{LIB}::attention_tempo_bwd", mutates_args=())
def _tempo_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor,
               packed: Optional[torch.Tensor], mask_shape: list[int], mask_dtype: torch.dtype, scale: float,
               p: float, mask_grad: bool) -> list[torch.Tensor]:
    """[dq, dk, dv, dmask] from the saved P and keep bits (dmask of ``mask_shape`` / ``mask_dtype``, or empty)."""
    keep = None
    if packed is not None:
        keep = unpack_bits(packed, 1, probs.numel()).view(probs.shape).bool()
    shape4 = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    with no_autocast(q):
        dq, dk, dv, dmask = _tempo_backward(do, q, k, v, probs, keep, shape4 if mask_grad else None, scale, p)
    dmask = dmask.reshape(mask_shape).to(mask_dtype) if dmask is not None else _empty(q)
    return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask]


@_tempo_bwd.register_fake
def _(do, q, k, v, probs, packed, mask_shape, mask_dtype, scale, p, mask_grad):
    dmask = q.new_empty(mask_shape, dtype=mask_dtype) if mask_grad else _empty(q)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask]


def _tempo_setup_context(ctx, inputs, output):
    q, k, v, mask, seed, causal, scale, p, keep = inputs
    _, probs, packed = output
    ctx.mark_non_differentiable(probs, packed)
    ctx.save_for_backward(q, k, v, probs, packed if p > 0 else None)
    ctx.mask = None if mask is None else (list(mask.shape), mask.dtype)
    ctx.scale, ctx.p = scale, p


def _tempo_backward_op(ctx, do, _dprobs, _dpacked):
    q, k, v, probs, packed = ctx.saved_tensors
    mask_grad = ctx.mask is not None and ctx.needs_input_grad[3]
    shape, dtype = ctx.mask if ctx.mask is not None else ([], q.dtype)
    dq, dk, dv, dmask = _tempo_bwd(do, q, k, v, probs, packed, shape, dtype, ctx.scale, ctx.p, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None


torch.library.register_autograd(f"{LIB}::attention_tempo_fwd", _tempo_backward_op,
                                setup_context=_tempo_setup_context)


# ------------------------------------------------------------------------------------------------
# SDPA on CUDA
# ------------------------------------------------------------------------------------------------
def _sdpa_flash(q, k, v, p, causal, scale):
    """SDPA restricted to its FlashAttention-2 backend (keeps q, k, v, o, lse, Philox seed and offset)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, scale=scale, **gqa)


def _aligned_bias(bias: torch.Tensor) -> bool:
    """What the memory-efficient kernel needs of its bias (``aligned_tensor<8>`` in aten): unit last stride and
    every other stride a multiple of 8 elements."""
    return bias.stride(-1) == 1 and all(s % 8 == 0 for s in bias.stride()[:-1])


def efficient_bias(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The mask as ``aten._scaled_dot_product_efficient_attention`` takes it, prepared as SDPA prepares it: a
    boolean mask becomes an additive bias in q's dtype (0 / -inf) of the mask's own broadcast shape, a float
    mask is cast to q's dtype; unless every stride but the last is a multiple of 8 elements, the last dim is
    padded to a multiple of 8 and sliced back; then it is expanded (a view) to [B, H, Sq, Sk]."""
    bias = _as_4d(mask)
    if bias is None:
        return None
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, -math.inf)
    else:
        bias = bias.to(q.dtype)
    if not _aligned_bias(bias):
        bias = F.pad(bias, (0, 8 - Sk % 8))[..., :Sk]
    return bias.expand(B, H, Sq, Sk)


def _sdpa_efficient(q, k, v, mask, p, causal, scale):
    """``aten._scaled_dot_product_efficient_attention``, which takes a padding mask and ``is_causal`` together
    (the public SDPA takes one or the other); the mask prepared by :func:`efficient_bias`."""
    bias = efficient_bias(mask, q, k)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, need_lse, p, causal,
                                                                  scale=scale)[0]


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check(q, k, v, attn_mask, dropout_p, mode):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed values: {', '.join(MODES)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1]")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if (Bk, Hkv, Sk) != tuple(v.shape[:3]) or Bk != B or Dk != D:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attn_mask must be boolean (True = attend) or floating (additive); got {attn_mask.dtype}")
        full = (B, H, Sq, Sk)
        if attn_mask.dim() > 4 or any(m not in (1, n) for m, n in zip(attn_mask.shape[::-1], full[::-1])):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {full}")


def _autocast_inputs(q, k, v):
    """Cast q, k, v as autocast would for SDPA (which it runs in the lower-precision dtype)."""
    dtype = autocast_dtype(q)
    if dtype is None:
        return q, k, v
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in (q, k, v))


def _describe(q, k, v, attn_mask, dropout_p, is_causal, mode) -> AttentionCall:
    """The static description of a call that ``choose_backend`` decides on (shapes, dtypes, flags, device)."""
    capability, aligned = None, True
    if q.is_cuda:
        props = torch.cuda.get_device_properties(q.device)
        capability = (props.major, props.minor)
        aligned = all(t.stride(-1) == 1 and t.storage_offset() % 8 == 0 for t in (q, k, v))
    mask_kind = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    return AttentionCall(
        device=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1], q_len=q.shape[2],
        kv_len=k.shape[2], heads=q.shape[1], kv_heads=k.shape[1], capability=capability, mask=mask_kind,
        mask_requires_grad=attn_mask is not None and attn_mask.requires_grad, dropout=dropout_p > 0,
        causal=bool(is_causal), requires_grad=any(t.requires_grad for t in (q, k, v)), aligned=aligned,
        triton=use_triton(q), mode=mode)


def plan_for(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, mode="lean"):
    """The :class:`~tempo_ds.ops.attention_dispatch.Plan` (backend and saved set) ``attention`` follows for
    these arguments (after autocast's cast)."""
    _check(q, k, v, attn_mask, dropout_p, mode)
    q, k, v = _autocast_inputs(q, k, v)
    return choose_backend(_describe(q, k, v, attn_mask, dropout_p, is_causal, mode))


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, mode="lean",
              block_size=None):
    """Scaled dot-product attention like ``F.scaled_dot_product_attention`` that saves no s x s tensor.

    q [B, H, Sq, D], k/v [B, Hkv, Sk, D/Dv] with H % Hkv == 0 (grouped-query). ``attn_mask``: boolean
    (True = attend) or additive float, broadcastable to [B, H, Sq, Sk]; it may be combined with
    ``is_causal`` (top-left). A row with no visible key gives 0 (and zero gradients), like SDPA on CPU.
    ``dropout_p`` > 0 drops attention probabilities with a mask regenerated from a seed. ``mode``:
    ``"lean"`` (q, k, v, o, lse saved) or ``"tempo"`` (q, k, v, P and a 1-bit mask saved); the backend that
    runs is ``plan_for(...)``'s (module docstring). ``block_size``: query rows per block of the PyTorch path
    (default: ~1M scores per block).
    """
    _check(q, k, v, attn_mask, dropout_p, mode)
    q, k, v = _autocast_inputs(q, k, v)
    scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    p, causal = float(dropout_p), bool(is_causal)
    backend = choose_backend(_describe(q, k, v, attn_mask, p, causal, mode)).backend
    if backend == "sdpa_flash":
        return _sdpa_flash(q, k, v, p, causal, scale)
    if backend == "sdpa_efficient":
        return _sdpa_efficient(q, k, v, attn_mask, p, causal, scale)
    seed = draw_seed(q.device) if p > 0 else None
    if backend == "tempo":
        inputs = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        return _tempo_fwd(q, k, v, attn_mask, seed, causal, scale, p, keep)[0]
    B, H, Sq, _ = q.shape
    block = int(block_size or _default_block(B, H, Sq, k.shape[2]))
    return _lean_fwd(q, k, v, attn_mask, seed, causal, scale, p, block, backend == "triton")[0]


def __getattr__(name):
    if name == "hf_attention_forward":  # its home is tempo_ds.hf_attention (importing it here would be circular)
        from tempo_ds.hf_attention import hf_attention_forward

        return hf_attention_forward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

Dropout draws one seed per call from the global RNG (``_rng.draw_seed``), so every checkpoint flavour
recomputes the same mask. ``dropout_p`` is applied whenever it is > 0, like SDPA's; ``LeanAttention``
passes 0 in eval mode (Tempo's attention dropped in eval mode too; ours does not).

Dispatch: on CUDA, without dropout and without a mask, ``mode="lean"`` calls SDPA restricted to its
flash / memory-efficient backends, which save the same q, k, v, o, lse (falling back to ours if neither
backend takes the call). Otherwise ``use_triton(q)`` selects the FlashAttention-2 Triton kernels in
``tempo_ds.kernels.attention`` (not for float64 or a mask that requires grad), and the blocked PyTorch
code below runs everywhere else. On CPU our code always runs: SDPA's CPU flash kernel saves the same
figure without dropout (a boolean mask is saved as an extra float copy), but with dropout it falls back
to the math path and saves ~3 s x s tensors per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tempo_ds.ops import _rng
from tempo_ds.ops._autocast import custom_bwd, custom_fwd
from tempo_ds.ops._bits import pack_bits, unpack_bits
from tempo_ds.ops._dispatch import use_triton
from tempo_ds.ops.dropout import fill_keep_mask

__all__ = ["attention", "hf_attention_forward"]

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
# Autograd Functions
# ------------------------------------------------------------------------------------------------
def _mask_grad(dmask, shape, dtype):
    """The mask's gradient in the mask's own shape and dtype, from its 4-d form (or None)."""
    return None if dmask is None else dmask.reshape(shape).to(dtype)


def _as_4d(mask):
    """The mask viewed as 4-d (leading broadcast dims of size 1), never expanded."""
    return None if mask is None else mask[(None,) * (4 - mask.dim())]


def _lean_forward_any(q, k, v, mask, causal, scale, p, seed, block, kernel_path):
    """(o, lse) from the Triton kernel or the blocked PyTorch code; autocast off, as every dtype is explicit."""
    with torch.autocast(q.device.type, enabled=False):
        if kernel_path:
            from tempo_ds.kernels import attention as kernel

            return kernel.attention_forward(q, k, v, _as_4d(mask), causal, scale, p, seed)
        return _lean_forward(q, k, v, _as_4d(mask), causal, scale, p, seed, block)


def _tempo_forward_any(q, k, v, mask, causal, scale, p, seed):
    with torch.autocast(q.device.type, enabled=False):
        return _tempo_forward(q, k, v, _as_4d(mask), causal, scale, p, seed)


class LeanAttentionFunction(torch.autograd.Function):
    """o = softmax(scale q k^T + mask) v with dropout from ``seed``; saves q, k, v, o, lse (and the mask).

    q [B, H, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv], mask broadcastable to [B, H, Sq, Sk] or None;
    returns o [B, H, Sq, Dv] (stored [B, Sq, H, Dv]). lse is [B, H, Sq] float32 (float64 for float64 q).
    """

    @staticmethod
    @custom_fwd
    def forward(ctx, q, k, v, mask, causal, scale, p, seed, block, kernel_path):
        o, lse = _lean_forward_any(q, k, v, mask, causal, scale, p, seed, block, kernel_path)
        ctx.causal, ctx.scale, ctx.p, ctx.seed, ctx.block = causal, scale, p, seed, block
        ctx.kernel_path = kernel_path
        ctx.has_mask = mask is not None
        ctx.save_for_backward(q, k, v, o, lse, *([mask] if mask is not None else []))
        return o

    @staticmethod
    @custom_bwd
    def backward(ctx, do):
        q, k, v, o, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        mask4 = _as_4d(mask)
        with torch.autocast(q.device.type, enabled=False):
            if ctx.kernel_path:
                from tempo_ds.kernels import attention as kernel

                dq, dk, dv = kernel.attention_backward(do, q, k, v, o, lse, mask4, ctx.causal, ctx.scale, ctx.p,
                                                       ctx.seed)
                dmask = None
            else:
                dq, dk, dv, dmask = _lean_backward(do, q, k, v, o, lse, mask4, ctx.causal, ctx.scale, ctx.p,
                                                   ctx.seed, ctx.block, ctx.needs_input_grad[3])
        dmask = _mask_grad(dmask, mask.shape, mask.dtype) if mask is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, None, None, None, None, None, None


class TempoAttentionFunction(torch.autograd.Function):
    """Tempo's attention: saves q, k, v, the softmax output P [B, H, Sq, Sk] (q's dtype) and the dropout
    keep mask packed to 1 bit per element (ceil(B*H*Sq*Sk / 8) bytes, only when p > 0)."""

    @staticmethod
    @custom_fwd
    def forward(ctx, q, k, v, mask, causal, scale, p, seed):
        o, probs, keep = _tempo_forward_any(q, k, v, mask, causal, scale, p, seed)
        packed = [pack_bits(keep, 1)] if keep is not None else []
        ctx.scale, ctx.p = scale, p
        ctx.mask_shape = None if mask is None else (tuple(_as_4d(mask).shape), tuple(mask.shape), mask.dtype)
        ctx.save_for_backward(q, k, v, probs, *packed)
        return o

    @staticmethod
    @custom_bwd
    def backward(ctx, do):
        q, k, v, probs, *packed = ctx.saved_tensors
        keep = None
        if packed:
            keep = unpack_bits(packed[0], 1, probs.numel()).view(probs.shape).bool()
        mask_grad = ctx.needs_input_grad[3]
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv, dmask = _tempo_backward(do, q, k, v, probs, keep, ctx.mask_shape[0] if mask_grad else None,
                                                ctx.scale, ctx.p)
        if dmask is not None:
            dmask = _mask_grad(dmask, ctx.mask_shape[1], ctx.mask_shape[2])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, None, None, None, None


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
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in (q, k, v))


def _try_sdpa(q, k, v, is_causal, scale):
    """SDPA on its flash / memory-efficient CUDA backends (they save q, k, v, o, lse), or None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # "No available kernel": neither backend takes these shapes / dtypes
        return None


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, mode="lean",
              block_size=None):
    """Scaled dot-product attention like ``F.scaled_dot_product_attention`` that saves no s x s tensor.

    q [B, H, Sq, D], k/v [B, Hkv, Sk, D/Dv] with H % Hkv == 0 (grouped-query). ``attn_mask``: boolean
    (True = attend) or additive float, broadcastable to [B, H, Sq, Sk]; it may be combined with
    ``is_causal`` (top-left). A row with no visible key gives 0 (and zero gradients), like SDPA on CPU.
    ``dropout_p`` > 0 drops attention probabilities with a mask regenerated from a seed. ``mode``:
    ``"lean"`` (q, k, v, o, lse saved) or ``"tempo"`` (q, k, v, P and a 1-bit mask saved).
    ``block_size``: query rows per block of the PyTorch path (default: ~1M scores per block).
    """
    _check(q, k, v, attn_mask, dropout_p, mode)
    q, k, v = _autocast_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if mode == "lean" and q.is_cuda and dropout_p == 0 and attn_mask is None:
        out = _try_sdpa(q, k, v, is_causal, scale)
        if out is not None:
            return out
    seed = _rng.draw_seed() if dropout_p > 0 else 0
    block = block_size or _default_block(B, H, Sq, Sk)
    inputs = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if mode == "tempo":
        if needs_grad:
            return TempoAttentionFunction.apply(q, k, v, attn_mask, is_causal, scale, dropout_p, seed)
        return _tempo_forward_any(q, k, v, attn_mask, is_causal, scale, dropout_p, seed)[0]
    kernel_path = (q.dtype != torch.float64 and use_triton(q)
                   and not (attn_mask is not None and attn_mask.requires_grad))
    if needs_grad:
        return LeanAttentionFunction.apply(q, k, v, attn_mask, is_causal, scale, dropout_p, seed, block, kernel_path)
    return _lean_forward_any(q, k, v, attn_mask, is_causal, scale, dropout_p, seed, block, kernel_path)[0]


def compact_mask(mask: torch.Tensor | None, causal_allowed: bool) -> tuple[torch.Tensor | None, bool]:
    """Reduce a 4-D boolean ``[b, 1, s_q, s_k]`` mask to ``(padding row [b, 1, 1, s_k] or None, is_causal)``
    when that is exactly what it holds (checked elementwise); otherwise return it unchanged.

    Whatever the Function keeps of its mask is saved for backward, and transformers builds full s x s masks
    even when they only carry padding and causality."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2] == 1:
        return mask, False
    row = mask[..., -1:, :].clone()  # not a view: a view would keep the whole s x s mask alive
    if bool((mask == row).all()):
        return (None if bool(row.all()) else row), False
    q, k = mask.shape[-2:]
    if causal_allowed and q == k:
        tril = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_()
        if bool((mask == (tril & row)).all()):
            return (None if bool(row.all()) else row), True
    return mask, False


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, mode="lean",
                         **kwargs):
    """A transformers 5.x attention function (``AttentionInterface.register(name, hf_attention_forward)``).

    Follows ``sdpa_attention_forward``: query [b, h, s_q, d], key/value [b, h_kv, s_k, d] (grouped-query
    heads are handled natively, ``module.num_key_value_groups`` is not needed); ``attention_mask`` is
    None, a boolean 4-d mask (True = attend, from ``sdpa_mask``) or an additive float 4-d mask (from
    ``eager_mask``). A boolean mask that only carries padding and causality is reduced to a padding row
    (see ``compact_mask``), so no s x s mask is saved. Causality comes from ``kwargs["is_causal"]`` or
    ``module.is_causal``. ``dropout`` is already 0 in eval mode (the HF modules pass
    ``0.0 if not self.training``). An additive ``position_bias`` (T5-style) is added to the mask.
    ``mode`` is ``attention``'s. Returns ``(attn_output [b, s_q, h, d], None)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("hf_attention_forward does not support `softcap`; use the eager attention")
    if kwargs.get("cache") is not None:
        raise ValueError("hf_attention_forward does not support a paged `cache`; use sdpa or eager for generation")
    q_len = query.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = q_len > 1 and bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask, mask_causal = compact_mask(attention_mask, is_causal)
    if attention_mask is not None:
        # a causal mask's rows already hold causality; a bidirectional one (padding only) turns it off
        is_causal = mask_causal
    if is_causal and mask is None and key.shape[2] > q_len:  # prefill of an empty static cache, like sdpa
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias[..., : key.shape[2]]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    out = attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                    mode=mode)
    return out.transpose(1, 2).contiguous(), None

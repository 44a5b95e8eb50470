"""FlashAttention-2 in Triton: forward and backward that never materialise the s x s probabilities.

This is the kernel behind ``tempo_ds.ops.attention(mode="lean")`` on CUDA. It follows Triton's tutorial
*06-fused-attention* and FlashAttention-2 (Dao, 2023), written for clarity rather than the last few
percent; what it adds is what our op needs: an arbitrary (broadcast) boolean or additive mask, top-left
causal masking for any Sq, Sk, grouped-query heads, attention dropout from a seed through the same
counter hash as the PyTorch path (``kernels/dropout.py``), and any strides for q, k, v.

Forward (one program per (batch*head, block of BLOCK_M query rows))
-------------------------------------------------------------------
The program walks the key blocks once, keeping for every row the running maximum ``m``, the running
sum ``l`` of ``exp(s - m)`` and the unnormalised output ``acc`` (the *online softmax*)::

    s     = scale * q k_j^T + mask                       [BLOCK_M, BLOCK_N], float32
    m'    = max(m, rowmax(s));   alpha = exp(m - m')     (m' = -inf -> use 0: the row saw no key yet)
    p     = exp(s - m')
    l     = alpha * l + rowsum(p)
    acc   = alpha * acc + (p * keep) v_j                 keep = dropout mask of these elements
    o     = acc / l / (1 - p_drop),     lse = m + log(l) (-inf and o = 0 for a row that sees no key)

Dropout applies to the normalised probabilities; normalising is a per-row scale, so dropping terms of
the unnormalised sum and dividing by the undropped ``l`` afterwards is the same thing.

Backward
--------
``_attn_bwd_preprocess`` computes ``Di = rowsum(dO * O)``. Then, as in FlashAttention-2, two kernels
recompute ``P = exp(s - lse)`` block by block instead of loading it:

* ``_attn_bwd_dkdv``: one program per (batch*kv_head, block of BLOCK_N keys) loops over the G query
  heads that share this k/v head and over all query blocks, accumulating
  ``dV += (P * Z)^T dO`` and ``dK += scale * dS^T Q`` with ``dP = (dO V^T) * Z``, ``dS = P * (dP - Di)``
  (Z = keep / (1 - p_drop)). Summing over the group inside one program needs no atomics.
* ``_attn_bwd_dq``: one program per (batch*head, block of BLOCK_M queries) loops over the key blocks:
  ``dQ += scale * dS K``.

The dropout mask of element (b, h, i, j) is ``hash(seed, ((b*H + h)*Sq + i)*Sk + j)``, exactly as in
``tempo_ds.ops.attention``, so both paths drop the same probabilities.

Numerics: scores, softmax statistics and accumulators are float32; the probabilities are cast to the
input dtype before the P V and dS K / dS^T Q products (as in FlashAttention); float32 inputs use
``input_precision="ieee"`` (no TF32). Not used for float64 (the op keeps its PyTorch path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tempo_ds.kernels.dropout import uniform_u32

BLOCK_M = 64
BLOCK_N = 64

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _scores(q, k_t, scale, rows, cols, off_b, off_h, Sq, Sk,
            M, smb, smh, smm, smn,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """Masked scores of a [BLOCK_M, BLOCK_N] tile: scale * q k^T + mask, -inf where a key is invisible."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    visible = (cols[None, :] < Sk) & (rows[:, None] >= 0)
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None])
    if MASK_KIND != 0:
        inside = (rows[:, None] < Sq) & (cols[None, :] < Sk)
        m_ptrs = (M + off_b.to(tl.int64) * smb + off_h.to(tl.int64) * smh + rows[:, None].to(tl.int64) * smm
                  + cols[None, :] * smn)  # int64: a full [Sq, Sk] mask may hold more than 2**31 elements
        if MASK_KIND == 1:
            visible = visible & (tl.load(m_ptrs, mask=inside, other=1) != 0)
        else:
            s += tl.load(m_ptrs, mask=inside, other=0.0).to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _keep(seed, threshold, off_b, off_h, H, Sq, Sk, rows, cols):
    """Dropout keep mask of the tile: hash(seed, ((b*H + h)*Sq + i)*Sk + j) >= threshold."""
    base = (off_b.to(tl.int64) * H + off_h) * Sq
    index = (base + rows[:, None].to(tl.int64)) * Sk + cols[None, :].to(tl.int64)
    return uniform_u32(seed, index).to(tl.int64) >= threshold


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(Q, K, V, O, LSE, M,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              smb, smh, smm, smn,
              H, G, Sq, Sk, scale, seed, threshold, drop_scale,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    off_kh = off_h // G
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh + rows[:, None] * sqm + d[None, :] * sqd,
                mask=(rows[:, None] < Sq) & (d[None, :] < HEAD_D), other=0.0)
    k_base = K + off_b.to(tl.int64) * skb + off_kh.to(tl.int64) * skh
    v_base = V + off_b.to(tl.int64) * svb + off_kh.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_base + cols[None, :] * skn + d[:, None] * skd,
                      mask=(cols[None, :] < Sk) & (d[:, None] < HEAD_D), other=0.0)
        s = _scores(q, k_t, scale, rows, cols, off_b, off_h, Sq, Sk, M, smb, smh, smm, smn,
                    IS_CAUSAL, MASK_KIND, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, threshold, off_b, off_h, H, Sq, Sk, rows, cols), p, 0.0)
        v = tl.load(v_base + cols[:, None] * svn + dv[None, :] * svd,
                    mask=(cols[:, None] < Sk) & (dv[None, :] < HEAD_DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_safe + tl.log(l_i)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DROPOUT:
        o = o * drop_scale
    tl.store(O + off_b.to(tl.int64) * sob + off_h.to(tl.int64) * soh + rows[:, None] * som + dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=(rows[:, None] < Sq) & (dv[None, :] < HEAD_DV))
    tl.store(LSE + off_bh.to(tl.int64) * Sq + rows, lse, mask=rows < Sq)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Sq,
                         HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    off_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    inside = (rows[:, None] < Sq) & (dv[None, :] < HEAD_DV)
    o = tl.load(O + off_b * sob + off_h * soh + rows[:, None] * som + dv[None, :] * sod, mask=inside, other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + rows[:, None] * sdm + dv[None, :] * sdd, mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * Sq + rows, delta, mask=rows < Sq)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, M,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   smb, smh, smm, smn,
                   H, Hkv, G, Sq, Sk, scale, seed, threshold, drop_scale,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bkh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = off_bkh // Hkv
    off_kh = off_bkh % Hkv
    cols = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_t = tl.load(K + off_b.to(tl.int64) * skb + off_kh.to(tl.int64) * skh + cols[None, :] * skn + d[:, None] * skd,
                  mask=(cols[None, :] < Sk) & (d[:, None] < HEAD_D), other=0.0)
    v_t = tl.load(V + off_b.to(tl.int64) * svb + off_kh.to(tl.int64) * svh + cols[None, :] * svn + dv[:, None] * svd,
                  mask=(cols[None, :] < Sk) & (dv[:, None] < HEAD_DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if IS_CAUSAL:  # query rows above this key block see none of its keys
        lo = (start_n // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        off_h = off_kh * G + g
        q_base = Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh
        do_base = DO + off_b.to(tl.int64) * sdb + off_h.to(tl.int64) * sdh
        row_base = (off_b.to(tl.int64) * H + off_h) * Sq
        for start_m in range(lo, Sq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + rows[:, None] * sqm + d[None, :] * sqd,
                        mask=(rows[:, None] < Sq) & (d[None, :] < HEAD_D), other=0.0)
            do = tl.load(do_base + rows[:, None] * sdm + dv[None, :] * sdd,
                         mask=(rows[:, None] < Sq) & (dv[None, :] < HEAD_DV), other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=rows < Sq, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: P = 0
            delta = tl.load(DELTA + row_base + rows, mask=rows < Sq, other=0.0)
            s = _scores(q, k_t, scale, rows, cols, off_b, off_h, Sq, Sk, M, smb, smh, smm, smn,
                        IS_CAUSAL, MASK_KIND, PRECISION)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(seed, threshold, off_b, off_h, H, Sq, Sk, rows, cols)
                p_drop = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                p_drop = p
            dvacc += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    out = off_bkh.to(tl.int64) * Sk
    tl.store(DK + (out + cols[:, None]) * HEAD_D + d[None, :], dk.to(DK.dtype.element_ty),
             mask=(cols[:, None] < Sk) & (d[None, :] < HEAD_D))
    tl.store(DV + (out + cols[:, None]) * HEAD_DV + dv[None, :], dvacc.to(DV.dtype.element_ty),
             mask=(cols[:, None] < Sk) & (dv[None, :] < HEAD_DV))


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, M,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 smb, smh, smm, smn,
                 H, G, Sq, Sk, scale, seed, threshold, drop_scale,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    off_kh = off_h // G
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b.to(tl.int64) * sqb + off_h.to(tl.int64) * sqh + rows[:, None] * sqm + d[None, :] * sqd,
                mask=(rows[:, None] < Sq) & (d[None, :] < HEAD_D), other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * sdb + off_h.to(tl.int64) * sdh + rows[:, None] * sdm + dv[None, :] * sdd,
                 mask=(rows[:, None] < Sq) & (dv[None, :] < HEAD_DV), other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Sq + rows, mask=rows < Sq, other=0.0)
    k_base = K + off_b.to(tl.int64) * skb + off_kh.to(tl.int64) * skh
    v_base = V + off_b.to(tl.int64) * svb + off_kh.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Sk
    if IS_CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * skn + d[None, :] * skd,
                    mask=(cols[:, None] < Sk) & (d[None, :] < HEAD_D), other=0.0)
        v_t = tl.load(v_base + cols[None, :] * svn + dv[:, None] * svd,
                      mask=(cols[None, :] < Sk) & (dv[:, None] < HEAD_DV), other=0.0)
        s = _scores(q, tl.trans(k), scale, rows, cols, off_b, off_h, Sq, Sk, M, smb, smh, smm, smn,
                    IS_CAUSAL, MASK_KIND, PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(seed, threshold, off_b, off_h, H, Sq, Sk, rows, cols), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + (off_bh.to(tl.int64) * Sq + rows[:, None]) * HEAD_D + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(rows[:, None] < Sq) & (d[None, :] < HEAD_D))


# ------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------
def _mask_args(mask4, shape, like):
    """(pointer tensor, its 4 strides broadcast to ``shape``, MASK_KIND); bool masks are read as uint8."""
    if mask4 is None:
        return like, (0, 0, 0, 0), MASK_NONE
    m = mask4.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), MASK_BOOL
    return m, m.stride(), MASK_ADD


def _settings(q, v, p, seed):
    from tempo_ds.ops._rng import drop_threshold

    D, Dv = q.shape[-1], v.shape[-1]
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    small = max(block_d, block_dv) > 128  # keep the tiles within shared memory for large heads
    return dict(
        seed=seed, threshold=drop_threshold(p), drop_scale=0.0 if p == 1.0 else 1.0 / (1.0 - p),
        HEAD_D=D, HEAD_DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_M=min(BLOCK_M, 32) if small else BLOCK_M, BLOCK_N=min(BLOCK_N, 32) if small else BLOCK_N,
        DROPOUT=p > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def attention_forward(q, k, v, mask4, causal, scale, p, seed):
    """(o [B, H, Sq, Dv] stored as [B, Sq, H, Dv], lse [B, H, Sq] float32) for the inputs of ``ops.attention``."""
    B, H, Sq, _ = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    o = torch.empty(B, Sq, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    m, m_strides, kind = _mask_args(mask4, (B, H, Sq, Sk), q)
    cfg = _settings(q, v, p, seed)
    grid = (B * H, triton.cdiv(Sq, cfg["BLOCK_M"]))
    _attn_fwd[grid](q, k, v, o, lse, m, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *m_strides,
                    H, H // Hkv, Sq, Sk, scale, IS_CAUSAL=causal, MASK_KIND=kind, **cfg)
    return o, lse


def attention_backward(do, q, k, v, o, lse, mask4, causal, scale, p, seed):
    """(dq, dk, dv) in the dtypes of q, k, v (contiguous) from the saved q, k, v, o, lse."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dq = torch.zeros(B, H, Sq, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=k.dtype, device=k.device)
    dv = torch.zeros(B, Hkv, Sk, Dv, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    m, m_strides, kind = _mask_args(mask4, (B, H, Sq, Sk), q)
    cfg = _settings(q, v, p, seed)
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess[(B * H, triton.cdiv(Sq, cfg["BLOCK_M"]))](
        o, do, delta, *o.stride(), *do.stride(), H, Sq,
        HEAD_DV=Dv, BLOCK_DV=cfg["BLOCK_DV"], BLOCK_M=cfg["BLOCK_M"])
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *m_strides)
    _attn_bwd_dkdv[(B * Hkv, triton.cdiv(Sk, cfg["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, m, *strides, H, Hkv, H // Hkv, Sq, Sk, scale,
        IS_CAUSAL=causal, MASK_KIND=kind, **cfg)
    _attn_bwd_dq[(B * H, triton.cdiv(Sq, cfg["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, m, *strides, H, H // Hkv, Sq, Sk, scale,
        IS_CAUSAL=causal, MASK_KIND=kind, **cfg)
    return dq, dk, dv

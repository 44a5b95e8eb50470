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

Launch: the dropout seed is a 1-element int64 device tensor the kernels load (never read by the host); the
tiles of each kernel come from :func:`tiles`, a pure function of head dim, dtype and the shared memory a
program may use (read from the CUDA driver; sm_80's under the interpreter), which the ahead-of-time compile
check (``tempo_ds.kernels.aot``) calls for sm_80 and sm_90.

Numerics: scores, softmax statistics and accumulators are float32; the probabilities are cast to the
input dtype before the P V and dS K / dS^T Q products (as in FlashAttention); float32 inputs use
``input_precision="ieee"`` (no TF32). Not used for float64 (the op keeps its PyTorch path).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tempo_ds.kernels._launch import launcher, seed_tensor, shared_memory_limit
from tempo_ds.kernels._spec import POINTER, SHORT, spec
from tempo_ds.kernels.dropout import uniform_u32

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
TENSOR_SEED = True  # the launchers take the seed as a 1-element int64 device tensor (an int still works)


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


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, M,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              smb, smh, smm, smn,
              H, G, Sq, Sk, scale, seed_ptr, threshold, drop_scale,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    off_kh = off_h // G
    if DROPOUT:  # the seed stays on the device: loaded here, never read by the host
        seed = tl.load(seed_ptr)
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


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, M,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   smb, smh, smm, smn,
                   H, Hkv, G, Sq, Sk, scale, seed_ptr, threshold, drop_scale,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bkh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = off_bkh // Hkv
    off_kh = off_bkh % Hkv
    if DROPOUT:  # the seed stays on the device: loaded here, never read by the host
        seed = tl.load(seed_ptr)
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


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, M,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 smb, smh, smm, smn,
                 H, G, Sq, Sk, scale, seed_ptr, threshold, drop_scale,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    off_kh = off_h // G
    if DROPOUT:  # the seed stays on the device: loaded here, never read by the host
        seed = tl.load(seed_ptr)
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
# Block sizes: a pure function of head dim, dtype and the shared memory a program may use
# ------------------------------------------------------------------------------------------------
class Tiles(NamedTuple):
    """One launch configuration: query rows and keys per program, warps, software-pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates per (input class, BLOCK_D bucket), best first: tiles of the forward, dK/dV and dQ kernels. Chosen
# from the ahead-of-time compile matrix (``tempo-ds aot``) as the largest tiles that compile without register
# spills (at most a few tens of bytes that ptxas spills below 128 registers in float32) in the plainest and the
# costliest variants (no mask; additive mask + dropout + causal + GQA) on sm_80 and sm_90; the second entry
# of each list is for devices with less shared memory (sm_86/89: 99 KB, sm_75: 64 KB). float32 runs IEEE dot
# products on CUDA cores (``input_precision="ieee"``: no TF32), which hold both operands in registers and
# shared memory: 64 x 64 tiles needed 180-247 KB there and spilled up to 24 KB per thread.
_CANDIDATES = {
    ("16bit", 64): [(Tiles(64, 64, 8, 2), Tiles(64, 32, 8, 2), Tiles(64, 32, 8, 2)),
                    (Tiles(32, 32, 4, 2), Tiles(32, 32, 4, 2), Tiles(32, 32, 4, 2))],
    ("16bit", 128): [(Tiles(64, 32, 8, 2), Tiles(32, 64, 8, 2), Tiles(64, 32, 8, 2)),
                     (Tiles(32, 32, 8, 2), Tiles(32, 32, 8, 2), Tiles(32, 32, 8, 2))],
    ("16bit", 256): [(Tiles(32, 32, 8, 2), Tiles(32, 32, 8, 1), Tiles(32, 32, 8, 2)),
                     (Tiles(16, 32, 8, 1), Tiles(16, 32, 8, 1), Tiles(16, 32, 8, 1))],
    ("fp32", 64): [(Tiles(32, 32, 8, 2), Tiles(32, 32, 8, 2), Tiles(32, 32, 4, 2)),
                   (Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1))],
    ("fp32", 128): [(Tiles(32, 32, 8, 2), Tiles(16, 32, 8, 1), Tiles(32, 32, 8, 1)),
                    (Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1))],
    ("fp32", 256): [(Tiles(16, 32, 8, 1), Tiles(16, 16, 8, 1), Tiles(16, 32, 8, 1)),
                    (Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1))],
}
KERNELS = ("fwd", "dkdv", "dq")
PREPROCESS_ROWS = 64  # rows per program of rowsum(dO * O): a streaming kernel without tiles worth tuning


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def shared_bytes_bound(kernel: str, t: Tiles, block_d: int, block_dv: int, esize: int) -> int:
    """An upper bound of the shared memory (bytes) of ``kernel`` ("fwd", "dkdv", "dq") at tiles ``t``: the tiles
    it streams through shared memory, once per pipeline stage, plus float32 [BLOCK_M, BLOCK_N] layout
    conversions. The compile check asserts that every specialization stays within it."""
    m, n, s = t.block_m, t.block_n, t.num_stages
    if kernel == "fwd":      # q resident; k, v streamed
        return (m * block_d + s * n * (block_d + block_dv)) * esize + m * n * 4
    if kernel == "dkdv":     # k, v resident; q, dO streamed; P^T, dS^T transposed
        return (n * (block_d + block_dv) + s * m * (block_d + block_dv)) * esize + 2 * m * n * 4
    if kernel == "dq":       # q, dO resident; k, v streamed
        return (m * (block_d + block_dv) + s * n * (block_d + block_dv)) * esize + 2 * m * n * 4
    raise ValueError(f"kernel={kernel!r} must be 'fwd', 'dkdv' or 'dq'")


def tiles(head_dim: int, head_dim_v: int, dtype: torch.dtype, shared_memory: int) -> tuple[Tiles, Tiles, Tiles]:
    """Tiles of the forward, dK/dV and dQ kernels for ``dtype`` inputs with these head dims on a device whose
    programs may use ``shared_memory`` bytes: the first candidate whose :func:`shared_bytes_bound` fits every
    kernel, as Triton's fused-attention tutorial prunes its autotuning configs. A pure function (no device query).
    Head dims above 256 (compiled by no check) take the smallest tiles."""
    if dtype not in SHORT:
        raise ValueError(f"the attention kernel takes float32, float16 or bfloat16 inputs, not {dtype}")
    block_d, block_dv = _block_d(head_dim), _block_d(head_dim_v)
    candidates = _CANDIDATES[("fp32" if dtype == torch.float32 else "16bit", min(max(block_d, block_dv, 64), 256))]
    if max(block_d, block_dv) > 256:
        return candidates[-1]
    for candidate in candidates:
        if all(shared_bytes_bound(k, t, block_d, block_dv, dtype.itemsize) <= shared_memory
               for k, t in zip(KERNELS, candidate)):
            return candidate
    return candidates[-1]


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _mask_args(mask4, shape, like):
    """(pointer tensor, its 4 strides broadcast to ``shape``, MASK_KIND); bool masks are read as uint8."""
    if mask4 is None:
        return like, (0, 0, 0, 0), MASK_NONE
    m = mask4.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), MASK_BOOL
    return m, m.stride(), MASK_ADD


def _common(q, v, p):
    """Constexprs and scalars shared by all kernels of one call."""
    from tempo_ds.ops._rng import drop_threshold

    D, Dv = q.shape[-1], v.shape[-1]
    return dict(threshold=drop_threshold(p), drop_scale=0.0 if p == 1.0 else 1.0 / (1.0 - p),
                HEAD_D=D, HEAD_DV=Dv, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv), DROPOUT=p > 0,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _tiles_for(q, v) -> tuple[Tiles, Tiles, Tiles]:
    return tiles(q.shape[-1], v.shape[-1], q.dtype, shared_memory_limit(q.device))


def _seed_arg(seed, p, device):
    """The seed pointer: the caller's seed as a device tensor (an int is copied), or any int64 tensor when no
    dropout reads it."""
    if p > 0:
        return seed_tensor(seed, device)
    return seed if isinstance(seed, torch.Tensor) else torch.zeros(1, dtype=torch.int64, device=device)


def attention_forward(q, k, v, mask4, causal, scale, p, seed):
    """(o [B, H, Sq, Dv] stored as [B, Sq, H, Dv], lse [B, H, Sq] float32) for the inputs of ``ops.attention``.

    ``seed``: a 1-element int64 tensor on q's device (``tempo_ds.ops._library.draw_seed``) or an int."""
    B, H, Sq, _ = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    o = torch.empty(B, Sq, H, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    m, m_strides, kind = _mask_args(mask4, (B, H, Sq, Sk), q)
    t = _tiles_for(q, v)[0]
    grid = (B * H, triton.cdiv(Sq, t.block_m))
    launcher(_attn_fwd)[grid](q, k, v, o, lse, m, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *m_strides,
                              H, H // Hkv, Sq, Sk, scale, _seed_arg(seed, p, q.device), IS_CAUSAL=causal,
                              MASK_KIND=kind, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps,
                              num_stages=t.num_stages, **_common(q, v, p))
    return o, lse


def attention_backward(do, q, k, v, o, lse, mask4, causal, scale, p, seed):
    """(dq, dk, dv) in the dtypes of q, k, v (contiguous) from the saved q, k, v, o, lse and the forward's seed."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dq = torch.zeros(B, H, Sq, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=k.dtype, device=k.device)
    dv = torch.zeros(B, Hkv, Sk, Dv, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    m, m_strides, kind = _mask_args(mask4, (B, H, Sq, Sk), q)
    _, t_kv, t_q = _tiles_for(q, v)
    common = dict(IS_CAUSAL=causal, MASK_KIND=kind, **_common(q, v, p))
    seed_ptr = _seed_arg(seed, p, q.device)
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    launcher(_attn_bwd_preprocess)[(B * H, triton.cdiv(Sq, PREPROCESS_ROWS))](
        o, do, delta, *o.stride(), *do.stride(), H, Sq, HEAD_DV=Dv, BLOCK_DV=_block_d(Dv), BLOCK_M=PREPROCESS_ROWS)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *m_strides)
    launcher(_attn_bwd_dkdv)[(B * Hkv, triton.cdiv(Sk, t_kv.block_n))](
        q, k, v, do, lse, delta, dk, dv, m, *strides, H, Hkv, H // Hkv, Sq, Sk, scale, seed_ptr,
        BLOCK_M=t_kv.block_m, BLOCK_N=t_kv.block_n, num_warps=t_kv.num_warps, num_stages=t_kv.num_stages, **common)
    launcher(_attn_bwd_dq)[(B * H, triton.cdiv(Sq, t_q.block_m))](
        q, k, v, do, lse, delta, dq, m, *strides, H, H // Hkv, Sq, Sk, scale, seed_ptr,
        BLOCK_M=t_q.block_m, BLOCK_N=t_q.block_n, num_warps=t_q.num_warps, num_stages=t_q.num_stages, **common)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Ahead-of-time specializations
# ------------------------------------------------------------------------------------------------
HEAD_DIMS = (64, 80, 96, 128, 256)
MASKS = {"none": MASK_NONE, "bool": MASK_BOOL, "add": MASK_ADD}
_STRIDES = {"fwd": ("sq", "sk", "sv", "so"), "dkdv": ("sq", "sk", "sv", "sd"), "dq": ("sq", "sk", "sv", "sd")}  # prefixes


def _attention_spec(kernel, dtype, head_dim, mask, dropout, causal, gqa, arch):
    """The specialization of ``kernel`` ("fwd", "dkdv", "dq") that one attention call launches on ``sm_<arch>``."""
    from tempo_ds.kernels._launch import SHARED_MEMORY

    t = dict(zip(KERNELS, tiles(head_dim, head_dim, dtype, SHARED_MEMORY[arch])))[kernel]
    fn = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kernel]
    ptr = POINTER[dtype]
    types = {name: ptr for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    types.update(LSE="*fp32", DELTA="*fp32", M={"none": ptr, "bool": "*u8", "add": ptr}[mask], seed_ptr="*i64",
                 scale="fp32", drop_scale="fp32", threshold="i64")
    # Triton turns an integer argument equal to 1 into a constant: unit strides, and G without GQA.
    unit = {f"{p}d": 1 for p in _STRIDES[kernel]}
    if mask != "none":
        unit["smn"] = 1
    if not gqa:
        unit["G"] = 1
    d = _block_d(head_dim)
    constexprs = dict(unit, HEAD_D=head_dim, HEAD_DV=head_dim, BLOCK_D=d, BLOCK_DV=d, BLOCK_M=t.block_m,
                      BLOCK_N=t.block_n, IS_CAUSAL=causal, MASK_KIND=MASKS[mask], DROPOUT=dropout,
                      PRECISION="ieee" if dtype == torch.float32 else "tf32")
    # every other runtime argument is an int32 (strides, sizes); the q/k/v/o/dO strides are multiples of the
    # head dim (a multiple of 16), as Triton's launch sees them
    types.update({a: "i32" for a in fn.arg_names if a not in types and a not in constexprs})
    types = {a: ty for a, ty in types.items() if a in fn.arg_names and a not in constexprs}
    name = (f"attention.{kernel}[{SHORT[dtype]},d{head_dim},mask={mask}" + (",dropout" if dropout else "")
            + (",causal" if causal else "") + (",gqa" if gqa else "") + "]")
    return spec(name, fn, types, constexprs, num_warps=t.num_warps, num_stages=t.num_stages,
                divisible_by_16=tuple(a for a in types if a[:2] in _STRIDES[kernel] and types[a] == "i32"))


def _preprocess_spec(dtype, head_dim):
    ptr = POINTER[dtype]
    types = {"O": ptr, "DO": ptr, "DELTA": "*fp32", **{a: "i32" for a in ("sob", "soh", "som", "sdb", "sdh", "sdm",
                                                                         "H", "Sq")}}
    return spec(f"attention.bwd_preprocess[{SHORT[dtype]},d{head_dim}]", _attn_bwd_preprocess, types,
                dict(sod=1, sdd=1, HEAD_DV=head_dim, BLOCK_DV=_block_d(head_dim), BLOCK_M=PREPROCESS_ROWS),
                num_warps=4, divisible_by_16=("sob", "soh", "som", "sdb", "sdh", "sdm"))


# The CI subset: each kernel, dtype and BLOCK_D bucket, mask kind, dropout, causal and GQA at least once, the
# costliest variant (additive mask + dropout + causal + GQA) at the largest 16-bit tiles, and float32 at head
# dim 128 (which needed 180-247 KB of shared memory at 64 x 64 tiles).
_SUBSET = [
    ("fwd", torch.bfloat16, 128, "add", True, True, True),
    ("dkdv", torch.bfloat16, 128, "add", True, True, True),
    ("dq", torch.float16, 96, "bool", True, False, False),
    ("fwd", torch.float32, 128, "add", True, False, False),
    ("dkdv", torch.float32, 128, "add", True, False, False),
    ("dkdv", torch.bfloat16, 256, "none", False, True, False),
]


def aot_specializations(full: bool = False, arch: int = 90) -> list[dict]:
    """The specializations ``attention_forward``/``attention_backward`` launch on CUDA for ``sm_<arch>``: dtypes
    fp32/bf16/fp16 x head dims 64/80/96/128/256 x masks none/bool/additive x dropout x causal x GQA (``full``),
    each variant's forward, dK/dV and dQ kernels, and the backward's preprocessing; or the subset ``_SUBSET``."""
    if not full:
        return [_attention_spec(*variant, arch) for variant in _SUBSET] + [_preprocess_spec(torch.bfloat16, 128)]
    out = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for dt in dtypes:
        for d in HEAD_DIMS:
            for m in MASKS:
                for drop in (False, True):
                    for causal in (False, True):
                        for gqa in (False, True):
                            out.extend(_attention_spec(k, dt, d, m, drop, causal, gqa, arch) for k in KERNELS)
    out.extend(_preprocess_spec(dt, d) for dt in dtypes for d in HEAD_DIMS)
    return out

"""Which implementation runs an attention call: a pure function of what is known before it runs.

:func:`choose_backend` takes an :class:`AttentionCall` (device capability, dtype, head dims, sequence lengths,
head counts, mask kind, dropout, causality, whether the mask requires grad, the torch version, ...) and
returns a :class:`Plan`: the backend and the tensors it keeps for backward. Nothing in it reads a device
value, so the choice is the same in eager mode, under ``torch.compile`` and in a checkpoint recompute.

Backends, best first for ``mode="lean"``:

* ``"sdpa_flash"`` - PyTorch's FlashAttention-2 (``F.scaled_dot_product_attention`` restricted to
  ``SDPBackend.FLASH_ATTENTION``). Keeps q, k, v, o, the log-sum-exp and a Philox seed and offset.
* ``"sdpa_efficient"`` - PyTorch's memory-efficient kernel (``aten._scaled_dot_product_efficient_attention``,
  called directly so that a padding mask and ``is_causal`` go in together: the public SDPA refuses both at
  once, and folding causality into the mask would keep an s x s bias). Keeps q, k, v, o, the log-sum-exp
  (rows padded to a multiple of 32), a Philox seed and offset, and the mask as an additive bias in q's dtype
  (a boolean mask becomes such a copy; its broadcast dimensions stay of size 1).
* ``"triton"`` - our FlashAttention-2 kernels (``tempo_ds.kernels.attention``): q, k, v, o, lse, the mask.
* ``"pytorch"`` - our blocked PyTorch code (``tempo_ds.ops.attention``): the same tensors as ``"triton"``.
* ``"tempo"`` - ``mode="tempo"`` (Tempo's attention-dropout recomputation): q, k, v, the softmax output and
  a 1-bit dropout mask. No fused kernel keeps the softmax output, so this mode always runs our own code.

Our two keep the 8-byte dropout seed as well (on the autograd context, see ``tempo_ds.ops.attention``).

Dropout in the SDPA backends uses Philox with the CUDA default generator: the kernels keep only its seed
and offset, and ``torch.utils.checkpoint`` (every flavour) restores the CUDA RNG state before recomputing,
so a recompute draws the same mask. Our kernels hash a seed drawn from the same generator (DESIGN.md
section 5, rule 2). The two backends draw different masks for the same seed, as any two dropout
implementations do; each is consistent with itself across forward, backward and recompute.

The constraints below restate ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` (``can_use_flash_attention``
and ``can_use_mem_efficient_attention``) for the calls we make, conservatively where a torch release may
differ: flash needs sm80..sm121 (taken as sm80..sm90 before torch 2.8, conservatively), fp16/bf16, equal q/k/v head dims that are a
multiple of 8 and at most 256 (not a multiple of 8 would make SDPA pad copies of q, k, v, which it then
keeps), no mask, ``Sq == Sk`` when causal, and on sm86-89/sm120-121 in training a head dim <= 192 (or > 224
without dropout); grouped-query heads need torch >= 2.5 (``enable_gqa``). The memory-efficient kernel needs
sm50..sm121, fp32/fp16 (and bf16 from sm80), equal q/k head dims, q and v head dims divisible by the GEMM
alignment (8 for fp16/bf16 on tensor-core GPUs, 4 for fp32 from sm80, 1 otherwise), storage offsets aligned
to it, and as many k/v heads as query heads (grouped-query support for it is recent, PyTorch PR #191085; it is
treated as absent in every release until checked on a GPU; repeating k and v instead would keep them at the
query head count).
Both need the last dimension contiguous and non-empty sequences. A user's ``torch.backends.cuda.enable_*_sdp``
switches are not consulted: tempo_ds picks the kernel itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["AttentionCall", "Plan", "BACKENDS", "TORCH_VERSION", "choose_backend", "saved_set"]

BACKENDS = ("sdpa_flash", "sdpa_efficient", "triton", "pytorch", "tempo")
MASK_KINDS = ("none", "bool", "float")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


TORCH_VERSION = _version(torch.__version__)
_LOW = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionCall:
    """What decides the backend of one call. ``capability`` is the CUDA compute capability (None off CUDA);
    ``mask`` one of ``MASK_KINDS``; ``aligned``: last dims contiguous and storage offsets aligned for the
    memory-efficient kernel's GEMMs; ``triton``: our kernels may run (Triton importable, not disabled)."""

    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    capability: tuple[int, int] | None = None
    mask: str = "none"
    mask_requires_grad: bool = False
    dropout: bool = False
    causal: bool = False
    requires_grad: bool = True
    aligned: bool = True
    triton: bool = False
    mode: str = "lean"
    torch_version: tuple[int, int] = field(default=TORCH_VERSION)


@dataclass(frozen=True)
class Plan:
    """The backend, the tensors it keeps for backward (names, see the module docstring), and why the faster
    backends did not take the call."""

    backend: str
    saved: tuple[str, ...]
    reasons: tuple[str, ...] = ()


def saved_set(backend: str, call: AttentionCall) -> tuple[str, ...]:
    """Names of the tensors ``backend`` keeps for backward on ``call``."""
    if backend == "tempo":
        return ("q", "k", "v", "probs") + (("keep_bits",) if call.dropout else ())
    base = ("q", "k", "v", "o", "lse")
    if backend == "sdpa_flash":
        return base + ("philox_seed", "philox_offset")
    if backend == "sdpa_efficient":
        return base + ("philox_seed", "philox_offset") + (("bias",) if call.mask != "none" else ())
    return base + (("mask",) if call.mask != "none" else ())


def _gemm_alignment(call: AttentionCall) -> int:
    major = call.capability[0]
    half = call.dtype in _LOW
    if major >= 8:
        return 8 if half else 4
    if major >= 7 and half:
        return 8
    return 1


def _flash_refusals(call: AttentionCall) -> list[str]:
    cap, reasons = call.capability, []
    upper = (12, 1) if call.torch_version >= (2, 8) else (9, 0)
    if not (8, 0) <= cap <= upper:
        reasons.append(f"flash: sm{cap[0]}{cap[1]} is outside sm80..sm{upper[0]}{upper[1]}")
    if call.dtype not in _LOW:
        reasons.append(f"flash: {call.dtype} is not float16/bfloat16")
    d, dv = call.head_dim, call.head_dim_v
    if d != dv or d > 256 or d % 8:
        reasons.append(f"flash: head dims {d}/{dv} are not equal multiples of 8 <= 256")
    if call.mask != "none":
        reasons.append("flash: takes no mask")
    if call.causal and call.q_len != call.kv_len:
        reasons.append("flash: causal needs Sq == Sk")
    if call.requires_grad and ((8, 6) <= cap <= (8, 9) or (12, 0) <= cap <= (12, 1)):
        if not (d <= 192 or (not call.dropout and d > 224)):
            reasons.append(f"flash: no backward for head dim {d} on sm{cap[0]}{cap[1]}")
    if call.heads != call.kv_heads and call.torch_version < (2, 5):
        reasons.append("flash: grouped-query heads need torch >= 2.5")
    return reasons


def _efficient_refusals(call: AttentionCall) -> list[str]:
    cap, reasons = call.capability, []
    if not (5, 0) <= cap <= (12, 1):
        reasons.append(f"efficient: sm{cap[0]}{cap[1]} is outside sm50..sm121")
    allowed = (torch.float32, torch.float16) + ((torch.bfloat16,) if cap >= (8, 0) else ())
    if call.dtype not in allowed:
        reasons.append(f"efficient: {call.dtype} is not one of {', '.join(map(str, allowed))}")
    align = _gemm_alignment(call)
    if call.head_dim % align or call.head_dim_v % align:
        reasons.append(f"efficient: head dims {call.head_dim}/{call.head_dim_v} are not multiples of {align}")
    if call.heads != call.kv_heads:
        reasons.append("efficient: no grouped-query heads (k/v would be repeated and kept)")
    return reasons


def choose_backend(call: AttentionCall) -> Plan:
    """The backend that runs ``call`` and the tensors it keeps (see the module docstring for the rules)."""
    if call.mode == "tempo":
        return Plan("tempo", saved_set("tempo", call), ("tempo mode keeps the softmax output",))
    if call.mask not in MASK_KINDS:
        raise ValueError(f"mask={call.mask!r} is not supported; allowed values: {', '.join(MASK_KINDS)}")
    reasons: list[str] = []
    if call.device == "cuda" and call.capability is not None:
        common = []
        if call.q_len == 0 or call.kv_len == 0:
            common.append("sdpa: empty sequence")
        if not call.aligned:
            common.append("sdpa: last dim not contiguous or storage offsets unaligned")
        flash = common + _flash_refusals(call)
        if not flash:
            return Plan("sdpa_flash", saved_set("sdpa_flash", call))
        efficient = common + _efficient_refusals(call)
        if not efficient:
            return Plan("sdpa_efficient", saved_set("sdpa_efficient", call), tuple(flash))
        reasons = flash + efficient
    else:
        reasons = [f"sdpa: not on CUDA ({call.device})"]
    if call.triton and call.dtype != torch.float64 and not call.mask_requires_grad:
        return Plan("triton", saved_set("triton", call), tuple(reasons))
    if call.mask_requires_grad:
        reasons.append("triton: no mask gradient")
    elif call.dtype == torch.float64:
        reasons.append("triton: no float64")
    else:
        reasons.append("triton: not available")
    return Plan("pytorch", saved_set("pytorch", call), tuple(reasons))

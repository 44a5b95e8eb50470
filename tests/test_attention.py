"""Attention without stored probabilities: SDPA's numbers, q/k/v/o/lse saved, dropout regenerated from a seed."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (CHECKPOINT_MODES, LOW_PRECISION, NoHostReads, assert_checkpoint_matches, assert_within_2x_of_torch,
                     max_err)
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import LeanAttention
from tempo_ds.ops import _rng
from tempo_ds.ops._bits import packed_nbytes
from tempo_ds.ops.attention import attention, efficient_bias, plan_for
from tempo_ds.ops.attention_dispatch import AttentionCall, choose_backend
from tempo_ds.hf_attention import hf_attention_forward
from tempo_ds.hf_attention import padding_mask as mask_builder

MODES = ["lean", "tempo"]


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def _full_mask(mask, causal, Sq, Sk):
    """One mask for SDPA, which refuses attn_mask together with is_causal."""
    if not causal:
        return mask
    tril = torch.ones(Sq, Sk, dtype=torch.bool).tril()
    if mask is None:
        return tril
    return mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, -math.inf)


def sdpa(q, k, v, mask=None, causal=False, scale=None):
    """F.scaled_dot_product_attention with k/v repeated for grouped-query heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_full_mask(mask, causal, q.shape[2], k.shape[2]),
                                          scale=scale)


def math_reference(q, k, v, mask=None, causal=False, p=0.0, seed=0):
    """Unblocked float64 attention with the dropout mask of element ((b*H + h)*Sq + i)*Sk + j."""
    B, H, Sq, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    m = _full_mask(mask, causal, Sq, k.shape[2])
    if m is not None:
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m
    probs = torch.softmax(s, -1)
    if p > 0:
        keep = _rng.keep_mask(seed, p, 0, probs.numel(), "cpu").view(probs.shape)
        probs = probs * keep / (1 - p)
    return probs @ v


def qkv(B=2, H=4, Hkv=2, Sq=13, Sk=11, D=8, Dv=None, dtype=torch.float64, requires_grad=True):
    q = torch.randn(B, H, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, Dv or D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def padding_mask(B, Sk, kind, dtype=torch.float64):
    """[B, 1, 1, Sk] padding mask (the last keys of batch 0 hidden): boolean or additive."""
    keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
    keep[0, ..., Sk // 2:] = False
    return keep if kind == "bool" else torch.zeros(B, 1, 1, Sk, dtype=dtype).masked_fill(~keep, -math.inf)


def grads(out, inputs, seed=7):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, cot)


# ------------------------------------------------------------------------------------------------
# correctness in float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "float_per_row"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 13, 11), (1, 3, 3, 6, 17), (2, 2, 1, 17, 17)])
def test_matches_sdpa_float64(mode, mask_kind, causal, shape):
    B, H, Hkv, Sq, Sk = shape
    q, k, v = qkv(B, H, Hkv, Sq, Sk, D=8, Dv=5)
    mask = None
    if mask_kind in ("bool", "float"):
        mask = padding_mask(B, Sk, mask_kind)
    elif mask_kind == "float_per_row":
        mask = torch.randn(1, H, Sq, Sk, dtype=torch.float64)
    out = attention(q, k, v, mask, is_causal=causal, mode=mode, block_size=4)
    ref = sdpa(q, k, v, mask, causal)
    assert out.shape == ref.shape == (B, H, Sq, 5)
    assert max_err(out, ref) < 1e-12
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert max_err(a, b) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_dropout_uses_the_documented_element_index(mode):
    q, k, v = qkv(2, 4, 2, 9, 7)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=0.3, mode=mode, block_size=2)
    torch.manual_seed(5)
    ref = math_reference(q, k, v, p=0.3, seed=_rng.draw_seed())
    assert max_err(out, ref) < 1e-12
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert max_err(a, b) < 1e-12


def test_both_modes_drop_the_same_probabilities():
    q, k, v = qkv(2, 2, 2, 16, 16, dtype=torch.float32)
    mask = padding_mask(2, 16, "bool")
    outs = []
    for mode in MODES:
        torch.manual_seed(8)
        out = attention(q, k, v, mask, dropout_p=0.5, is_causal=True, mode=mode)
        outs.append([out, *grads(out, (q, k, v))])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    q, k, v = qkv(2, 4, 2, 6, 5, D=3)
    bias = torch.randn(2, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, m: attention(q, k, v, m, is_causal=True, mode=mode, block_size=4), (q, k, v, bias))
    pad = padding_mask(2, 5, "bool")
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, pad, scale=0.3, mode=mode, block_size=4), (q, k, v))

    def dropped(q, k, v):
        torch.manual_seed(3)  # the same seed for every evaluation
        return attention(q, k, v, pad, dropout_p=0.4, is_causal=True, mode=mode, block_size=4)

    assert torch.autograd.gradcheck(dropped, (q, k, v))


def test_float_mask_gradient_matches_sdpa():
    q, k, v = qkv(2, 4, 2, 7, 9)
    for shape in [(2, 1, 1, 9), (4, 7, 9), (9,)]:
        bias = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        out = attention(q, k, v, bias, block_size=3)
        ref = sdpa(q, k, v, bias)
        (g_ours,), (g_ref,) = grads(out, (bias,)), grads(ref, (bias,))
        assert g_ours.shape == bias.shape and max_err(g_ours, g_ref) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_rows_give_zeros_like_sdpa(mode):
    q, k, v = qkv(2, 2, 2, 5, 6)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, 0, 2] = False
    out = attention(q, k, v, mask, mode=mode)
    ref = sdpa(q, k, v, mask)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2])) and max_err(out, ref) < 1e-12
    gq, gk, gv = grads(out, (q, k, v))
    assert torch.isfinite(gq).all() and torch.equal(gq[0, :, 2], torch.zeros_like(gq[0, :, 2]))
    for a, b in zip((gq, gk, gv), grads(ref, (q, k, v))):
        assert max_err(a, b) < 1e-12


# ------------------------------------------------------------------------------------------------
# precision, layouts, edge cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
def test_low_precision_within_2x_of_sdpa(mode, dtype):
    q64, k64, v64 = qkv(2, 4, 2, 37, 37, D=24)
    mask = padding_mask(2, 37, "bool")
    ref = sdpa(q64, k64, v64, mask, causal=True)
    ref_grads = grads(ref, (q64, k64, v64))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    ours = attention(q, k, v, mask, is_causal=True, mode=mode)
    theirs = sdpa(q, k, v, mask, causal=True)
    assert ours.dtype == dtype
    assert_within_2x_of_torch(ours, theirs, ref, what=f"{mode} {dtype} output")
    for name, a, b, r in zip("qkv", grads(ours, (q, k, v)), grads(theirs, (q, k, v)), ref_grads):
        assert_within_2x_of_torch(a, b, r, what=f"{mode} {dtype} d{name}")


@pytest.mark.parametrize("mode", MODES)
def test_views_of_a_fused_qkv_projection(mode):
    B, S, H, D = 2, 11, 3, 8
    fused = torch.randn(B, S, 3, H, D, dtype=torch.float64, requires_grad=True)
    q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, S, D] each, non-contiguous
    assert not q.is_contiguous()
    out = attention(q, k, v, is_causal=True, mode=mode, block_size=4)
    ref = sdpa(q, k, v, causal=True)
    assert max_err(out, ref) < 1e-12
    (g,), (g_ref,) = grads(out, (fused,)), grads(ref, (fused,))
    assert max_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_and_no_keys(mode):
    q, k, v = qkv(B=0)
    out = attention(q, k, v, mode=mode)
    assert out.shape == (0, 4, 13, 8)
    assert all(g.shape == t.shape for g, t in zip(grads(out, (q, k, v)), (q, k, v)))
    q, k, v = qkv(Sk=0)
    out = attention(q, k, v, mode=mode)
    assert torch.equal(out, sdpa(q, k, v)) and not out.abs().sum()


@pytest.mark.parametrize("mode", MODES)
def test_inf_and_nan_propagate(mode):
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 6, 6, dtype=torch.float32))
    q[0, 1, 3, 0] = float("nan")
    v[0, 0, 2, 1] = float("inf")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mode=mode)
    assert torch.isnan(out[0, 1, 3]).all() and torch.isinf(out[0, 0, :, 1]).all()
    gq, gk, gv = grads(out, (q, k, v))
    assert not torch.isfinite(gq).all() and not torch.isfinite(gk).all() and not torch.isfinite(gv).all()


def test_no_grad_and_module():
    q, k, v = qkv(2, 4, 2, 9, 9, dtype=torch.float32)
    with torch.no_grad():
        a = attention(q, k, v, is_causal=True)
    assert a.grad_fn is None and torch.equal(a, attention(q, k, v, is_causal=True).detach())
    layer = LeanAttention(dropout_p=0.5)
    assert repr(layer) == "LeanAttention(dropout_p=0.5, mode='lean')"
    torch.manual_seed(0)
    train_out = layer(q, k, v)
    layer.eval()
    state = torch.get_rng_state()
    eval_out = layer(q, k, v)
    assert torch.equal(torch.get_rng_state(), state), "no dropout (and no seed) in eval mode"
    assert torch.equal(eval_out, attention(q, k, v)) and not torch.allclose(train_out, eval_out)


def test_bad_arguments_are_refused():
    q, k, v = qkv(2, 4, 3, 5, 5)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dropout_p=1.5 must be in \[0, 1\]"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="allowed values: lean, tempo"):
        attention(q, k, v, mode="fast")
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, torch.ones(2, 1, 13, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean .* or floating"):
        attention(q, k, v, torch.ones(13, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="allowed values: lean, tempo"):
        LeanAttention(mode="flash")


# ------------------------------------------------------------------------------------------------
# checkpointing and autocast
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ckpt", CHECKPOINT_MODES)
def test_every_checkpoint_mode_gives_the_same_grads_with_dropout(mode, ckpt):
    q, k, v = qkv(2, 4, 2, 10, 10, dtype=torch.float32)
    mask = padding_mask(2, 10, "bool")

    def fn(q, k, v):
        return attention(torch.tanh(q), k, v, mask, dropout_p=0.3, is_causal=True, mode=mode, block_size=3)

    assert_checkpoint_matches(fn, [q, k, v], ckpt)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16(mode):
    q, k, v = qkv(2, 4, 2, 12, 12, D=16, dtype=torch.float32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sdpa(q64, k64, v64, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attention(q, k, v, is_causal=True, mode=mode)
        theirs = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                is_causal=True)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_within_2x_of_torch(ours, theirs, ref, what="autocast output")
    for a, b, r in zip(grads(ours, (q, k, v)), grads(theirs, (q, k, v)), grads(ref, (q64, k64, v64))):
        assert a.dtype == torch.float32
        assert_within_2x_of_torch(a, b, r, what="autocast grad")


    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attention(q, k, v, dropout_p=0.2, is_causal=True, mode=mode)

    for ckpt in ("torch_reentrant", "torch_non_reentrant"):
        assert_checkpoint_matches(fn, [q, k, v], ckpt)


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_lean_saves_q_k_v_o_and_lse(dtype, fused):
    B, H, S, D = 2, 4, 64, 16
    if fused:
        qkv_out = torch.randn(B, S, 3 * H * D, dtype=dtype, requires_grad=True)
        q, k, v = qkv_out.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = qkv(B, H, H, S, S, D=D, dtype=dtype)
    with SavedTensorMeter() as meter:
        out = attention(q, k, v, dropout_p=0.1, is_causal=True)
    qkv_bytes = 3 * B * H * S * D * q.element_size()
    assert meter.total_bytes == qkv_bytes + _nbytes(out) + B * H * S * 4
    assert len(meter.saved) == (3 if fused else 5)  # fused: q, k, v are one [B, S, 3HD] storage
    # with a padding mask the mask is saved too (an input, shared by every layer of a model)
    mask = padding_mask(B, S, "bool")
    with SavedTensorMeter() as meter:
        out = attention(q, k, v, mask, dropout_p=0.1)
    assert meter.total_bytes == qkv_bytes + _nbytes(out) + B * H * S * 4 + _nbytes(mask)
    out.float().sum().backward()


def test_no_saved_tensor_has_s_squared_elements_and_sdpa_figures():
    B, H, S, D = 1, 2, 64, 8
    q, k, v = qkv(B, H, H, S, S, D=D, dtype=torch.float32)
    with SavedTensorMeter() as meter:
        attention(q, k, v, dropout_p=0.2)
    assert all(math.prod(r.shape) < S * S for r in meter.saved)
    ours = meter.total_bytes
    assert ours == 4 * B * H * S * D * 4 + B * H * S * 4
    # SDPA on CPU: without dropout its flash kernel saves the same q, k, v, o, lse; with dropout it falls back
    # to the math path, which keeps q, k, v and three s x s tensors (P, its dropout mask, the dropped P).
    with SavedTensorMeter() as meter:
        F.scaled_dot_product_attention(q, k, v)
    assert meter.total_bytes == ours
    with SavedTensorMeter() as meter:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert meter.total_bytes == 3 * B * H * S * D * 4 + 3 * B * H * S * S * 4


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_tempo_saves_q_k_v_p_and_a_one_bit_mask(p):
    B, H, S, D = 2, 4, 33, 8
    q, k, v = qkv(B, H, 2, S, S, D=D, dtype=torch.bfloat16)
    with SavedTensorMeter() as meter:
        attention(q, k, v, dropout_p=p, mode="tempo")
    n = B * H * S * S
    expected = sum(_nbytes(t) for t in (q, k, v)) + n * 2 + (packed_nbytes(n, 1) if p else 0)
    assert meter.total_bytes == expected


class _LargestTemporary(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_temporaries_are_one_block_of_scores():
    B, H, S, D, block = 1, 2, 64, 8, 8
    q, k, v = qkv(B, H, H, S, S, D=D, dtype=torch.float32)
    with _LargestTemporary() as tracker:
        out = attention(q, k, v, dropout_p=0.1, is_causal=True, block_size=block)
        grads(out, (q, k, v))
    assert tracker.largest == B * H * block * S  # one block of scores (or of its dropout hash), never S * S


# ------------------------------------------------------------------------------------------------
# custom ops, dispatch, no host reads
# ------------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    """Schema, fake implementation, autograd registration and AOTAutograd (dynamic shapes) of both ops."""
    import importlib

    ops = importlib.import_module("tempo_ds.ops.attention")
    q, k, v = qkv(2, 4, 2, 7, 9)
    mask = torch.randn(2, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([5])
    torch.library.opcheck(ops._lean_fwd, (q, k, v, mask, seed, True, 0.3, 0.2, 3, False))
    torch.library.opcheck(ops._tempo_fwd, (q, k, v, mask, seed, True, 0.3, 0.2, True))


@pytest.mark.parametrize("mode", MODES)
def test_no_host_read_with_mask_dropout_and_seed_tensor(mode):
    """Forward and backward bodies of both modes, with a padding row, causality and dropout from a device seed,
    never read a tensor value on the host (the wrapper, traced by torch.compile, is checked in test_compile)."""
    import importlib

    ops = importlib.import_module("tempo_ds.ops.attention")
    q, k, v = (t.detach() for t in qkv(2, 4, 2, 9, 9, dtype=torch.float32))
    mask4 = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask4[1, ..., 6:] = False
    seed = torch.tensor([11])
    do = torch.randn(2, 4, 9, 8)
    with NoHostReads():
        if mode == "lean":
            o, lse = ops._lean_forward(q, k, v, mask4, True, 0.35, 0.3, seed, 4)
            ops._lean_backward(do, q, k, v, o, lse, mask4, True, 0.35, 0.3, seed, 4, False)
        else:
            o, probs, keep = ops._tempo_forward(q, k, v, mask4, True, 0.35, 0.3, seed)
            ops._tempo_backward(do, q, k, v, probs, keep, None, 0.35, 0.3)


def _cuda_call(**overrides):
    base = dict(device="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128, q_len=512,
                kv_len=512, heads=16, kv_heads=16, triton=True)
    return AttentionCall(**{**base, **overrides})


F16, F32 = torch.float16, torch.float32
DISPATCH = [  # (case, AttentionCall overrides of an H100/H200 bf16 call, backend)
    ("bf16 causal dropout", dict(causal=True, dropout=True), "sdpa_flash"),
    ("A100 fp16 head 64", dict(capability=(8, 0), dtype=F16, head_dim=64, head_dim_v=64), "sdpa_flash"),
    ("grouped-query, causal, no mask", dict(kv_heads=4, causal=True, dropout=True), "sdpa_flash"),
    ("head 256 with dropout on sm90", dict(head_dim=256, head_dim_v=256, dropout=True), "sdpa_flash"),
    ("head 256 + dropout training on sm86", dict(capability=(8, 6), head_dim=256, head_dim_v=256, dropout=True),
     "sdpa_efficient"),
    ("head 256 + dropout on sm86, no grad", dict(capability=(8, 6), head_dim=256, head_dim_v=256, dropout=True,
                                                 requires_grad=False), "sdpa_flash"),
    ("padding row + causal + dropout", dict(mask="bool", causal=True, dropout=True), "sdpa_efficient"),
    ("additive mask that requires grad", dict(mask="float", mask_requires_grad=True), "sdpa_efficient"),
    ("fp32", dict(dtype=F32, dropout=True), "sdpa_efficient"),
    ("causal with Sq != Sk", dict(causal=True, q_len=128), "sdpa_efficient"),
    ("v head dim differs", dict(head_dim_v=64), "sdpa_efficient"),
    ("sm100 on torch 2.7", dict(capability=(10, 0), torch_version=(2, 7)), "sdpa_efficient"),
    ("T4 fp16 with padding", dict(capability=(7, 5), dtype=F16, mask="bool"), "sdpa_efficient"),
    ("grouped-query + padding row", dict(kv_heads=4, mask="bool", causal=True), "triton"),
    ("fp32 grouped-query", dict(dtype=F32, kv_heads=4), "triton"),
    ("head 20: no multiple of 8", dict(head_dim=20, head_dim_v=20), "triton"),
    ("unaligned views", dict(aligned=False), "triton"),
    ("no keys", dict(kv_len=0), "triton"),
    ("grouped-query on torch 2.4", dict(kv_heads=4, torch_version=(2, 4)), "triton"),
    ("grouped-query + mask that requires grad", dict(kv_heads=4, mask="float", mask_requires_grad=True), "pytorch"),
    ("float64", dict(dtype=torch.float64), "pytorch"),
    ("grouped-query + padding, no triton", dict(kv_heads=4, mask="bool", triton=False), "pytorch"),
    ("cpu", dict(device="cpu", capability=None, triton=False), "pytorch"),
    ("cpu under TRITON_INTERPRET", dict(device="cpu", capability=None, mask="bool"), "triton"),
    ("tempo mode", dict(mode="tempo", dropout=True), "tempo"),
]


@pytest.mark.parametrize("case, overrides, backend", DISPATCH, ids=[c[0] for c in DISPATCH])
def test_dispatch_table(case, overrides, backend):
    call = _cuda_call(**overrides)
    plan = choose_backend(call)
    assert plan.backend == backend, plan.reasons
    assert plan == choose_backend(call)  # a pure function
    assert plan.saved[:3] == ("q", "k", "v")
    if backend == "sdpa_flash":
        assert plan.saved == ("q", "k", "v", "o", "lse", "philox_seed", "philox_offset")
    elif backend == "sdpa_efficient":
        assert plan.saved[-2:] == (("philox_offset", "bias") if call.mask != "none" else ("philox_seed", "philox_offset"))
    elif backend == "tempo":
        assert plan.saved == ("q", "k", "v", "probs", "keep_bits")
    else:
        assert plan.saved == ("q", "k", "v", "o", "lse") + (("mask",) if call.mask != "none" else ())


def test_plan_for_cpu_tensors_and_the_bias_sdpa_would_get():
    q, k, v = qkv(2, 4, 4, 5, 11, D=8, dtype=torch.float32)
    mask = padding_mask(2, 11, "bool")
    plan = plan_for(q, k, v, mask, 0.1, True)
    assert plan.backend == "pytorch" and plan.saved == ("q", "k", "v", "o", "lse", "mask")
    # the memory-efficient kernel's bias: additive in q's dtype, padded to 8 keys, a broadcast view of [B,1,1,Sk]
    bias = efficient_bias(mask, q, k)
    assert bias.shape == (2, 4, 5, 11) and bias.dtype == torch.float32 and bias.stride()[1:3] == (0, 0)
    assert bias.stride(0) % 8 == 0 and bias.untyped_storage().nbytes() == 2 * 16 * 4
    with torch.no_grad():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                                   attention(q, k, v, mask))
    assert efficient_bias(None, q, k) is None


def test_sdpa_flash_call_on_the_cpu_flash_kernel():
    """The flash branch's call (grouped-query heads through enable_gqa, scale, causality) on the CPU flash kernel,
    the one SDPA backend this machine has: the same numbers as ours."""
    import importlib

    ops = importlib.import_module("tempo_ds.ops.attention")
    q, k, v = qkv(2, 4, 2, 9, 9, dtype=torch.float32)
    for causal in (False, True):
        torch.testing.assert_close(ops._sdpa_flash(q, k, v, 0.0, causal, 0.3),
                                   attention(q, k, v, is_causal=causal, scale=0.3))


def test_mask_builder_returns_none_or_the_padding_row():
    """Plain causal / bidirectional masks come back as None or the [b, 1, 1, s] row; others as sdpa_mask's."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, 4:] = False
    for fn, allow in ((causal_mask_function, dict()), (bidirectional_mask_function,
                                                       dict(allow_is_bidirectional_skip=True))):
        assert mask_builder(2, 6, 6, mask_function=fn, attention_mask=None, **allow) is None
        assert mask_builder(2, 6, 6, mask_function=fn, attention_mask=torch.ones_like(pad), **allow) is None
        row = mask_builder(2, 6, 6, mask_function=fn, attention_mask=pad, **allow)
        assert row.shape == (2, 1, 1, 6) and torch.equal(row[:, 0, 0], pad)
    # sliding window, cache offsets, a mask that must be materialized: transformers' own mask
    for kw in (dict(local_size=3), dict(kv_offset=2, kv_length=8), dict(allow_is_causal_skip=False)):
        args = dict(batch_size=2, q_length=6, kv_length=6, mask_function=causal_mask_function, attention_mask=pad)
        args.update(kw)
        got = mask_builder(**args)
        assert got.shape == (2, 1, 6, args["kv_length"]) and torch.equal(got, sdpa_mask(**args))


# ------------------------------------------------------------------------------------------------
# HF transformers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return hf_attention_forward(*args, **kwargs)

    names = {"tempo_test_bool": sdpa_mask, "tempo_test_additive": eager_mask, "tempo_test_row": mask_builder}
    for name, mask_fn in names.items():
        AttentionInterface.register(name, counted)
        AttentionMaskInterface.register(name, mask_fn)
    yield list(names), calls
    for name in names:
        AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)


def _tiny(kind):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, attn_implementation="eager")
    if kind == "bert":
        model = BertModel(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
    else:
        model = LlamaModel(LlamaConfig(num_key_value_heads=2, **common))
    return model.train()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hf_models_eager_vs_ours(kind, registered):
    names, calls = registered
    torch.manual_seed(0)
    eager = _tiny(kind)
    ids = torch.randint(0, 50, (2, 13))
    pad = torch.ones(2, 13, dtype=torch.long)
    pad[1, 9:] = 0  # right padding: every query row still sees a key
    cot = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(1))

    def run(model, mask):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.backward(cot)
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for mask in (pad, None):
        ref_out, ref_grads = run(eager, mask)
        for name in names:
            ours = copy.deepcopy(eager)
            ours.set_attn_implementation(name)
            out, grads_ = run(ours, mask)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            assert grads_.keys() == ref_grads.keys()
            for n in ref_grads:
                torch.testing.assert_close(grads_[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    assert len(calls) == 2 * 3 * 2  # two masks x three registrations x two layers


def test_hf_output_layout_shares_storage_with_the_saved_output():
    B, H, S, D = 2, 4, 9, 8
    module = nn.Module()
    module.is_causal = False
    q, k, v = qkv(B, H, H, S, S, D=D, dtype=torch.float32)
    proj = nn.Linear(H * D, H * D)
    with SavedTensorMeter(proj) as meter:
        out, weights = hf_attention_forward(module, q, k, v, None, scaling=0.5)
        y = proj(out.reshape(B, S, H * D))
    assert weights is None and out.shape == (B, S, H, D)
    assert max_err(out.transpose(1, 2), sdpa(q, k, v, scale=0.5)) < 1e-6
    # the projection's saved input is the attention output we save: counted once
    assert meter.total_bytes == 4 * B * H * S * D * 4 + B * H * S * 4
    y.sum().backward()


def test_hf_position_bias_and_causal_flag():
    B, H, S, D = 1, 2, 6, 8
    module = nn.Module()
    module.is_causal = True
    q, k, v = qkv(B, H, H, S, S, D=D)
    bias = torch.randn(1, H, S, S, dtype=torch.float64)
    out, _ = hf_attention_forward(module, q, k, v, None, position_bias=bias)
    tril = torch.ones(S, S, dtype=torch.bool).tril()
    ref = sdpa(q, k, v, bias.masked_fill(~tril, -math.inf))
    assert max_err(out.transpose(1, 2), ref) < 1e-12
    with pytest.raises(ValueError, match="softcap"):
        hf_attention_forward(module, q, k, v, None, softcap=30.0)


# ------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ------------------------------------------------------------------------------------------------
def _reload_triton_language():
    """Rebuild triton.language's ``@triton.jit`` helpers (tl.zeros, tl.sum, ...) and our kernels: the decorator
    picks the interpreter or the compiler from TRITON_INTERPRET when the module is imported."""
    import importlib

    import triton.language
    import triton.language.standard

    from tempo_ds.kernels import attention, dropout

    for module in (triton.language.standard, triton.language, dropout, attention):
        importlib.reload(module)


@pytest.fixture
def interpreted_kernel(monkeypatch):
    """``tempo_ds.kernels.attention`` under Triton's interpreter, at the tiles the CUDA path picks (sm_80's)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    pytest.importorskip("triton")
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    from tempo_ds.kernels import attention

    # triton (or our kernels) imported earlier in this process without the interpreter: rebuild, and undo after
    rebuilt = not (isinstance(triton.language.standard.zeros, InterpretedFunction)
                   and isinstance(attention._attn_fwd, InterpretedFunction))
    if rebuilt:
        _reload_triton_language()
    yield attention
    if rebuilt:
        monkeypatch.delenv("TRITON_INTERPRET")
        _reload_triton_language()


@pytest.fixture
def kernel(interpreted_kernel, monkeypatch):
    """The interpreted kernels with 16 x 16 tiles: several tiles per row even for short sequences."""
    small = interpreted_kernel.Tiles(16, 16, 4, 1)
    monkeypatch.setattr(interpreted_kernel, "tiles", lambda *args: (small, small, small))
    yield interpreted_kernel


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "padding_dropout", "additive_causal_dropout"])
def test_triton_kernel_matches_the_pytorch_path(case, kernel, monkeypatch):
    B, H, Hkv, Sq, Sk, D = {"plain": (1, 2, 2, 32, 32, 16), "causal_gqa": (1, 4, 2, 37, 29, 16),
                            "padding_dropout": (2, 2, 2, 37, 37, 24),
                            "additive_causal_dropout": (1, 2, 1, 21, 37, 16)}[case]
    q, k, v = qkv(B, H, Hkv, Sq, Sk, D=D, dtype=torch.float32)
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [B, S, H, D] memory layout
    mask, causal, p = None, case.startswith(("causal", "additive")), 0.0
    if case == "padding_dropout":
        mask, p = padding_mask(B, Sk, "bool"), 0.3
    if case == "additive_causal_dropout":
        mask, p = torch.randn(B, 1, Sq, Sk), 0.5
    _assert_kernel_matches_pytorch_path(monkeypatch, q, k, v, mask, p, causal, seed=4)


def _assert_kernel_matches_pytorch_path(monkeypatch, q, k, v, mask, p, causal, seed):
    """The Triton kernel (interpreted) and the PyTorch path give the same output and gradients, dropout included
    (both regenerate the same mask from the same seed)."""
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TEMPO_DS_TRITON", flag)
        torch.manual_seed(seed)
        out = attention(q, k, v, mask, dropout_p=p, is_causal=causal)
        results.append([out, *grads(out, (q, k, v))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # lse = log(0) = -inf with no keys
def test_triton_kernel_low_precision_and_no_keys(kernel):
    q64, k64, v64 = qkv(1, 2, 2, 20, 20, D=16)
    ref = sdpa(q64, k64, v64, causal=True)
    q, k, v = (t.detach().half().requires_grad_() for t in (q64, k64, v64))
    ours = attention(q, k, v, is_causal=True)
    assert_within_2x_of_torch(ours, sdpa(q, k, v, causal=True), ref, atol=1e-3, what="triton fp16")
    q, k, v = qkv(1, 2, 2, 5, 0, dtype=torch.float32)
    out = attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(out, (q, k, v)))


@pytest.mark.parametrize("case", ["fp32_d64_additive_dropout_causal_gqa", "fp32_d128_bool_dropout",
                                  "fp16_d128_padding_causal"])
def test_triton_kernel_at_the_cuda_tiles(case, interpreted_kernel, monkeypatch):
    """The tiles the CUDA path picks on an A100 (``tiles(..., sm_80's shared memory)``: 16-32 rows/keys in
    float32, 32-64 in 16-bit), several per row with a partial last one."""
    dtype = torch.float16 if case.startswith("fp16") else torch.float32
    D = 64 if "_d64_" in case else 128
    chosen = interpreted_kernel.tiles(D, D, dtype, interpreted_kernel.shared_memory_limit(torch.device("cpu")))
    assert [t[:2] for t in chosen] == {  # (BLOCK_M, BLOCK_N) of the forward, dK/dV and dQ kernels
        "fp32_d64_additive_dropout_causal_gqa": [(32, 32)] * 3,
        "fp32_d128_bool_dropout": [(32, 32), (16, 32), (32, 32)],
        "fp16_d128_padding_causal": [(64, 32), (32, 64), (64, 32)]}[case]
    Sq = Sk = 2 * max(max(t[:2]) for t in chosen) - 5
    Hkv = 1 if "gqa" in case else 2
    mask, p, causal = None, 0.0, "causal" in case
    if "additive" in case:
        mask, p = torch.randn(1, 1, Sq, Sk), 0.25
    if "bool" in case:
        mask, p = torch.rand(1, 2, Sq, Sk) > 0.2, 0.5
    if "padding" in case:
        mask = padding_mask(1, Sk, "bool")
    if dtype == torch.float16:
        q64, k64, v64 = qkv(1, 2, Hkv, Sq, Sk, D=D)
        ref = sdpa(q64, k64, v64, mask, causal=causal)
        q, k, v = (t.detach().half().requires_grad_() for t in (q64, k64, v64))
        ours = attention(q, k, v, mask, is_causal=causal)
        assert_within_2x_of_torch(ours, sdpa(q, k, v, mask, causal=causal), ref, atol=1e-3, what="cuda tiles fp16")
        for g, g_torch, g_ref in zip(grads(ours, (q, k, v)), grads(sdpa(q, k, v, mask, causal=causal), (q, k, v)),
                                     grads(ref, (q64, k64, v64))):
            assert_within_2x_of_torch(g, g_torch, g_ref, atol=1e-3, what="cuda tiles fp16 grad")
        return
    q, k, v = qkv(1, 2, Hkv, Sq, Sk, D=D, dtype=dtype)
    _assert_kernel_matches_pytorch_path(monkeypatch, q, k, v, mask, p, causal, seed=5)


def test_triton_kernel_takes_the_seed_as_a_device_tensor(kernel):
    """A 1-element int64 tensor seed (``_library.draw_seed``) drops exactly what the same int drops."""
    q, k, v = qkv(1, 2, 2, 19, 23, D=16, dtype=torch.float32, requires_grad=False)
    scale = 0.25
    by_int = kernel.attention_forward(q, k, v, None, False, scale, 0.4, 12345)
    by_tensor = kernel.attention_forward(q, k, v, None, False, scale, 0.4, torch.tensor([12345]))
    assert all(torch.equal(a, b) for a, b in zip(by_int, by_tensor))
    do = torch.randn_like(by_int[0])
    back_int = kernel.attention_backward(do, q, k, v, *by_int, None, False, scale, 0.4, 12345)
    back_tensor = kernel.attention_backward(do, q, k, v, *by_tensor, None, False, scale, 0.4, torch.tensor([12345]))
    assert all(torch.equal(a, b) for a, b in zip(back_int, back_tensor))
    with pytest.raises(ValueError, match="int64"):
        kernel.attention_forward(q, k, v, None, False, scale, 0.4, torch.tensor([1.0]))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_output_attentions_are_eager_probabilities_computed_only_on_request(family):
    """An eager model asked for ``output_attentions`` gets the same probabilities after injection (transformers
    otherwise returns an empty tuple for a custom implementation), and a loss on them reaches the weights."""
    import transformers

    import tempo_ds

    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, attn_implementation="eager")
        model_cls = transformers.BertModel
    else:
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, attn_implementation="eager")
        model_cls = transformers.LlamaModel
    torch.manual_seed(0)
    plain = model_cls(config).eval()
    model = copy.deepcopy(plain)
    report = tempo_ds.inject(model)
    assert report.attention == ("eager", "tempo") and "attention implementation: eager -> tempo" in str(report)
    ids = torch.randint(0, 50, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[0, -2:] = 0
    ours = model(input_ids=ids, attention_mask=padding, output_attentions=True).attentions
    theirs = plain(input_ids=ids, attention_mask=padding, output_attentions=True).attentions
    assert len(ours) == len(theirs) == 2
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    sum(a.square().sum() for a in ours).backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0 if family == "llama" else \
        model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0

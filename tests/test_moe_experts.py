"""MoE experts (transformers 5's 3-D gate_up_proj / down_proj) swapped for MoEExperts by mlp=recompute: exact
against HF's models, gradcheck of the op, the bytes it keeps, the experts it leaves alone and why."""
import copy

import pytest
import torch
import transformers as t

import tempo_ds
from helpers import NoHostReads, loss_and_grads as _loss_and_grads
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn.moe_experts import MoEExperts
from tempo_ds.ops import moe_experts

H, I, V, B, S = 32, 48, 128, 2, 8
MLP_ONLY = {**{k: "off" for k in tempo_ds.TempoConfig().techniques()}, "mlp": "recompute"}


def _model(family, impl="grouped_mm", **extra):
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        cfg = t.MixtralConfig(**common, intermediate_size=I, num_local_experts=4, num_experts_per_tok=2, **extra)
        cls = t.MixtralForCausalLM
    else:  # 4 of 6 experts, unnormalised weights: a slot sum of 4 and weights that do not sum to 1
        cfg = t.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=I, num_experts=6,
                               num_experts_per_tok=4, norm_topk_prob=False, head_dim=8, **extra)
        cls = t.Qwen3MoeForCausalLM
    cfg._attn_implementation, cfg._experts_implementation, cfg.use_cache = "eager", impl, False
    torch.manual_seed(0)
    model = cls(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _batch():
    ids = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _flat(grads):
    return torch.cat([g.double().reshape(-1) for _, g in sorted(grads.items())])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_swap_equals_hf_grouped_mm_bit_for_bit(family):
    """HF's default experts implementation (grouped_mm): loss and every gradient equal bit for bit in float32,
    bfloat16 and float32 under bf16 autocast (the same sort, grouped matmuls, elementwise ops and slot sum); Parameters and state_dict kept."""
    plain = _model(family)
    lean = copy.deepcopy(plain)
    hf_experts = lean.model.layers[0].mlp.experts
    report = tempo_ds.inject(lean, **MLP_ONLY)
    experts = lean.model.layers[0].mlp.experts
    assert isinstance(experts, MoEExperts) and report.counts() == {"mlp=recompute": 1}, str(report)
    assert experts.gate_up_proj is hf_experts.gate_up_proj and experts.down_proj is hf_experts.down_proj
    assert list(lean.state_dict()) == list(plain.state_dict())
    before = {id(p) for p in lean.parameters()}
    batch = _batch()
    for dtype in (torch.float32, "autocast", torch.bfloat16):  # autocast: float32 weights, bf16 router output
        plain, lean = plain.to(dtype if dtype != "autocast" else torch.float32), lean.to(plain.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
            loss0, grads0 = _loss_and_grads(plain, batch)
            loss1, grads1 = _loss_and_grads(lean, batch)
        assert torch.equal(loss1, loss0), dtype
        assert grads0.keys() == grads1.keys()
        for name, g in grads0.items():
            assert torch.equal(grads1[name], g), (dtype, name)
    assert {id(p) for p in lean.parameters()} == before


def test_eager_experts_within_reduction_order_and_bf16_error():
    """HF's eager per-expert loop (F.linear per expert, index_add_): float32 within reduction-order rounding;
    bfloat16 gradient error against float64 at most twice HF's; in float64 (no grouped_mm there) the op's
    masked per-expert path agrees with HF's loop to float64 rounding."""
    plain = _model("qwen3_moe", impl="eager")
    lean = copy.deepcopy(plain)
    tempo_ds.inject(lean, **MLP_ONLY)
    assert lean.model.layers[0].mlp.experts.implementation == "eager"
    batch = _batch()
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(lean, batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    loss64, grads64 = _loss_and_grads(copy.deepcopy(plain).double(), batch)
    loss64t, grads64t = _loss_and_grads(copy.deepcopy(lean).double(), batch)
    torch.testing.assert_close(loss64t, loss64, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat(grads64t), _flat(grads64), rtol=1e-10, atol=1e-13)
    _, grads_p = _loss_and_grads(plain.to(torch.bfloat16), batch)
    _, grads_t = _loss_and_grads(lean.to(torch.bfloat16), batch)
    g64 = _flat(grads64)
    err_plain, err_tempo = ((_flat(g) - g64).norm() / g64.norm() for g in (grads_p, grads_t))
    assert err_tempo <= 2 * err_plain, (err_tempo, err_plain)


def _routing(tokens, k, experts, gen):
    """Distinct experts per token, never expert ``experts - 1`` (an expert with no rows)."""
    idx = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)])
    return idx, torch.rand(tokens, k, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gradcheck_float64(activation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    idx, w = _routing(5, 2, 4, gen)
    gu = torch.randn(4, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    down = torch.randn(4, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: moe_experts(a[0], idx, *a[1:], activation=activation),
                             (x, w.requires_grad_(), gu, down))


def test_no_host_reads_and_opcheck():
    """Forward and backward never hand a routing count to the host (grouped and masked paths); opcheck of the
    fake implementations and the registered autograd."""
    gen = torch.Generator().manual_seed(0)
    idx, w = _routing(6, 2, 4, gen)
    for dtype in (torch.float32, torch.float64):  # grouped_mm, and the masked per-expert path
        x = torch.randn(6, 8, dtype=dtype, generator=gen, requires_grad=True)
        gu = torch.randn(4, 16, 8, dtype=dtype, generator=gen, requires_grad=True)
        down = torch.randn(4, 8, 8, dtype=dtype, generator=gen, requires_grad=True)
        wd = w.to(dtype).requires_grad_()
        with NoHostReads():
            moe_experts(x, idx, wd, gu, down).sum().backward()
        assert all(t.grad is not None for t in (x, wd, gu, down))
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.tempo_ds.moe_experts_fwd, (x, idx, wd, gu, down, "silu", dtype, True),
                          test_utils=utils)
    x = x.detach().t().contiguous().t()  # a column-major input: dx still comes back as the fake says
    dy, saved = torch.randn_like(x), torch.randn(12, 16, dtype=dtype, generator=gen)
    for needs in ([True, True, True, True], [False, True, False, True]):
        torch.library.opcheck(torch.ops.tempo_ds.moe_experts_bwd,
                              (dy, x, idx, wd.detach(), saved, gu.detach(), down.detach(), "silu", dtype, needs),
                              test_utils=utils[:2])


def test_bytes_kept_on_a_tiny_mixtral():
    """bf16, one routed slot per (token, k): HF's experts keep the gathered input and o (h each), gu (2i), act(g)
    and h (i each), the sorted weight (fp32), three int64 index tensors and the int32 offsets; MoEExperts keeps
    gu and the [T, K] fp32 routing weights (x and the indices are the router's, kept there already)."""
    plain = _model("mixtral").to(torch.bfloat16)
    lean = copy.deepcopy(plain)
    tempo_ds.inject(lean, **MLP_ONLY)
    slots, experts = B * S * 2, 4
    hf = slots * (2 * (2 * H + 4 * I) + 4 + 3 * 8) + 4 * experts
    ours = slots * (2 * 2 * I + 4)

    def kept(model):
        with SavedTensorMeter(model) as meter:
            out = model(**_batch())
        del out
        return ({k: v for k, v in meter.by_module.items() if k.startswith("model.layers.0.mlp.experts")},
                meter.by_module["model.layers.0.mlp.gate"], meter.per_layer[0])

    (hf_experts, hf_gate, hf_layer), (our_experts, our_gate, our_layer) = kept(plain), kept(lean)
    assert sum(hf_experts.values()) == hf and our_experts == {"model.layers.0.mlp.experts": ours}
    assert our_gate == hf_gate and hf_layer - our_layer == hf - ours


def test_experts_left_alone_are_reported_with_the_reason():
    relu = copy.deepcopy(_model("mixtral", hidden_act="relu"))
    report = tempo_ds.inject(relu, **MLP_ONLY)
    assert not report.replaced
    (skip,) = [s for s in report.skipped if s.name.endswith("mlp.experts")]
    assert "act_fn is ReLU" in skip.reason and "not exactly SiLU or tanh-GELU" in skip.reason

    fewbit = tempo_ds.inject(_model("mixtral"), **{**MLP_ONLY, "silu": "fewbit"})  # never claims a swap that cannot run
    (skip,) = [s for s in fewbit.skipped if s.name.endswith("experts.act_fn")]
    assert skip.reason.startswith("silu=fewbit: inside MoE experts fused by mlp=recompute")
    assert not any("fewbit" in r.technique for r in fewbit.replaced)

    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = t.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=4)
    with pytest.raises(TypeError, match="biased experts"):
        MoEExperts.from_module(GptOssExperts(cfg))
    experts = _model("mixtral").model.layers[0].mlp.experts
    experts._is_expert_parallel = True
    with pytest.raises(TypeError, match="expert parallelism"):
        MoEExperts.from_module(experts)


def test_bad_arguments_name_the_problem():
    x, gu, down = torch.randn(3, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3)
    idx, w = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_experts(x, idx, w, gu, down, activation="relu")
    with pytest.raises(ValueError, match=r"\[E, h, i\]"):
        moe_experts(x, idx, w, gu, down.transpose(1, 2))
    with pytest.raises(ValueError, match="must both be \\[T, K\\]"):
        moe_experts(x, idx[:2], w[:2], gu, down)
    with pytest.raises(ValueError, match="integer tensor"):
        moe_experts(x, w, w, gu, down)

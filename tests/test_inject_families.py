"""Per family: bf16 accuracy against float64, dropout masks under checkpoint recompute, and the per-layer bytes
the design predicts — on real HF model classes built from tiny configs."""
import copy

import pytest
import torch
from torch import nn

import tempo_ds
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops.layer_norm import side_columns
from test_inject import EXACT, FAMILIES, _batch, _bert, _llama, _loss_and_grads, assert_same_loss_and_grads

H, A, KV = 64, 4, 2


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().reshape(-1) for _, g in sorted(grads.items())])


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "opt"])
def test_bf16_error_is_within_twice_the_untouched_models_own(family):
    """Loss and the whole gradient, relative to a float64 run of the same weights: tempo_ds in bf16 errs at
    most twice as much as the untouched model in bf16."""
    torch.manual_seed(0)
    ref = FAMILIES[family]().double().train()
    batch = _batch(ref)
    loss64, grads64 = _loss_and_grads(ref, batch)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    lean = copy.deepcopy(plain)
    tempo_ds.inject(lean, **EXACT)
    loss_p, grads_p = _loss_and_grads(plain, batch)
    loss_t, grads_t = _loss_and_grads(lean, batch)
    g64 = _flat(grads64)
    err_plain = (_flat(grads_p) - g64).norm() / g64.norm()
    err_tempo = (_flat(grads_t) - g64).norm() / g64.norm()
    assert err_tempo <= 2 * err_plain, (err_tempo, err_plain)
    assert abs(loss_t.double() - loss64) <= 2 * abs(loss_p.double() - loss64) + 1e-2 * abs(loss64)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_dropout_masks_survive_checkpoint_recompute(family, reentrant):
    """Dropout on (hidden, attention): HF gradient checkpointing recomputes every layer in backward; the
    regenerated masks must be the forward's, so loss and gradients equal the run without checkpointing."""
    torch.manual_seed(0)
    model = _bert(dropout=0.1) if family == "bert" else _llama()
    if family == "llama":
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1   # read at construction; Llama has no other dropout
    tempo_ds.inject(model, **EXACT)
    model.train()
    batch = _batch(model)
    loss0, grads0 = _loss_and_grads(model, batch, seed=5)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    loss1, grads1 = _loss_and_grads(model, batch, seed=5)
    assert loss1 == loss0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)
    torch.manual_seed(6)
    assert model(**batch).loss != loss0          # a different seed really drops other elements


def _per_layer(model, batch, layers=3):
    model.train()
    torch.manual_seed(0)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    return meter.per_layer


def _stats(s, b, a):
    """Per layer, fp32: one rstd per row for each of the two norms, one log-sum-exp per row and head; and each
    norm's side buffer (bf16 xhat of its K worst-conditioned columns, and their int64 indices)."""
    k = side_columns(H, True)
    return 4 * s * b * 2 + 4 * b * a * s + 2 * (2 * s * b * k + 8 * k)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "opt", "llama"])
def test_per_layer_bytes_match_the_design(family):
    """bf16, dropout on where the family has it, no KV cache, a middle layer.

    BERT/RoBERTa/GPT-2/OPT: the two norm outputs, q, k, v, the attention output (shared with the output
    projection's input) and the GELU input: (6h + i) elements + statistics.
    Llama: the two norm outputs, q, k and v (k, v with the KV heads), the attention output, and the gate and
    up outputs (mlp=recompute rebuilds SiLU and the product in backward): (4h + 2 h_kv + 2i) elements.
    """
    torch.manual_seed(0)
    kwargs = {"dropout": 0.1} if family in ("bert", "roberta", "gpt2") else {}
    model = FAMILIES[family](**kwargs).to(torch.bfloat16)
    model.config.use_cache = False
    s, b = 24, 3
    batch = _batch(model, b, s, padded=False)
    before = _per_layer(model, batch)
    tempo_ds.inject(model, **EXACT)
    after = _per_layer(model, batch)
    if family == "llama":
        i, h_kv = 172, H // A * KV
        expected = 2 * s * b * (4 * H + 2 * h_kv + 2 * i) + _stats(s, b, A)
    else:
        i = 256
        expected = 2 * s * b * (6 * H + i) + _stats(s, b, A)
    assert after[1] == expected, (after, expected)
    assert after[1] < 0.7 * before[1]


# -- norm families: Qwen3, Gemma 1/2/3, Phi-3, Mixtral, OLMo 2, Granite, Cohere, StableLM ----------------------
# Each family's own model class from a tiny config; only norm=inplace on (every other technique off), so the
# forward is HF's bit for bit and the bytes that change are the norms'.
# qk_norm="separate": the q/k norms are replaced one by one here (their fusion with RoPE, qk_norm="rope", is
# tests/test_qk_norm_rope.py's)
NORM_ONLY = {**{k: "off" for k in tempo_ds.TempoConfig().techniques()}, "norm": "inplace", "qk_norm": "separate"}
HD, V = H // A, 128


def _family(name):
    import transformers as t
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=A, num_key_value_heads=KV,
                  intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg_cls, cls, extra = {
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(head_dim=HD)),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, dict(head_dim=HD)),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, dict(head_dim=HD)),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(head_dim=HD)),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
        "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM, {}),
        "granite": (t.GraniteConfig, t.GraniteForCausalLM, {}),
        "cohere": (t.CohereConfig, t.CohereForCausalLM, dict(use_qk_norm=True)),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM, dict(qk_layernorm=True)),
    }[name]
    cfg = cfg_cls(**common, **extra)
    cfg._attn_implementation, cfg.use_cache = "eager", False
    if name == "mixtral":
        cfg._experts_implementation = "eager"  # a loop over experts: grouped_mm has no float64
    torch.manual_seed(0)
    model = cls(cfg).train()
    with torch.no_grad():  # norm weights away from their init (Gemma's 0, the others' 1) so the scale matters
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# Per layer, each norm: (path in the layer, arithmetic, rows per token, width, output shared with the next Linear)
# Rows per token: 1 for hidden-state norms, the heads for per-head q/k norms.
_NORMS = {
    "qwen3": [("input_layernorm", "llama", 1, H, True), ("post_attention_layernorm", "llama", 1, H, True),
              ("self_attn.q_norm", "llama", A, HD, False), ("self_attn.k_norm", "llama", KV, HD, False)],
    "gemma": [("input_layernorm", "gemma", 1, H, True), ("post_attention_layernorm", "gemma", 1, H, True)],
    "gemma2": [("input_layernorm", "gemma", 1, H, True), ("post_attention_layernorm", "gemma", 1, H, False),
               ("pre_feedforward_layernorm", "gemma", 1, H, True),
               ("post_feedforward_layernorm", "gemma", 1, H, False)],
    "phi3": [("input_layernorm", "llama", 1, H, True), ("post_attention_layernorm", "llama", 1, H, True)],
    "mixtral": [("input_layernorm", "llama", 1, H, True), ("post_attention_layernorm", "llama", 1, H, True)],
    "olmo2": [("post_attention_layernorm", "olmo2", 1, H, False), ("post_feedforward_layernorm", "olmo2", 1, H, False),
              ("self_attn.q_norm", "olmo2", 1, H, False), ("self_attn.k_norm", "olmo2", 1, KV * HD, False)],
    "granite": [("input_layernorm", "llama", 1, H, True), ("post_attention_layernorm", "llama", 1, H, True)],
    "cohere": [("input_layernorm", "cohere", 1, H, True), ("self_attn.q_norm", "cohere_heads", A, HD, False),
               ("self_attn.k_norm", "cohere_heads", KV, HD, False)],
    "stablelm": [("input_layernorm", "layer_norm", 1, H, True), ("post_attention_layernorm", "layer_norm", 1, H, True),
                 ("self_attn.q_layernorm", "left_alone", A, HD, False),
                 ("self_attn.k_layernorm", "left_alone", KV, HD, False)],
}
_NORMS["gemma3"] = _NORMS["gemma2"] + [("self_attn.q_norm", "gemma", A, HD, False),
                                       ("self_attn.k_norm", "gemma", KV, HD, False)]


def _norm_bytes(kind, rows, n):
    """(HF's module, ours) bytes kept in bf16 for ``rows`` rows of ``n`` (one op call); 4 * rows is one float32
    rstd per row.

    HF's modules keep float32 intermediates: Llama's the float32 input and the rounded x*rstd (6 bytes an
    element), OLMo 2's and Gemma's the float32 input and x*rstd (8), Cohere's the centred float32 input twice (it
    subtracts the mean twice) and x*rstd (12); Gemma's both keep the float32 scale 1 + w. torch's LayerNorm keeps
    its bf16 input and bf16 mean and rstd on CPU; StableLM's per-head q/k LayerNorms are left alone (they read
    views of one q/k tensor and keep it once between them). Ours keep the bf16 output, except Cohere's per-head
    q/k norm, which keeps the float32 x*rstd its per-head weight multiplies. A weighted op call also keeps its
    side buffer: the bf16 xhat of the K = side_columns(n) columns its weight conditions worst, and their int64
    indices."""
    if kind == "left_alone":
        return (2 * rows * n + 4 * rows,) * 2
    per_element, extra = {"llama": (6, 0), "olmo2": (8, 0), "gemma": (8, 4 * n), "cohere": (12, 0),
                          "cohere_heads": (12, 0), "layer_norm": (2, 0)}[kind]
    ours = 4 if kind == "cohere_heads" else 2
    k = 0 if kind == "cohere_heads" else side_columns(n, True)
    side = 2 * rows * k + 8 * k
    return per_element * rows * n + 4 * rows + extra, ours * rows * n + 4 * rows + extra + side


def _layer_records(model, batch, layer=1):
    """{module path inside layer ``layer``: bytes} from one bf16 training forward (summed over storages first
    saved there). Summed by name rather than ``meter.per_layer``: StableLM's per-head norm lists are longer
    ModuleLists than its 2 layers, and ``find_layers`` takes the longest."""
    model.train()
    torch.manual_seed(0)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    head = f"model.layers.{layer}."
    return {name[len(head):]: nbytes for name, nbytes in meter.by_module.items() if name.startswith(head)}


def _under(records, path):
    return sum(v for k, v in records.items() if k == path or k.startswith(path + "."))


@pytest.mark.parametrize("family", list(_NORMS))
def test_norm_families_are_exact_and_keep_the_derived_bytes(family):
    plain = _family(family)
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean, **NORM_ONLY)
    swapped = [path for path, kind, *_ in _NORMS[family] if kind != "left_alone"]
    assert report.counts() == {"norm=inplace": 2 * len(swapped) + 1}, str(report)   # every layer + final norm
    left = {s.name for s in report.skipped if s.reason.startswith("norm=inplace")}
    assert left == {f"model.layers.{i}.{path}" for i in range(2) for path, kind, *_ in _NORMS[family]
                    if kind == "left_alone"}, str(report)

    # fp32: the forward is HF's bit for bit, the gradients HF's up to the rebuild of x*rstd from the output
    batch = _batch(plain, 2, 16)
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(lean, batch)
    assert torch.equal(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)

    # bf16: gradient error against float64 at most twice the untouched model's
    ref = copy.deepcopy(plain).double()
    loss64, grads64 = _loss_and_grads(ref, batch)
    _, grads_p = _loss_and_grads(copy.deepcopy(plain).to(torch.bfloat16), batch)
    _, grads_t = _loss_and_grads(lean.to(torch.bfloat16), batch)
    g64 = _flat(grads64)
    err_plain, err_tempo = ((_flat(g) - g64).norm() / g64.norm() for g in (grads_p, grads_t))
    assert err_tempo <= 2 * err_plain, (err_tempo, err_plain)

    # bf16 bytes of layer 1: each norm's own figure, and the layer total, which also loses the copy of each
    # shared norm output that HF's next Linear kept (ours is the same storage, charged to the norm)
    b, s = 2, 16
    batch = _batch(plain, b, s, padded=False)
    before = _layer_records(plain.to(torch.bfloat16), batch)
    after = _layer_records(lean, batch)
    saved = 0
    for path, kind, rows, n, shared in _NORMS[family]:
        hf, ours = _norm_bytes(kind, b * s * rows, n)
        assert (_under(before, path), _under(after, path)) == (hf, ours), path
        saved += hf - ours + (2 * b * s * rows * n if shared else 0)
    assert sum(before.values()) - sum(after.values()) == saved


def test_gemma_scale_one_plus_w_is_exact_and_w_minus_one_falls_back():
    """(1 + w) handed to the op: HF's forward bit for bit; a weight entry of -1 makes the scale 0, where y / scale
    is 0/0, and the op's invertibility rule keeps the input instead: gradients stay HF's."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from tempo_ds.nn.rms_norm import InplaceGemmaRMSNorm

    torch.manual_seed(0)
    for w_minus_one in (False, True):
        hf = GemmaRMSNorm(24)
        with torch.no_grad():
            hf.weight.normal_(0, 0.5)
            if w_minus_one:
                hf.weight[[3, 7]] = -1.0
        ours = InplaceGemmaRMSNorm.from_module(copy.deepcopy(hf))
        x, g = torch.randn(5, 7, 24) * 3, torch.randn(5, 7, 24)
        outs = []
        for module in (hf, ours):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(g)
            outs.append((y.detach(), xi.grad, module.weight.grad))
        assert torch.equal(outs[1][0], outs[0][0])
        for mine, theirs in zip(outs[1][1:], outs[0][1:]):
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def _cohere(weight_shape):
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm

    hf = CohereLayerNorm(weight_shape if len(weight_shape) > 1 else weight_shape[0], eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_(1, 0.3)
    return hf


def _olmo2():
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    hf = Olmo2RMSNorm(32)
    with torch.no_grad():
        hf.weight.normal_(1, 0.3)
    return hf


def _gemma():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    hf = GemmaRMSNorm(32)
    with torch.no_grad():
        hf.weight.normal_(0, 0.3)
    return hf


def _maths64(kind, x, w, eps):
    """The norm's maths in float64."""
    if kind.startswith("cohere"):
        xc = x - x.mean(-1, keepdim=True)
        return w * xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return xhat * (1 + w) if kind == "gemma" else xhat * w


_MODULES = {"olmo2": (_olmo2, (64, 32)), "gemma": (_gemma, (64, 32)),
            "cohere": (lambda: _cohere((32,)), (64, 32)), "cohere_heads": (lambda: _cohere((4, 8)), (16, 4, 8))}


@pytest.mark.parametrize("kind", list(_MODULES))
def test_norm_variants_bitwise_in_fp32_within_2x_in_bf16_and_gradcheck(kind):
    from tempo_ds.nn.norm_families import inplace_norm

    build, shape = _MODULES[kind]
    torch.manual_seed(1)
    hf = build()
    eps = getattr(hf, "eps", getattr(hf, "variance_epsilon", None))
    x64, g64 = torch.randn(shape, dtype=torch.float64) * 2 + 0.3, torch.randn(shape, dtype=torch.float64)
    # fp32: HF's forward bit for bit, gradients tight
    results = {}
    for name, module in (("hf", hf), ("ours", inplace_norm(copy.deepcopy(hf)))):
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(module).to(dtype)
            x = x64.to(dtype).requires_grad_()
            y = m(x)
            y.backward(g64.to(dtype))
            results[name, dtype] = (y.detach(), x.grad, m.weight.grad)
    assert torch.equal(results["ours", torch.float32][0], results["hf", torch.float32][0])
    for mine, theirs in zip(results["ours", torch.float32][1:], results["hf", torch.float32][1:]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # bf16: each of y, dx, dw errs against the float64 maths at most twice as much as HF's module in bf16
    w64 = hf.weight.detach().double().requires_grad_()
    x = x64.clone().requires_grad_()
    y64 = _maths64(kind, x, w64, eps)
    y64.backward(g64)
    for exact, ours, theirs in zip((y64.detach(), x.grad, w64.grad), results["ours", torch.bfloat16],
                                   results["hf", torch.bfloat16]):
        err_ours, err_hf = ((t.double() - exact).abs().max() for t in (ours, theirs))
        assert err_ours <= 2 * err_hf, (err_ours, err_hf)
    # float64 gradcheck of the replacement (float64 maths throughout)
    ours64 = inplace_norm(copy.deepcopy(hf)).double()
    xs = torch.randn((3,) + shape[1:], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: torch.func.functional_call(ours64, {"weight": w}, (t,)),
                                    (xs, ours64.weight.detach().clone().requires_grad_()))


class _SomeoneElsesRMSNorm(nn.Module):
    """An RMSNorm whose arithmetic (weight cast to the input dtype before scaling) matches none we reproduce."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight.to(x.dtype)


def test_norms_are_recognised_by_their_code_and_the_rest_left_alone_with_the_reason():
    from transformers.models.cohere2.modeling_cohere2 import Cohere2LayerNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from tempo_ds.nn.layer_norm import InplaceCohereLayerNorm
    from tempo_ds.nn.rms_norm import InplaceGemmaRMSNorm, InplaceRMSNorm

    model = nn.Sequential(Olmo2RMSNorm(8), Gemma3RMSNorm(8), Cohere2LayerNorm(8), T5LayerNorm(8),
                          _SomeoneElsesRMSNorm(8))
    report = tempo_ds.inject(model, **NORM_ONLY)
    assert [type(m) for m in model[:3]] == [InplaceRMSNorm, InplaceGemmaRMSNorm, InplaceCohereLayerNorm]
    assert model[0].casting == "torch" and model[1].weight is report.replaced[1].old.weight
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"3", "4"}
    for name, cls in (("3", "T5LayerNorm"), ("4", "_SomeoneElsesRMSNorm")):
        assert reasons[name].startswith(f"norm=inplace: {cls} runs none of the norm arithmetics tempo_ds "
                                        "reproduces exactly (torch.nn.LayerNorm;"), reasons[name]


@pytest.mark.parametrize("family", list(_NORMS))
def test_every_family_trains_like_hf_with_the_defaults(family):
    """All default techniques together (gated-MLP recompute, lean attention, chunked LM loss, norms...): fp32
    loss and gradients equal the untouched model's; what a technique cannot do is left alone with its reason
    (Gemma 2's soft-capped attention scores keep HF's attention)."""
    plain = _family(family)
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean)
    skipped = {s.name: s.reason for s in report.skipped}
    assert ("<attention>" in skipped) == (family == "gemma2"), str(report)
    batch = _batch(plain, 2, 16)
    assert_same_loss_and_grads(plain, lean, batch)


@pytest.mark.parametrize("family", ["gemma3", "cohere"])
def test_norm_variants_under_checkpoint_recompute(family):
    """HF gradient checkpointing recomputes every layer in backward: Gemma's scale 1 + w is rebuilt and Cohere's
    centring and per-head product rerun; gradients equal the run without checkpointing."""
    model = _family(family)
    tempo_ds.inject(model, **NORM_ONLY)
    batch = _batch(model, 2, 16)
    loss0, grads0 = _loss_and_grads(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss1, grads1 = _loss_and_grads(model, batch)
    assert torch.equal(loss1, loss0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)


def test_norm_variants_compile_fullgraph():
    """Gemma's 1 + w and Cohere's per-head path (module-level code around the ops) trace without a graph break
    (DESIGN rule 11)."""
    from tempo_ds.nn.norm_families import inplace_norm

    torch.manual_seed(0)
    for kind in ("gemma", "cohere_heads"):
        build, shape = _MODULES[kind]
        module = inplace_norm(build()).to(torch.bfloat16)
        x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(shape, dtype=torch.bfloat16)
        y0 = module(x)
        (gx0,) = torch.autograd.grad(y0, x, g)
        y1 = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
        (gx1,) = torch.autograd.grad(y1, x, g)
        assert torch.equal(y1, y0), kind
        torch.testing.assert_close(gx1, gx0, msg=kind)

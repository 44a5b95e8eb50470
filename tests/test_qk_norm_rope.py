"""q/k RMSNorm fused with RoPE: HF's forward bit for bit, HF's gradients to rounding, only rstd + side kept."""
import copy

import pytest
import torch

import tempo_ds
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops.layer_norm import side_columns
from tempo_ds.ops.qk_norm_rope import qk_norm_rope

B, S, A, KV, HD = 2, 12, 4, 2, 16


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    """The PyTorch path (HF's operations) whatever the environment. With the RMSNorm kernels (TEMPO_DS_TRITON=1
    TRITON_INTERPRET=1, run by hand) gradients and the fused-vs-separate comparisons hold; only comparisons
    with HF's own norm modules differ, by an ulp (the kernel sums in another order)."""
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")
H = A * HD


def _tables(dtype, b=B, s=S, d=HD, scale=1.0):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat((f, f), -1)[None].expand(b, s, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _hf(kind, width, weight):
    """HF's own norm module (Qwen3 / OLMo 2 / Gemma 3) holding ``weight``."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    norm = {"llama": Qwen3RMSNorm, "olmo2": Olmo2RMSNorm, "gemma": Gemma3RMSNorm}[kind](width, eps=1e-6)
    del norm.weight
    norm.weight = weight  # the caller's tensor, so that autograd reaches it
    return norm


def _reference(kind, x, weight, cos, sin):
    """HF: the norm (per head, or over the projection for OLMo 2), the transpose, apply_rotary_pos_emb."""
    from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb as olmo_rope
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb
    norm = _hf(kind, weight.numel(), weight)
    if kind == "olmo2":
        q = norm(x.reshape(*x.shape[:2], -1)).view(x.shape).transpose(1, 2)
        return olmo_rope(q, q, cos, sin)[0]
    return apply_rotary_pos_emb(norm(x).transpose(1, 2), x.new_zeros(1), cos, sin)[0]


def _ours(kind, x, weight, cos, sin):
    if kind == "gemma":
        return qk_norm_rope(x, 1.0 + (weight if weight.dtype == torch.float64 else weight.float()), cos, sin, 1e-6,
                            casting="torch")
    return qk_norm_rope(x, weight, cos, sin, 1e-6, casting="llama" if kind == "llama" else "torch",
                        whole=kind == "olmo2", cast_back=kind == "olmo2")


def _weight(kind, dtype, gen):
    n = H if kind == "olmo2" else HD
    w = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64))  # magnitudes over a decade, pairs unequal
    return (w - 1 if kind == "gemma" else w).to(dtype)


@pytest.mark.parametrize("kind", ["llama", "gemma", "olmo2"])
def test_forward_is_hf_bit_for_bit_and_gradients_hf_to_rounding(kind):
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(B, S, A, HD, generator=gen, dtype=torch.float64) * 3
    w64, g = _weight(kind, torch.float64, gen), torch.randn(B, A, S, HD, generator=gen, dtype=torch.float64)
    cos64, sin64 = _tables(torch.float64)
    xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = torch.autograd.grad(_reference(kind, xr, wr, cos64, sin64), (xr, wr), g)
    for dtype in (torch.float32, torch.bfloat16):
        grads, errs = {}, {}
        for who, fn in (("hf", _reference), ("ours", _ours)):
            x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
            cos, sin = _tables(dtype)
            out = fn(kind, x, w, cos, sin)
            grads[who] = out, torch.autograd.grad(out, (x, w), g.to(out.dtype))
            errs[who] = [((d.double() - r).norm() / r.norm()).item() for d, r in zip(grads[who][1], ref)]
        assert torch.equal(grads["ours"][0], grads["hf"][0]), dtype
        assert grads["ours"][0].stride() == grads["hf"][0].stride()
        for ours, hf in zip(errs["ours"], errs["hf"]):   # dx, dw: error against float64 within HF's own, rounded
            assert ours <= 1.6 * hf, (kind, dtype, errs)  # measured: up to 1.36x in float32, 1.46x in bf16


def test_gradcheck_float64_per_head_over_projection_and_scaled_tables():
    gen = torch.Generator().manual_seed(1)
    cos, sin = _tables(torch.float64, b=1, s=3, d=4, scale=1.3)  # yarn-style attention scaling: det != 1
    x = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for whole, casting in ((False, "llama"), (True, "torch")):
        w = (torch.rand(8 if whole else 4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        if True:
            assert torch.autograd.gradcheck(
                lambda x, w: qk_norm_rope(x, w, cos, sin, 1e-6, casting=casting, whole=whole), (x, w))


def test_zero_and_tiny_weights_use_the_side_buffer():
    """Columns the output cannot give back (w = 0, and a partner 1e4 times its column) come from the buffer."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, S, A, HD, generator=gen)
    w = torch.ones(HD)
    w[0], w[3], w[3 + HD // 2] = 0.0, 1e-4, 1.0
    cos, sin = _tables(torch.float32)
    g = torch.randn(B, A, S, HD, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.autograd.grad(_reference("llama", xr, wr, cos, sin), (xr, wr), g)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = torch.autograd.grad(_ours("llama", xo, wo, cos, sin), (xo, wo), g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_bad_input_raises():
    cos, sin = _tables(torch.float32)
    x = torch.randn(B, S, A, HD)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        qk_norm_rope(x, torch.ones(H), cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        qk_norm_rope(x, torch.ones(HD), cos[:, :3], sin)
    with pytest.raises(ValueError, match="casting='gemma': expected one of"):
        qk_norm_rope(x, torch.ones(HD), cos, sin, casting="gemma")


# -- the attention swap on tiny models --------------------------------------------------------------------
def _model(family):
    import transformers as t
    common = dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=A, num_key_value_heads=KV,
                  head_dim=HD, intermediate_size=96, max_position_embeddings=64, pad_token_id=0)
    cfg_cls, cls = {"qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM), "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM),
                    "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM), "cohere": (t.CohereConfig, t.CohereForCausalLM)}[family]
    extra = {"sliding_window": 4} if family == "gemma3" else {"use_qk_norm": True} if family == "cohere" else {}
    cfg = cfg_cls(**common, **extra)
    cfg._attn_implementation, cfg.use_cache = "sdpa", False
    torch.manual_seed(0)
    model = cls(cfg).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


NORM_ONLY = {**{k: "off" for k in tempo_ds.TempoConfig().techniques()}, "norm": "inplace", "attention": "lean"}


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer_bytes(model, ids):
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, labels=ids)
    return meter.by_module, meter.per_layer


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "olmo2"])
def test_attention_swap_is_exact_and_keeps_no_norm_output(family):
    plain = _model(family)
    fused, separate = copy.deepcopy(plain), copy.deepcopy(plain)
    report = tempo_ds.inject(fused, **NORM_ONLY)
    tempo_ds.inject(separate, **NORM_ONLY, qk_norm="separate")
    assert report.counts()["qk_norm=rope"] == 2, str(report)
    ids = torch.randint(3, 120, (B, S), generator=torch.Generator().manual_seed(3))

    loss0, grads0 = _loss_and_grads(separate, ids)   # the plain in-place norms (HF's forward bit for bit)
    loss1, grads1 = _loss_and_grads(fused, ids)
    assert torch.equal(loss1, loss0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    if family == "gemma3":  # non-reentrant checkpointing recomputes the op (and Gemma's 1 + w): same gradients
        fused.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss2, grads2 = _loss_and_grads(fused, ids)
        fused.activation_checkpointing_disable()
        assert torch.equal(loss2, loss1) and all(torch.equal(grads2[n], grads1[n]) for n in grads1)
    with torch.no_grad():  # evaluation runs HF's own forward, a KV cache included
        fused.eval(), separate.eval()
        out0, out1 = (m(input_ids=ids, use_cache=True) for m in (separate, fused))
        assert torch.equal(out1.logits, out0.logits)
        assert out1.past_key_values.get_seq_length() == S

    # bf16 bytes of layer 1: the fused op keeps rstd and the side buffer per q/k row; its rotated output is
    # the tensor attention keeps, so the layer loses both norm outputs the separate norms kept
    fused.train().to(torch.bfloat16), separate.train().to(torch.bfloat16)
    by_sep, layers_sep = _layer_bytes(separate, ids)
    by_fused, layers_fused = _layer_bytes(fused, ids)
    n = H if family == "olmo2" else HD
    rows = {"q": B * S * (1 if family == "olmo2" else A), "k": B * S * (1 if family == "olmo2" else KV)}
    k = side_columns(n, True)
    op_bytes = sum(4 * r + 2 * r * k + 8 * k for r in rows.values())
    extra = 2 * 4 * HD if family == "gemma3" else 0   # Gemma's float32 scales 1 + w, as the separate norms keep
    assert by_fused["model.layers.1.self_attn"] - by_sep["model.layers.1.self_attn"] == op_bytes + extra
    norm_outputs = 2 * B * S * (A + KV) * HD
    assert layers_sep[1] - layers_fused[1] == norm_outputs
    if family != "olmo2":   # the whole layer: 2 (Qwen3) or 4 (Gemma 3) hidden norms, lean attention, HF's MLP
        t, i = B * S, 96
        hidden_norm = 2 * t * H + 4 * t + 2 * t * side_columns(H, True) + 8 * side_columns(H, True) + \
            (4 * H if family == "gemma3" else 0)
        attention = 2 * t * (2 * H + 2 * KV * HD) + 4 * t * A   # q, k, v, output; float32 log-sum-exp per head
        mlp = 2 * t * i * 4                                     # gate, act(gate), up, act(gate) * up
        expected = (2 if family == "qwen3" else 4) * hidden_norm + attention + op_bytes + extra + mlp
        assert layers_fused[1] == expected == {"qwen3": 38272, "gemma3": 46656}[family]


def test_other_qk_norm_attentions_are_skipped_with_the_reason():
    model = _model("cohere")
    report = tempo_ds.inject(model, **NORM_ONLY)
    reasons = {s.name: s.reason for s in report.skipped if s.reason.startswith("qk_norm=rope")}
    assert reasons.keys() == {"model.layers.0.self_attn", "model.layers.1.self_attn"}, str(report)
    assert "is not one of the q/k-norm attention forms" in reasons["model.layers.0.self_attn"]
    assert report.counts()["norm=inplace"] == 2 * 3 + 1   # its q/k norms are still replaced one by one


def test_no_host_reads_compile_export_and_opcheck():
    """DESIGN rules 10-11 as tests/test_ops_syncfree.py checks them, with a zero, a subnormal and a small weight
    (the side buffer): no host read eagerly, forward and backward; torch.compile(fullgraph) and torch.export equal
    to eager; opcheck of the fake implementation and the autograd registration."""
    from helpers import NoHostReads
    gen = torch.Generator().manual_seed(4)
    cos, sin = _tables(torch.float32, b=1, s=5)
    w = torch.nn.Parameter(torch.rand(HD, generator=gen) + 0.5)
    with torch.no_grad():
        w[1], w[4], w[9] = 0.0, 1e-39, 1e-3
    x = torch.randn(3, 5, 2, HD, generator=gen)
    g = torch.randn(3, 2, 5, HD, generator=gen)

    def fn(x):
        return qk_norm_rope(x, w, cos, sin, 1e-6)

    def run(f):
        w.grad = None
        xx = x.clone().requires_grad_()
        y = f(xx)
        y.backward(g)
        return [y.detach(), xx.grad, w.grad.clone()]

    eager = run(fn)
    with NoHostReads():
        again = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for a, b, c in zip(eager, again, compiled):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.isfinite(a).all()

    class Wrapped(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    assert torch.equal(torch.export.export(Wrapped(), (x,)).module()(x), fn(x))
    torch.library.opcheck(torch.ops.tempo_ds.qk_norm_rope_fwd.default,
                          (x.requires_grad_(), w, cos, sin, 1e-6, "llama", torch.float32, torch.float32, False, True))


def test_a_wider_rotated_output_keeps_the_norm_output_instead():
    """float32 tables with a bf16 norm output (Gemma 3 under autocast): the rotated output would be float32, twice
    the norm output's bytes, so the plain in-place norm and HF's rotation run (HF's values, y kept)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, S, A, HD, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(HD, generator=gen).requires_grad_()
    cos, sin = _tables(torch.float32)
    out = _ours("gemma", x, w, cos, sin)
    assert out.dtype == torch.float32 and torch.equal(out, _reference("gemma", x, w, cos, sin))
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn.name() not in names:
            names.add(fn.name())
            todo.extend(f for f, _ in fn.next_functions)
    assert any("inplace_rms_norm" in n for n in names) and not any("qk_norm_rope" in n for n in names), names


def test_a_skipped_q_norm_keeps_the_attention_hf():
    model = _model("qwen3")
    report = tempo_ds.inject(model, **NORM_ONLY, skip=["model.layers.0.self_attn.q_norm"])
    assert [s.name for s in report.replaced if s.technique == "qk_norm=rope"] == ["model.layers.1.self_attn"]
    assert "model.layers.0.self_attn.q_norm" in {s.name for s in report.skipped}


def test_an_instance_level_forward_is_refused():
    """A forward set on the instance (a patch, accelerate's hooks) would be copied with the attributes and run the
    original module: refused with the reason."""
    import types

    from tempo_ds.nn.qk_norm_rope import QKNormRopeAttention
    attention = _model("qwen3").model.layers[0].self_attn
    attention.forward = types.MethodType(type(attention).forward, attention)
    with pytest.raises(TypeError, match="instance-level forward"):
        QKNormRopeAttention.from_module(attention)


def test_output_attentions_pickling_and_revert_see_the_hf_class():
    """The fused module is an instance of the HF attention class too, so transformers' hooks record
    ``output_attentions`` (eager: equal to the untouched model's); it pickles and reverts."""
    import io

    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    plain = _model("qwen3")
    plain.config._attn_implementation = "eager"
    fused = copy.deepcopy(plain)
    tempo_ds.inject(fused, **{**NORM_ONLY, "attention": "off"})
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention, Qwen3Attention) and type(attention).__name__ == "QKNormRopeQwen3Attention"
    buffer = io.BytesIO()
    torch.save(fused, buffer)  # before output_attentions: transformers' recording hooks do not pickle
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model.layers[0].self_attn) is type(attention)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ours, theirs = fused(input_ids=ids, output_attentions=True), plain(input_ids=ids, output_attentions=True)
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(loaded(input_ids=ids).logits, theirs.logits)
    tempo_ds.revert(fused)
    assert type(fused.model.layers[0].self_attn) is Qwen3Attention

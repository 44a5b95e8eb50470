"""Gated MLP fused into its down projection: exact against HF (fp32 and bf16 bit for bit), float64 gradcheck,
the Triton kernel under the interpreter, the bytes it keeps, and the families whose MLPs it takes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import tempo_ds
from helpers import assert_checkpoint_matches, assert_within_2x_of_torch, loss_and_grads as _loss_and_grads, spied_kernel
from tempo_ds.config import TempoConfig
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import GatedMLP
from tempo_ds.nn.moe_experts import MoEExperts
from tempo_ds.ops import gated_mlp

ACTS = ["silu", "gelu_tanh"]


def _unfused(g, u, w, b, act):
    """HF's order: act(gate) * up, then the down Linear (``u`` None: ``g`` is a fused gate_up output)."""
    if u is None:
        g, u = g.chunk(2, dim=-1)
    a = F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")
    return F.linear(a * u, w, b)


def _inputs(dtype, fused=False, bias=False, lead=(3, 5), i=24, o=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(*lead, 2 * i if fused else i, generator=gen) * 2).to(dtype)
    u = None if fused else torch.randn(*lead, i, generator=gen).to(dtype)
    w = (torch.randn(o, i, generator=gen) / math.sqrt(i)).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype) if bias else None
    dout = torch.randn(*lead, o, generator=gen)
    return g, u, w, b, dout


def _run(fn, g, u, w, b, act, dout, autocast=False):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (g, u, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves, act)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


# -- the op --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fused", [False, True])
def test_gradcheck_float64(act, fused):
    g, u, w, b, _ = _inputs(torch.float64, fused, bias=not fused, lead=(2, 3), i=5, o=4)
    args = [t.requires_grad_() if t is not None else None for t in (g, u, w, b)]
    assert torch.autograd.gradcheck(lambda *a: gated_mlp(*a, activation=act), args)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fused", [False, True])
def test_output_and_gradients_equal_the_unfused_ops_bit_for_bit(act, fused):
    """float32, bfloat16, float16 and bf16 autocast over float32 parameters, with and without bias."""
    for dtype, bias, autocast in [(torch.float32, False, False), (torch.float32, True, False),
                                  (torch.bfloat16, True, False), (torch.float16, False, False),
                                  (torch.float32, True, True)]:
        g, u, w, b, dout = _inputs(dtype, fused, bias)
        ours = _run(gated_mlp, g, u, w, b, act, dout, autocast)
        theirs = _run(_unfused, g, u, w, b, act, dout, autocast)
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert o.dtype == t.dtype and torch.equal(o, t), (dtype, bias, autocast)


def test_frozen_weight_and_no_grad():
    g, u, w, b, dout = _inputs(torch.float32, bias=True)
    g.requires_grad_()
    out = gated_mlp(g, u, w, b)                 # only g needs a gradient: u, w, b get none
    out.backward(dout)
    ref = g.detach().clone().requires_grad_()
    _unfused(ref, u, w, b, "silu").backward(dout)
    assert torch.equal(g.grad, ref.grad)
    with SavedTensorMeter() as meter, torch.no_grad():
        assert torch.equal(gated_mlp(g, u, w, b), _unfused(g, u, w, b, "silu"))
    assert meter.total_bytes == 0


@pytest.mark.parametrize("mode", ["torch_reentrant", "torch_non_reentrant"])
def test_checkpoint_recompute(mode):
    g, u, w, _, _ = _inputs(torch.float32)
    w = nn.Parameter(w)
    assert_checkpoint_matches(lambda a, c: gated_mlp(a, c, w), [g.requires_grad_(), u.requires_grad_()], mode)


def test_zero3_gathers_the_down_weight_in_backward(zero3_gather):
    g, u, w, b, dout = _inputs(torch.float32, bias=True)
    w, b = nn.Parameter(w), nn.Parameter(b)
    zero3_gather.partition(w, b)
    out = gated_mlp(g.requires_grad_(), u, w, b)
    out.backward(dout)
    assert zero3_gather.gathered == [[w]]       # the bias is not needed to differentiate
    assert w.grad is not None and b.grad is not None


def test_opcheck_export_and_fullgraph_compile():
    g, u, w, b, _ = _inputs(torch.float32, bias=True, lead=(2, 3), i=8, o=4)
    for args in [(g, u, w, b, "silu", None), (g.requires_grad_(), u, w, None, "gelu_tanh", torch.bfloat16)]:
        torch.library.opcheck(torch.ops.tempo_ds.gated_mlp_fwd, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    mlp = GatedMLP.from_module(_llama_mlp(8, 12, bias=True))
    x = torch.randn(2, 3, 8)
    exported = torch.export.export(mlp, (x,))
    assert torch.equal(exported.module()(x), mlp(x))
    x.requires_grad_()
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")   # traced through the fake impls
    compiled(x).sum().backward()
    grads = [x.grad] + [p.grad for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    mlp(x).sum().backward()
    for got, want in zip(grads, [x.grad] + [p.grad for p in mlp.parameters()]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("call, message", [
    (lambda g, u, w: gated_mlp(g, u, w, activation="gelu"), "activation must be one of 'silu', 'gelu_tanh'"),
    (lambda g, u, w: gated_mlp(g, u[..., :3], w), "gate and up must have one shape"),
    (lambda g, u, w: gated_mlp(g, u, w.t()), "weight must be"),
    (lambda g, u, w: gated_mlp(g[..., :3], None, w), "even last dimension"),
    (lambda g, u, w: gated_mlp(g, u, w, torch.zeros(3)), "bias must be"),
    (lambda g, u, w: gated_mlp(g, u.long(), w), "up must be a floating-point tensor"),
])
def test_bad_arguments_are_refused(call, message):
    g, u, w, _, _ = _inputs(torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        call(g, u, w)


# -- the Triton kernel ---------------------------------------------------------------------------------
@pytest.fixture
def gated_kernel(monkeypatch):
    yield from spied_kernel(monkeypatch, "gated_mlp", ("forward", "backward"))


@pytest.mark.parametrize("act", ACTS)
def test_triton_kernel_matches_the_pytorch_path(gated_kernel, act):
    """Under the interpreter NumPy's exp (and tanh built from it) stand in for libdevice's, so the kernel may
    differ from PyTorch's CPU kernels by a few ulps: float32 results agree to 16 units of float32 precision at
    the tensor's scale, bfloat16/float16 ones to one unit of their precision (a single rounding flip)."""
    for dtype, fused in [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)]:
        g, u, w, b, dout = _inputs(dtype, fused, bias=True, lead=(2, 3), i=20, o=8)
        gated_kernel.env.setenv("TEMPO_DS_TRITON", "1")
        ours = _run(gated_mlp, g, u, w, b, act, dout)
        gated_kernel.env.setenv("TEMPO_DS_TRITON", "0")
        ref = _run(gated_mlp, g, u, w, b, act, dout)
        for o, r in zip(ours, ref):
            assert o.dtype == r.dtype
            scale = r.double().abs().max().item()
            tol = (16 if dtype == torch.float32 else 1) * torch.finfo(dtype).eps * scale
            assert (o.double() - r.double()).abs().max().item() <= tol, (dtype, fused)
    assert gated_kernel.calls.count("forward") == 3 and gated_kernel.calls.count("backward") == 3


def test_kernels_compile_ahead_of_time_for_sm80_and_sm90(tmp_path):
    """The launches the dispatch makes compile with ``triton.compile(ASTSource(...))`` (no GPU needed), in a
    subprocess without the interpreter: all 18 are listed, two representative ones compiled here (the whole list,
    36 compiles, takes ~15 s: `tempo-ds aot --full --only gated_mlp`)."""
    import subprocess
    import sys

    script = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from tempo_ds.kernels import gated_mlp as k\n"
        "specs = k.aot_specializations(full=True)\n"
        "assert len(specs) == 18 and len(k.aot_specializations()) == 3\n"
        "picked = ('gated_forward_fp32_silu', 'gated_backward_bf16_gelu_tanh_h')\n"
        "for spec in [s for s in specs if s['name'] in picked]:\n"
        "    for arch in (80, 90):\n"
        "        c = triton.compile(ASTSource(spec['fn'], spec['signature'], spec['constexprs']),\n"
        "                           target=GPUTarget('cuda', arch, 32))\n"
        "        assert c.metadata.shared < 160_000\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


# -- modules and families ------------------------------------------------------------------------------
def _llama_mlp(h, i, bias=False):
    cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=i, mlp_bias=bias, num_attention_heads=1,
                                   num_key_value_heads=1)
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(cfg)


def test_bytes_the_mlp_keeps():
    """HF's MLP keeps x (shared by gate and up), g, act(g), u and their product; the fused one keeps x, g, u:
    per token 2 * 2i/h sbh of the MLP's instead of 4 * 2i/h (bf16)."""
    h, i, s, b = 32, 96, 16, 2
    hf = _llama_mlp(h, i).to(torch.bfloat16)
    fused = GatedMLP.from_module(copy.deepcopy(hf))
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    elem = 2
    for module, kept in ((hf, 4), (fused, 2)):
        with SavedTensorMeter() as meter:
            out = module(x)
        del out
        assert meter.total_bytes == elem * b * s * (h + kept * i)


def test_per_layer_bytes_on_a_llama_model():
    """The same saving in a whole (tiny) Llama, counted per layer by the meter: exactly two [b, s, i] bf16
    tensors fewer, every other technique off."""
    model = _family("llama").to(torch.bfloat16)
    batch = _batch()
    off = {k: "off" for k in TempoConfig().techniques()}
    per_layer = []
    for cfg in (off, {**off, "mlp": "recompute"}):
        tempo_ds.inject(model, **cfg)
        with SavedTensorMeter(model) as meter:
            out = model(**batch)
        del out
        per_layer.append(meter.per_layer)
        tempo_ds.revert(model)
    b, s = batch["input_ids"].shape
    i = model.config.intermediate_size
    assert [p - q for p, q in zip(*per_layer)] == [2 * b * s * i * 2] * model.config.num_hidden_layers


H, I, V, S = 32, 48, 128, 8
_COMMON = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_COMMON, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**_COMMON),
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON),
    "granite": lambda: transformers.GraniteConfig(**_COMMON),
    "cohere": lambda: transformers.CohereConfig(**_COMMON),
    "stablelm": lambda: transformers.StableLmConfig(**_COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=16, num_experts=4,
                                                     shared_expert_intermediate_size=24, num_experts_per_tok=2),
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
}
ACT_OF = {"gemma": "gelu_tanh", "gemma2": "gelu_tanh", "gemma3": "gelu_tanh"}


def _family(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    for p in model.parameters():      # Gemma-style zero-initialised norms and tiny inits: make every path count
        p.data.normal_(0, 0.2)
    model.config.use_cache = False
    return model.train()


def _batch(b=2, s=S):
    ids = torch.randint(3, V, (b, s), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_fp32_loss_and_every_gradient_equal_hf(family):
    """mlp=recompute alone (the other techniques off) on each family's real classes: every dense gated MLP is
    fused, loss and every parameter gradient equal the untouched model's bit for bit, state_dict keys and
    Parameter objects are kept. MoE experts stored as 3-D Parameters become MoEExperts (tests/test_moe_experts.py)."""
    plain = _family(family)
    lean = copy.deepcopy(plain)
    off = {k: "off" for k in TempoConfig().techniques()}
    report = tempo_ds.inject(lean, **{**off, "mlp": "recompute"})
    fused = [s for s in report.replaced if s.technique == "mlp=recompute"]
    experts = [s for s in fused if isinstance(s.new, MoEExperts)]
    fused = [s for s in fused if not isinstance(s.new, MoEExperts)]
    if family == "mixtral":
        assert not fused and len(experts) == 1
    else:
        assert len(fused) == 1 and isinstance(fused[0].new, GatedMLP)
        assert fused[0].new.activation == ACT_OF.get(family, "silu")
        assert len(experts) == (family == "qwen2_moe")
    assert list(lean.state_dict()) == list(plain.state_dict())
    before = {n: id(p) for n, p in lean.named_parameters()}
    batch = _batch()
    loss_p, grads_p = _loss_and_grads(plain, batch)
    loss_l, grads_l = _loss_and_grads(lean, batch)
    assert torch.equal(loss_l, loss_p)
    assert grads_l.keys() == grads_p.keys()
    for name, g in grads_p.items():
        assert torch.equal(grads_l[name], g), name
    assert {n: id(p) for n, p in lean.named_parameters()} == before
    tempo_ds.revert(lean)
    assert not any(isinstance(m, GatedMLP) for m in lean.modules())


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_family_bf16_within_twice_hf_error_against_float64(family):
    """bf16 model: the fused MLP's loss and gradients equal HF's bf16 ones bit for bit, hence within 2x of
    HF's own error against a float64 run of the same weights."""
    ref = _family(family).double()
    batch = _batch()
    off = {k: "off" for k in TempoConfig().techniques()}
    loss64, grads64 = _loss_and_grads(ref, batch)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    lean = copy.deepcopy(plain)
    tempo_ds.inject(lean, **{**off, "mlp": "recompute"})
    loss_p, grads_p = _loss_and_grads(plain, batch)
    loss_l, grads_l = _loss_and_grads(lean, batch)
    assert torch.equal(loss_l, loss_p)
    assert_within_2x_of_torch(loss_l, loss_p, loss64, what="loss")
    for name, g in grads_p.items():
        assert torch.equal(grads_l[name], g), name
        assert_within_2x_of_torch(grads_l[name], g, grads64[name], what=name)


class _ScaledMLP(nn.Module):
    """Looks like a gated MLP, computes something else."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 0.5


def test_unrecognised_mlps_are_skipped_with_the_reason():
    from transformers.activations import NewGELUActivation

    other_act = _llama_mlp(8, 12)
    other_act.act_fn = NewGELUActivation()
    hooked = _llama_mlp(8, 12)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.ModuleDict({"scaled": _ScaledMLP(), "other_act": other_act, "hooked": hooked,
                           "plain": _llama_mlp(8, 12)})
    report = tempo_ds.inject(model, policy="llama")
    reasons = {s.name: s.reason for s in report.skipped if s.reason.startswith("mlp=")}
    assert "_ScaledMLP.forward is not down_proj(act_fn(gate_proj(x)) * up_proj(x))" in reasons["scaled"]
    assert "NewGELUActivation, which is not exactly SiLU or tanh-GELU" in reasons["other_act"]
    assert "forward hooks" in reasons["hooked"]
    assert type(model["scaled"]) is _ScaledMLP and isinstance(model["plain"], GatedMLP)


def test_fewbit_silu_gives_way_inside_fused_mlps():
    model = nn.ModuleDict({"mlp": _llama_mlp(8, 12), "act": nn.SiLU()})
    report = tempo_ds.inject(model, policy="llama", silu="fewbit")
    assert {s.name: s.technique for s in report.replaced} == {"mlp": "mlp=recompute", "act": "silu=fewbit"}
    skipped = [s for s in report.skipped if s.name != "<attention>"]   # a ModuleDict has no attention interface
    assert [s.name for s in skipped] == ["mlp.act_fn"] and "set mlp='off'" in skipped[0].reason
    tempo_ds.revert(model)
    report = tempo_ds.inject(model, policy="llama", silu="fewbit", mlp="off")
    assert {s.name: s.technique for s in report.replaced} == {"mlp.act_fn": "silu=fewbit", "act": "silu=fewbit"}

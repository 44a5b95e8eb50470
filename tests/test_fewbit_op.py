"""Few-bit activations: exact forward, grad = q[code] * grad bit for bit, b bits per element saved, the
Triton kernels, checkpointing and autocast, the modules and calibration."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import CHECKPOINT_MODES, assert_checkpoint_matches, assert_within_2x_of_torch
from tempo_ds.fewbit import FUNCTIONS, calibrate, l2_error, table
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn.fewbit import (FewBitActivation, FewBitGELU, FewBitHardtanh, FewBitLeakyReLU, FewBitReLU6,
                                FewBitSiLU, from_module)
from tempo_ds.ops._bits import unpack_bits
from tempo_ds.ops.fewbit import FewBitFunction, fewbit, reference_backward, resolve

SMOOTH = [n for n, a in FUNCTIONS.items() if not a.exact]
EXACT = [n for n, a in FUNCTIONS.items() if a.exact]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def _inputs(shape, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, g


def _run(x, g, name, bits, table_=None):
    x = x.clone().requires_grad_()
    y = fewbit(x, name, bits, table_)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SMOOTH)
def test_forward_is_the_torch_op_and_grad_is_the_table_applied(name, dtype):
    x, g = _inputs((5, 3, 41), dtype)
    for bits in (1, 2, 3, 4):
        y, dx = _run(x, g, name, bits)
        assert same_bits(y, FUNCTIONS[name].forward(x))
        assert same_bits(dx, reference_backward(g, x, resolve(name, bits)))


def test_reference_backward_is_the_documented_rule():
    x, g = _inputs((1000,), torch.bfloat16)
    b, q = table("silu", 3)
    code = (x.float()[:, None] > b.float()[None, :]).sum(1)
    expected = (g.float() * q.float()[code]).to(torch.bfloat16)    # level in fp32, one rounding to bf16
    assert same_bits(_run(x, g, "silu", 3)[1], expected)
    assert not same_bits(expected, g * q.to(torch.bfloat16)[code])  # the other order rounds differently


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_variants_give_pytorchs_gradients_bit_for_bit(dtype):
    x, g = _inputs((7, 129), dtype)
    special = torch.tensor([0.0, -0.0, 6.0, -1.0, 1.0, -2.0, 3.0, math.inf, -math.inf, math.nan], dtype=dtype)
    x[0, :10] = special
    g[1, :3] = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    cases = [(FewBitReLU6(), nn.ReLU6()), (FewBitLeakyReLU(), nn.LeakyReLU()),
             (FewBitLeakyReLU(0.2), nn.LeakyReLU(0.2)), (FewBitHardtanh(), nn.Hardtanh()),
             (FewBitHardtanh(-2.0, 3.0), nn.Hardtanh(-2.0, 3.0)), (from_module(nn.ReLU()), nn.ReLU())]
    for ours, theirs in cases:
        if ours.spec.band:   # PyTorch's own Hardtanh backward of a nan input depends on the code path
            x[0, 9] = 0.5
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), theirs(xs[1])]
        grads = [torch.autograd.grad(y, xi, g)[0] for y, xi in zip(ys, xs)]
        assert same_bits(ys[0], ys[1]), ours
        assert same_bits(grads[0], grads[1]), ours


def test_gradcheck_float64():
    x = torch.randn(6, 9, dtype=torch.float64) * 3
    x = (x + 0.1 * x.sign()).requires_grad_()                     # away from the kinks at 0 and +-1
    for name, params in [("relu", {}), ("leaky_relu", {"negative_slope": 0.3}), ("hardtanh", {"min_val": -2.0})]:
        spec = resolve(name, 1, table(name, 1, **params))
        assert torch.autograd.gradcheck(lambda t: FewBitFunction.apply(t, spec), (x,))
    # a table is the derivative of a piecewise-linear function: gradcheck against that function
    spec = resolve("gelu", 2)
    b, q = torch.tensor(spec.borders, dtype=torch.float64), torch.tensor(spec.levels, dtype=torch.float64)
    y = FewBitFunction.apply(x, spec)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(dx, q[(x.detach()[..., None] > b).sum(-1)])


def test_odd_shapes_non_contiguous_empty_and_the_input_is_kept():
    x, g = _inputs((13, 7, 5), torch.bfloat16)
    xt, gt = x.transpose(0, 2), g.transpose(0, 2)
    assert not xt.is_contiguous()
    before = xt.clone()
    y, dx = _run(xt, gt, "gelu", 3)
    assert same_bits(xt, before)
    assert same_bits(y, F.gelu(xt)) and dx.shape == xt.shape
    assert same_bits(dx, reference_backward(gt, xt, resolve("gelu", 3)))
    e = torch.empty(0, 4, requires_grad=True)
    y = fewbit(e, "silu", 2)
    y.sum().backward()
    assert y.shape == (0, 4) and e.grad.shape == (0, 4)


def test_nan_and_inf_propagate_to_the_output():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0], requires_grad=True)
    y = fewbit(x, "gelu", 2)
    assert torch.isnan(y[0]) and same_bits(y.detach(), F.gelu(x.detach()))     # torch's own inf handling
    (dx,) = torch.autograd.grad(y, x, torch.tensor([1.0, 1.0, 1.0, math.nan]))
    b, q = table("gelu", 2)
    assert dx[:3].tolist() == [q[-1].float().item(), q[-1].float().item(), q[0].float().item()]  # nan: last code
    assert torch.isnan(dx[3])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_saves_exactly_ceil_n_b_over_8_bytes(n, bits):
    x = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = fewbit(x, "silu", bits)
    assert meter.total_bytes == (n * bits + 7) // 8 and len(meter.saved) == 1
    assert meter.saved[0].dtype == torch.uint8
    (packed,) = y.grad_fn.saved_tensors
    codes = unpack_bits(packed, bits, n).long()
    assert torch.equal(codes, (x.detach().float()[:, None] > table("silu", bits)[0].float()).sum(1))


def test_nothing_is_saved_or_coded_without_grad():
    x = torch.randn(100)
    with SavedTensorMeter() as meter:
        y = fewbit(x, "gelu", 2)
        with torch.no_grad():
            z = fewbit(x.requires_grad_(), "gelu", 2)
    assert meter.total_bytes == 0 and y.grad_fn is None and z.grad_fn is None
    assert same_bits(y, F.gelu(x.detach())) and same_bits(z, y)


def test_where_it_pays_frozen_linear_keeps_only_the_code():
    """Linear -> GELU -> frozen Linear in bf16: plain GELU keeps its 2-byte input, few-bit GELU 2 bits."""
    torch.manual_seed(0)
    tokens, d, hidden = 96, 32, 128
    fc1 = nn.Linear(d, hidden).bfloat16()
    fc2 = nn.Linear(hidden, d).bfloat16().requires_grad_(False)
    x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)
    n = tokens * hidden

    def bytes_kept(act):
        model = nn.Sequential(fc1, act, fc2)
        with SavedTensorMeter(model) as meter:
            model(x).float().sum()
        return meter.total_bytes, meter.by_module

    plain, plain_by = bytes_kept(nn.GELU())
    ours, ours_by = bytes_kept(FewBitGELU(bits=2))
    assert plain_by["1"] == 2 * n and ours_by["1"] == n // 4     # GELU: 2 bytes -> 0.25 bytes per element
    assert ours_by.get("2", 0) == plain_by.get("2", 0) == 0      # the frozen Linear keeps nothing
    assert plain - ours == 2 * n - n // 4
    # with a trainable second Linear its input (GELU's output) is kept anyway: few-bit saves the GELU input
    fc2.requires_grad_(True)
    plain, _ = bytes_kept(nn.GELU())
    ours, _ = bytes_kept(FewBitGELU(bits=2))
    assert plain - ours == 2 * n - n // 4 and ours >= 2 * n


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_every_checkpoint_mode_gives_the_same_gradients(mode):
    x = torch.randn(6, 29, requires_grad=True)
    w = torch.randn(29, 29, requires_grad=True)

    def fn(x, w):
        return fewbit(x @ w, "gelu", 2) @ w

    assert_checkpoint_matches(fn, [x, w], mode)


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_autocast_bf16_gives_the_same_gradients_checkpointed_or_not(mode):
    lin = nn.Linear(24, 40)
    act = FewBitSiLU(bits=3)
    x = torch.randn(10, 24, requires_grad=True)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x)
            return act(h).float()

    assert_checkpoint_matches(fn, [x], mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x.detach())
    xh = h.detach().requires_grad_()
    assert xh.dtype == torch.bfloat16
    assert same_bits(act(xh), F.silu(xh))


TRITON_CASES = ([(n, 2, torch.float32) for n in FUNCTIONS]
                + [(n, b, dt) for n in ("gelu", "silu", "hardswish") for b in (1, 3, 4)
                   for dt in (torch.float16, torch.bfloat16)]
                + [(n, 1, dt) for n in EXACT for dt in (torch.float16, torch.bfloat16)])


def _reload_triton_language():
    """Rebuild triton.language's ``@triton.jit`` helpers (tl.sigmoid, ...) and our kernels: the decorator
    picks the interpreter or the compiler from TRITON_INTERPRET when the module is imported."""
    import importlib

    import triton.language
    import triton.language.standard

    from tempo_ds.kernels import fewbit as kernel

    for module in (triton.language.standard, triton.language, kernel):
        importlib.reload(module)


@pytest.fixture(scope="module")
def interpreter():
    """``tempo_ds.kernels.fewbit`` under Triton's interpreter (undone after the module's tests)."""
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        import triton.language
        from triton.runtime.interpreter import InterpretedFunction

        from tempo_ds.kernels import fewbit as kernel

        rebuilt = not (isinstance(triton.language.standard.sigmoid, InterpretedFunction)
                       and isinstance(kernel._fewbit_fwd_kernel, InterpretedFunction))
        if rebuilt:
            _reload_triton_language()
        yield kernel
        if rebuilt:
            mp.delenv("TRITON_INTERPRET")
            _reload_triton_language()


@pytest.mark.parametrize("name,bits,dtype", TRITON_CASES)
def test_triton_kernel_matches_the_pytorch_path(name, bits, dtype, interpreter, monkeypatch):
    from tempo_ds.ops.fewbit import _backward, _forward

    bits = 1 if FUNCTIONS[name].exact else bits
    spec = resolve(name, bits)
    x, g = _inputs((3, 347), dtype, scale=4.0)                  # 1041 elements: a ragged last block and word
    x[0, :3] = torch.tensor([math.nan, 0.0, -0.0], dtype=dtype)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    y, packed = _forward(x, spec, save=True)
    dx = _backward(g, packed, spec)
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")
    y_ref, packed_ref = _forward(x, spec, save=True)
    assert torch.equal(packed, packed_ref), "codes must be bit-exact"
    assert same_bits(dx, _backward(g, packed_ref, spec)), "gradients must be bit-exact"
    assert torch.isnan(y[0, 0]) and y.dtype == dtype
    ref64 = FUNCTIONS[name].forward(x[:, 3:].double()) if name not in ("leaky_relu", "hardtanh", "relu6") \
        else y_ref[:, 3:].double()
    atol = 4 * torch.finfo(torch.float32).eps * max(1.0, ref64.abs().max().item()) if dtype == torch.float32 else 0.0
    assert_within_2x_of_torch(y[:, 3:], y_ref[:, 3:], ref64, atol=atol, what=f"{name} {dtype}")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    assert _forward(x, spec, save=False)[1] is None


def test_modules_and_from_module():
    from transformers.activations import ACT2FN

    assert from_module(nn.GELU(), 3).spec == resolve("gelu", 3)
    assert from_module(nn.GELU(approximate="tanh")).spec.name == "gelu_tanh"
    assert from_module(ACT2FN["gelu"]).spec.name == "gelu"
    assert from_module(ACT2FN["gelu_new"]).spec.name == "gelu_tanh"
    assert from_module(ACT2FN["gelu_pytorch_tanh"]).spec.name == "gelu_tanh"
    assert isinstance(from_module(ACT2FN["silu"], 4), FewBitSiLU) and from_module(nn.SiLU()).spec.bits == 2
    assert from_module(nn.LeakyReLU(0.3)).spec.levels == (0.3, 1.0)
    assert from_module(nn.ReLU6()).spec.borders == (0.0, 6.0)
    assert from_module(nn.Hardtanh(-3.0, 2.0)).spec.borders == (-3.0, 2.0)
    for module in (ACT2FN["quick_gelu"], nn.ELU(alpha=0.5), nn.Softplus(beta=2.0), nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="no few-bit replacement"):
            from_module(module)
    assert "bits=2" in repr(FewBitGELU())
    with pytest.raises(ValueError, match="allowed values: 1..4"):
        FewBitGELU(bits=5)
    with pytest.raises(ValueError, match="4 levels"):
        FewBitActivation("gelu", 2, table("gelu", 3))


def test_calibrate_solves_tables_for_the_inputs_each_activation_sees():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-1.5)                                  # pre-activations far from uniform on [-10, 10]
    batches = [torch.randn(32, 16) for _ in range(4)]
    tables = calibrate(model, batches, bits=2)
    assert set(tables) == {"1", "3"}                               # exact ReLU needs no table

    inputs = {}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
             for i in (1, 3)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for index, name in ((1, "gelu"), (3, "silu")):
        x = torch.cat(inputs[index]).reshape(-1).double()
        counts, edges = torch.histogram(x, bins=torch.linspace(-10, 10, 4001, dtype=torch.float64))
        data_error = l2_error(name, tables[str(index)], weight=(counts, edges))
        shipped_error = l2_error(name, table(name, 2), weight=(counts, edges))
        assert data_error < 0.8 * shipped_error, name
        module = from_module(model[index], 2, tables[str(index)])
        assert module.spec.borders == tuple(tables[str(index)].borders.tolist())


def test_calibrate_finds_hf_act2fn_modules():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, hidden_act="gelu_new")
    torch.manual_seed(0)
    model = BertModel(cfg)
    batches = [{"input_ids": torch.randint(0, 50, (4, 16))}]
    tables = calibrate(model, batches, bits=3)
    assert set(tables) == {"encoder.layer.0.intermediate.intermediate_act_fn", "pooler.activation"}  # + nn.Tanh
    t = tables["encoder.layer.0.intermediate.intermediate_act_fn"]
    assert t.borders.shape == (7,) and t.levels.shape == (8,)
    layer = model.encoder.layer[0].intermediate
    layer.intermediate_act_fn = from_module(layer.intermediate_act_fn, 3, t)
    assert layer.intermediate_act_fn.spec.name == "gelu_tanh"
    model(**batches[0]).last_hidden_state.sum().backward()

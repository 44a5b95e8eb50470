"""GeluLinear: F.linear(F.gelu(x)) exactly, keeping only the GELU input (same bytes as in-place GELU)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ALL_DTYPES, CHECKPOINT_MODES, assert_checkpoint_matches, assert_within_2x_of_torch
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import GeluLinear, InplaceGELU
from tempo_ds.ops import gelu_linear, inplace_gelu

GELU_LINEAR_BACKWARD = "GeneratedBackwardFor_tempo_ds_gelu_linear_fwd_defaultBackward"  # the custom op's grad_fn

FORMS = ["none", "tanh"]


def reference(x, weight, bias, form):
    return F.linear(F.gelu(x, approximate=form), weight, bias)


def _inputs(dtype, bias=True, shape=(3, 7, 13), out=11):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    w = (torch.randn(out, shape[-1], generator=gen) / math.sqrt(shape[-1])).to(dtype)
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    dout = torch.randn(*shape[:-1], out, generator=gen).to(dtype)
    return x, w, b, dout


def _grads(fn, x, w, b, dout, form):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, form)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_forward_is_linear_of_gelu_bit_for_bit(form, dtype):
    x, w, b, _ = _inputs(dtype)
    x.requires_grad_()
    assert torch.equal(gelu_linear(x, w, b, form), reference(x, w, b, form))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form, bias):
    x, w, b, _ = _inputs(torch.float64, bias, shape=(2, 3, 5), out=4)
    args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if bias else None]
    assert torch.autograd.gradcheck(lambda *a: gelu_linear(*a, approximate=form), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_gradients_within_2x_of_pytorch_error(form, dtype):
    x, w, b, dout = _inputs(dtype)
    _, ref = _grads(reference, x.double(), w.double(), b.double(), dout.double(), form)
    out_t, torch_grads = _grads(reference, x, w, b, dout, form)
    out_o, ours = _grads(gelu_linear, x, w, b, dout, form)
    assert torch.equal(out_o, out_t)
    for name, o, t, r in zip(["x", "weight", "bias"], ours, torch_grads, ref):
        assert o.dtype == t.dtype and o.shape == t.shape
        assert_within_2x_of_torch(o, t, r, what=f"d{name}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_saved_bytes_plain_vs_inplace_gelu_vs_gelu_linear(dtype):
    shape, elem = (4, 9, 24), torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    lin = nn.Linear(24, 10).to(dtype)
    fused = GeluLinear.from_linear(lin)
    x = torch.randn(shape).to(dtype).requires_grad_()
    cases = {"plain": (lambda t: lin(F.gelu(t)), 2 * n * elem),
             "inplace_gelu": (lambda t: lin(inplace_gelu(t)), n * elem + math.ceil(n / 8)),
             "gelu_linear": (fused, n * elem)}
    for name, (fn, expected) in cases.items():
        with SavedTensorMeter(fused) as meter:
            fn(x)
        assert meter.total_bytes == expected, name
    with SavedTensorMeter(fused) as meter:
        out = fused(x)
    (record,) = meter.saved
    assert (record.dtype, record.shape, record.op) == (dtype, shape, GELU_LINEAR_BACKWARD)
    assert out.grad_fn.name() == GELU_LINEAR_BACKWARD


def test_saves_x_for_the_weight_gradient_when_x_needs_none():
    x, w, b, dout = _inputs(torch.float32)
    w, b = nn.Parameter(w), nn.Parameter(b)
    with SavedTensorMeter() as meter:
        out = gelu_linear(x, w, b)
    assert meter.total_bytes == x.numel() * 4
    out.backward(dout)
    _, ref = _grads(reference, x, w.detach(), b.detach(), dout, "none")
    torch.testing.assert_close(w.grad, ref[1])
    torch.testing.assert_close(b.grad, ref[2])


def test_only_the_needed_gradients():
    x, w, b, dout = _inputs(torch.float32)
    x.requires_grad_()
    frozen = nn.Parameter(w, requires_grad=False)
    gelu_linear(x, frozen, b).backward(dout)
    assert frozen.grad is None and x.grad is not None
    with torch.no_grad(), SavedTensorMeter() as meter:
        out = gelu_linear(x, frozen, b)
    assert meter.total_bytes == 0 and out.grad_fn is None


def test_module_matches_nn_linear():
    torch.manual_seed(5)
    lin = nn.Linear(13, 6)
    torch.manual_seed(5)
    ours = GeluLinear(13, 6)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in lin.state_dict().items()]
    assert torch.equal(ours.weight, lin.weight) and torch.equal(ours.bias, lin.bias)  # same initialisation
    no_bias = GeluLinear(13, 6, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == list(nn.Linear(13, 6, bias=False).state_dict())
    assert repr(ours) == "GeluLinear(in_features=13, out_features=6, bias=True, approximate='none')"
    x = torch.randn(4, 13)
    assert torch.equal(ours(x), lin(F.gelu(x)))


def test_from_linear_reuses_the_parameter_objects():
    lin = nn.Linear(8, 5).eval()
    ours = GeluLinear.from_linear(lin, "tanh")
    assert ours.weight is lin.weight and ours.bias is lin.bias and not ours.training
    assert list(ours.state_dict()) == list(lin.state_dict()) and ours.approximate == "tanh"
    x = torch.randn(2, 8, requires_grad=True)
    ours(x).sum().backward()
    assert lin.weight.grad is not None
    no_bias = GeluLinear.from_linear(nn.Linear(8, 5, bias=False))
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_every_checkpoint_mode_gives_the_same_gradients(mode):
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(12, 20), GeluLinear(20, 12, approximate="tanh")

    def block(x):
        return fc2(fc1(x)) + x

    x = torch.randn(3, 5, 12, requires_grad=True)
    assert_checkpoint_matches(block, [x], mode)


def test_autocast_bf16_same_gradients_as_gelu_then_linear():
    torch.manual_seed(2)
    fc1, fc2 = nn.Linear(16, 48), nn.Linear(48, 8)
    fused = GeluLinear.from_linear(fc2)
    x = torch.randn(4, 6, 16)

    def run(model):
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.grad = None
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(fc1(xx))
        out.float().pow(2).sum().backward()
        return out, [xx.grad, fc1.weight.grad, fc2.weight.grad, fc2.bias.grad]

    out_ref, ref = run(lambda h: fc2(F.gelu(h)))
    out, ours = run(fused)
    assert out.dtype == out_ref.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    for r, o in zip(ref, ours):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


def test_empty_and_non_contiguous_inputs():
    lin = GeluLinear(6, 4)
    e = torch.empty(0, 6, requires_grad=True)
    out = lin(e)
    out.sum().backward()
    assert out.shape == (0, 4) and e.grad.shape == (0, 6) and torch.equal(lin.weight.grad, torch.zeros(4, 6))
    base = torch.randn(6, 10)
    x = base.t().requires_grad_()  # non-contiguous [10, 6]
    lin.weight.grad = None
    lin(x).sum().backward()
    xc = x.detach().contiguous().requires_grad_()
    w, b = lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    reference(xc, w, b, "none").sum().backward()
    torch.testing.assert_close(x.grad, xc.grad)
    torch.testing.assert_close(lin.weight.grad, w.grad)


def test_nan_and_inf_propagate():
    lin = GeluLinear(4, 3)
    x = torch.tensor([[1.0, float("nan"), -0.5, 2.0], [0.3, -1.0, float("inf"), 0.1], [0.2, 0.4, -0.7, 1.1]],
                     requires_grad=True)
    out = lin(x)
    out.sum().backward()
    assert out[0].isnan().all() and out[2].isfinite().all()
    assert x.grad[0, 1].isnan() and x.grad[1, 2].isnan() and x.grad[2].isfinite().all()
    assert lin.weight.grad.isnan().any()  # DeepSpeed's overflow check sees it


def test_bad_approximate_names_the_allowed_values():
    for call in (lambda: gelu_linear(torch.randn(2, 3), torch.randn(4, 3), None, "erf"),
                 lambda: GeluLinear(3, 4, approximate="exact")):
        with pytest.raises(ValueError, match="allowed values: 'none', 'tanh'"):
            call()


def test_zero3_partitioned_weights_are_gathered_in_backward(zero3_gather):
    """A weight that ZeRO-3 partitioned away between forward and backward is gathered for the backward."""
    lin = GeluLinear(5, 3)
    x = torch.randn(2, 5, requires_grad=True)
    out = lin(x)
    zero3_gather.partition(lin.weight, lin.bias)
    out.sum().backward()
    assert zero3_gather.gathered == [[lin.weight, lin.bias]] and lin.weight.grad is not None


def test_inplace_gelu_module_then_linear_equals_gelu_linear_in_value():
    torch.manual_seed(3)
    lin = nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert torch.equal(lin(InplaceGELU()(x)), GeluLinear.from_linear(lin)(x))


def test_from_conv1d_keeps_the_weight_layout_and_matches_gpt2s_mlp():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 20)                       # nf=12 outputs, nx=20 inputs, weight [20, 12]
    fused = GeluLinear.from_linear(conv, "tanh")
    assert fused.weight is conv.weight and fused.bias is conv.bias and fused.transposed
    x = torch.randn(3, 5, 20, dtype=torch.float64, requires_grad=True)
    conv.double()
    torch.testing.assert_close(fused(x), conv(F.gelu(x, approximate="tanh")), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x, w, b: gelu_linear(x, w, b, "tanh", transposed=True),
                                    (x, conv.weight, conv.bias))
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        GeluLinear.from_linear(nn.Bilinear(2, 2, 2))

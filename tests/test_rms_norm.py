"""In-place RMSNorm against HuggingFace's own LlamaRMSNorm (and torch.nn.RMSNorm), from the output."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

from helpers import CHECKPOINT_MODES, assert_autocast_within_2x, assert_checkpoint_matches, assert_within_2x_of_torch
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import InplaceRMSNorm
from tempo_ds.ops import inplace_rms_norm
from tempo_ds.ops import rms_norm as ops_rms_norm
from tempo_ds.ops.layer_norm import side_columns

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (input dtype, weight dtype): HF models run with matching dtypes, or a float32 weight under mixed precision
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, F32)]


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    """Tests run the PyTorch path whatever the environment, unless they ask for ``layer_norm_kernel``."""
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")


def _inputs(lead, n, x_dtype, w_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=gen, dtype=torch.float64) * 2 + 0.5).to(x_dtype)
    w = ((torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
         * torch.randn(n, generator=gen).sign()).to(w_dtype)
    g = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    return x, w, g


def _reference(x, w, eps=1e-6):
    """The RMSNorm maths in the dtype of ``x`` (HF's module itself computes in float32 even for float64)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _hf(weight, eps=1e-6):
    module = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _forward_backward(fn, x, w, g):
    """Output and gradients (x, then weight if any) of ``fn(x, w)``; the cotangent in the output dtype."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w)]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _hf_forward_backward(x, w, g, eps=1e-6):
    module = _hf(w, eps)
    xx = x.detach().clone().requires_grad_()
    y = module(xx)
    y.backward(g.to(y.dtype))
    return [y.detach(), xx.grad, module.weight.grad]


def _saved(fn, *args, model=None):
    with SavedTensorMeter(model) as meter:
        out = fn(*args)
    return meter, out


# -- exactness -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("casting", ["llama", "torch"])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("fallback", [False, True])
def test_gradcheck_float64(casting, with_weight, fallback):
    x, w, _ = _inputs((3,), 9, torch.float64, torch.float64)
    if fallback:
        w[3] = 0.0
    leaves = [x.requires_grad_()] + ([w.requires_grad_()] if with_weight else [])
    assert torch.autograd.gradcheck(lambda x, *w: inplace_rms_norm(x, *w, casting=casting), leaves)


@pytest.mark.parametrize("x_dtype, w_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("lead", [(13,), (2, 5), (1024,)])  # many rows: the weight gradient's row sum
def test_matches_hf_llama_rms_norm(x_dtype, w_dtype, lead):
    """Forward bit for bit (dtype included); gradients within 2x of HF's own error against float64."""
    x, w, g = _inputs(lead, 37, x_dtype, w_dtype)
    ref = _forward_backward(_reference, x.double(), w.double(), g)
    theirs = _hf_forward_backward(x, w, g)
    ours = _forward_backward(inplace_rms_norm, x, w, g)
    assert ours[0].dtype == theirs[0].dtype == torch.promote_types(x_dtype, w_dtype)
    assert torch.equal(ours[0], theirs[0])
    for name, o, t, r in zip(["dx", "dw"], ours[1:], theirs[1:], ref[1:]):
        assert o.dtype == t.dtype
        assert_within_2x_of_torch(o, t, r, what=f"{name} {x_dtype} {w_dtype}")


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_torch_casting_matches_functional_rms_norm(x_dtype, w_dtype, eps):
    """``torch.nn.functional.rms_norm`` rounds once and differentiates from ``x``: there the weight gradient
    of any op that keeps a rounded output errs by up to one more unit roundoff ``u`` of its size."""
    x, w, g = _inputs((13,), 37, x_dtype, w_dtype)
    ref = _forward_backward(lambda x, w: _reference(x, w, eps or torch.finfo(x_dtype).eps), x.double(), w.double(), g)
    theirs = _forward_backward(lambda x, w: F.rms_norm(x, (37,), w, eps), x, w, g)
    ours = _forward_backward(lambda x, w: inplace_rms_norm(x, w, eps, casting="torch"), x, w, g)
    u = torch.finfo(x_dtype).eps / 2
    for name, o, t, r, atol in zip(["y", "dx", "dw"], ours, theirs, ref, [0, 0, u * ref[2].abs().max().item()]):
        assert o.dtype == t.dtype
        assert_within_2x_of_torch(o, t, r, atol=atol, what=f"{name} {x_dtype} {w_dtype}")


def test_eps_is_used():
    x, w, g = _inputs((6,), 8, torch.float64, torch.float64)
    x = x * 1e-3
    for eps in (1e-6, 1e-2):
        ours = _forward_backward(lambda x, w: inplace_rms_norm(x, w, eps), x, w, g)
        for o, r in zip(ours, _forward_backward(lambda x, w: _reference(x, w, eps), x, w, g)):
            torch.testing.assert_close(o, r)


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
@pytest.mark.parametrize("case", ["zero", "tiny", "huge"])
def test_bad_columns_come_from_the_side_buffer_and_give_hf_gradients(x_dtype, w_dtype, case):
    rows, n = 13, 37
    x, w, g = _inputs((rows,), n, x_dtype, w_dtype)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    w[5] = {"zero": 0.0, "tiny": torch.finfo(out_dtype).tiny / 4, "huge": torch.finfo(out_dtype).max / 4}[case]
    meter, _ = _saved(inplace_rms_norm, x.clone().requires_grad_(), nn.Parameter(w))
    # y, rstd (float32) and the side buffer (xhat of K columns in x's dtype, their int64 indices)
    k = side_columns(n, True)
    y_size = torch.empty((), dtype=out_dtype).element_size()
    assert meter.total_bytes == rows * n * y_size + rows * 4 + rows * k * x.element_size() + 8 * k
    ref = _forward_backward(_reference, x.double(), w.double(), g)
    theirs = _hf_forward_backward(x, w, g)
    ours = _forward_backward(inplace_rms_norm, x, w, g)
    assert torch.equal(ours[0], theirs[0])
    for name, o, t, r in zip(["dx", "dw"], ours[1:], theirs[1:], ref[1:]):
        finite = torch.isfinite(t)  # a huge weight may overflow HF's own gradients; ours is finite there too
        assert torch.isfinite(o[finite]).all(), name
        assert_within_2x_of_torch(o[finite], t[finite], r[finite], what=f"{name} {case}")


def test_rebuilding_from_the_output_with_a_zero_weight_is_what_goes_wrong(monkeypatch):
    x, w, g = _inputs((4,), 9, F32, F32)
    w[0] = 0.0
    x.requires_grad_()
    (dx,) = torch.autograd.grad(inplace_rms_norm(x, w), x, g.float())
    assert torch.isfinite(dx).all()
    monkeypatch.setattr(ops_rms_norm, "side_columns", lambda n, affine: 0)  # no side buffer
    (dx,) = torch.autograd.grad(inplace_rms_norm(x, w), x, g.float())
    assert torch.isnan(dx).all()


@pytest.mark.parametrize("x_dtype, w_dtype", [(BF16, BF16), (F16, F16), (BF16, F32)])
def test_up_to_k_zero_weights_are_exact_and_keep_input_covers_any_weight(x_dtype, w_dtype):
    """K = 8 zero or subnormal weights: HF's gradients (within 2x vs float64) from the side buffer, with the same
    saved shapes as a good weight. An all-zero weight needs ``keep_input=True`` (x and rstd, HF-exact); without
    it its gradients are NaN, never silently wrong."""
    rows, n = 64, 40
    x, w, g = _inputs((rows,), n, x_dtype, w_dtype)
    bad = w.clone()
    bad[[0, 5, 9, 13, 21, 30, 38]] = 0.0
    bad[17] = torch.finfo(w_dtype).tiny / 8
    assert side_columns(n, True) == 8

    def layout(weight, **kw):
        meter, _ = _saved(lambda a, b: inplace_rms_norm(a, b, **kw), x.clone().requires_grad_(), nn.Parameter(weight))
        return sorted((str(r.dtype), r.shape) for r in meter.saved), meter.total_bytes

    assert layout(bad) == layout(w)
    zero = torch.zeros_like(w)
    assert layout(zero, keep_input=True)[1] == rows * n * x.element_size() + rows * 4
    for weight, kw in ((bad, {}), (zero, {"keep_input": True})):
        ref = _forward_backward(_reference, x.double(), weight.double(), g)
        theirs = _hf_forward_backward(x, weight, g)
        ours = _forward_backward(lambda a, b: inplace_rms_norm(a, b, **kw), x, weight, g)
        assert torch.equal(ours[0], theirs[0])
        for name, o, t, r in zip(["dx", "dw"], ours[1:], theirs[1:], ref[1:]):
            assert torch.isfinite(o).all(), name
            assert_within_2x_of_torch(o, t, r, what=f"{name} {kw}")
    assert torch.isnan(_forward_backward(inplace_rms_norm, x, zero, g)[1]).all()


def test_non_contiguous_and_empty_input():
    x, w, g = _inputs((37,), 13, F32, F32)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    for o, r in zip(_forward_backward(inplace_rms_norm, xt, w, g), _hf_forward_backward(xt, w, g)):
        torch.testing.assert_close(o, r)
    ours = _forward_backward(inplace_rms_norm, x[:0], w, g[:0])
    assert ours[0].shape == (0, 13) and torch.equal(ours[2], torch.zeros(13))


def test_bad_arguments_are_refused():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="casting"):
        inplace_rms_norm(x, torch.ones(4), casting="gemma")
    with pytest.raises(ValueError, match="last dimension"):
        inplace_rms_norm(x, torch.ones(2, 2))


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (F16, F16), (BF16, F32)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_and_deepspeed_sees_the_overflow(x_dtype, w_dtype, bad):
    from deepspeed.runtime.utils import CheckOverflow

    x, w, g = _inputs((5,), 11, x_dtype, w_dtype)
    w = nn.Parameter(w)
    x.requires_grad_()
    y = inplace_rms_norm(x, w)
    y.backward(g.to(y.dtype))
    assert not CheckOverflow().has_overflow_serial([w])
    x.grad = w.grad = None
    x.data[2, 4] = bad
    y = inplace_rms_norm(x, w)
    y.backward(g.to(y.dtype))
    assert torch.isnan(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3, 4]]).all()
    assert torch.isnan(w.grad).any()
    assert CheckOverflow().has_overflow_serial([w])


# -- checkpointing, no_grad, autocast ------------------------------------------------------------------

@pytest.mark.parametrize("fallback", [False, True])
def test_every_checkpoint_mode_gives_identical_gradients(fallback):
    x, w, _ = _inputs((3, 4), 10, F32, F32)
    if fallback:
        w[1] = 0.0
    inputs = [x.requires_grad_(), w.requires_grad_()]

    def fn(x, w):
        return inplace_rms_norm(x * 1.5, w) * 2.0

    for mode in CHECKPOINT_MODES[1:]:
        assert_checkpoint_matches(fn, inputs, mode)


def test_no_grad_saves_nothing_and_gives_the_same_output():
    x, w, _ = _inputs((4, 3), 10, BF16, BF16)
    w[0] = 0.0
    with torch.no_grad():
        meter, y0 = _saved(inplace_rms_norm, x, w)
    assert meter.total_bytes == 0 and y0.grad_fn is None
    assert torch.equal(y0, inplace_rms_norm(x, w.requires_grad_()))


def _block(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), norm(16), nn.Linear(16, 8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model


def test_cpu_autocast_bf16():
    assert_autocast_within_2x(_block(InplaceRMSNorm), _block(LlamaRMSNorm), _block(LlamaRMSNorm).double(), torch.randn(6, 5, 12))


@pytest.mark.parametrize("mode", ["torch_reentrant", "torch_non_reentrant", "deepspeed", "no_grad_recompute"])
def test_checkpoint_under_autocast_recomputes_the_same(mode):
    model = _block(InplaceRMSNorm)
    x = torch.randn(6, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_checkpoint_matches(model, [x], mode)


# -- memory --------------------------------------------------------------------------------------------

def test_saves_output_and_rstd_only_and_the_next_linear_shares_the_output():
    s, b, h = 16, 3, 40
    x = torch.randn(s, b, h, dtype=BF16, requires_grad=True)
    norm = InplaceRMSNorm(h).to(BF16)
    meter, _ = _saved(norm, x, model=norm)
    side = s * b * 8 * 2 + 8 * 8  # K = 8 columns of xhat (bfloat16) and their int64 indices
    assert side_columns(h, True) == 8 and meter.total_bytes == s * b * h * 2 + s * b * 4 + side
    ours = nn.Sequential(InplaceRMSNorm(h), nn.Linear(h, h)).to(BF16)
    hf = nn.Sequential(LlamaRMSNorm(h), nn.Linear(h, h)).to(BF16)
    linear_alone, _ = _saved(hf[1], x, model=hf[1])
    ours_meter, _ = _saved(ours, x, model=ours)
    hf_meter, _ = _saved(hf, x, model=hf)
    assert linear_alone.total_bytes == s * b * h * 2
    assert ours_meter.total_bytes == linear_alone.total_bytes + s * b * 4 + side
    # HF: the float32 copy of x, rstd, the bfloat16 x*rstd, and the Linear's input (the output)
    assert hf_meter.total_bytes == s * b * h * 4 + s * b * 4 + s * b * h * 2 + s * b * h * 2


# -- module --------------------------------------------------------------------------------------------

def test_module_is_a_drop_in_for_llama_rms_norm():
    hf = _hf(torch.rand(24) + 0.5, eps=1e-5).to(BF16)
    ours = InplaceRMSNorm(24, eps=1e-5).to(BF16)
    ours.load_state_dict(hf.state_dict())
    assert list(ours.state_dict()) == ["weight"] and ours.variance_epsilon == 1e-5
    x = torch.randn(3, 5, 24, dtype=BF16)
    assert torch.equal(ours(x), hf(x))
    ours.variance_epsilon = 1e-3
    assert ours.eps == 1e-3


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm])
def test_from_module_takes_llama_rms_norm_and_its_copies(cls):
    hf = cls(24, eps=1e-5)
    hf.eval()
    ours = InplaceRMSNorm.from_module(hf)
    assert ours.weight is hf.weight and (ours.eps, ours.casting, ours.training) == (1e-5, "llama", False)
    x = torch.randn(3, 24, dtype=BF16)
    assert torch.equal(ours(x), hf(x))


def test_from_module_takes_torch_rms_norm_with_its_rounding():
    for dtype in (F32, BF16):
        torch_norm = nn.RMSNorm(24).to(dtype)
        ours = InplaceRMSNorm.from_module(torch_norm)
        assert ours.weight is torch_norm.weight and (ours.eps, ours.casting) == (None, "torch")
        x = torch.randn(3, 24, dtype=dtype)
        torch.testing.assert_close(ours(x), torch_norm(x))
    no_weight = InplaceRMSNorm.from_module(nn.RMSNorm(24, eps=1e-4, elementwise_affine=False))
    assert no_weight.weight is None
    torch.testing.assert_close(no_weight(x), F.rms_norm(x, (24,), eps=1e-4))


@pytest.mark.parametrize("module", [GemmaRMSNorm(8), T5LayerNorm(8), nn.RMSNorm((2, 4)), nn.LayerNorm(8)])
def test_from_module_refuses_what_computes_something_else(module):
    with pytest.raises(TypeError):
        InplaceRMSNorm.from_module(module)


# -- Triton kernel (interpreter) -----------------------------------------------------------------------



@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
@pytest.mark.parametrize("casting", ["llama", "torch"])
@pytest.mark.parametrize("variant", ["weight", "no_weight", "fallback"])
def test_triton_kernel_matches_the_pytorch_path(layer_norm_kernel, x_dtype, w_dtype, casting, variant):
    x, w, g = _inputs((2, 3), 37, x_dtype, w_dtype)
    if variant == "fallback":
        w[4] = 0.0
    weight = None if variant == "no_weight" else w

    def fn(x, w):
        return inplace_rms_norm(x, w, casting=casting)

    kernel = _forward_backward(fn, x, weight, g)
    assert layer_norm_kernel.calls == ["norm_forward", "norm_backward"]
    layer_norm_kernel.env.setenv("TEMPO_DS_TRITON", "0")
    torch_path = _forward_backward(fn, x, weight, g)
    for k, t in zip(kernel, torch_path):
        assert k.dtype == t.dtype and k.shape == t.shape
        # one ulp of the 16-bit dtype: the kernel sums and takes rsqrt in another order, which can flip a
        # rounding, and the interpreter rounds float32 -> bfloat16 towards zero
        low = [d for d in (x_dtype, k.dtype) if d in (BF16, F16)]
        tol = max(torch.finfo(d).eps for d in low) if low else 1e-5
        torch.testing.assert_close(k.float(), t.float(), rtol=tol, atol=tol * t.float().abs().max().item())


def test_triton_kernel_saves_output_and_rstd(layer_norm_kernel):
    x, w, _ = _inputs((3, 2), 20, BF16, BF16)
    meter, _ = _saved(inplace_rms_norm, x.requires_grad_(), nn.Parameter(w))
    assert meter.total_bytes == 6 * 20 * 2 + 6 * 4 + 6 * 8 * 2 + 8 * 8  # y, rstd, side buffer (K = 8)
    assert layer_norm_kernel.calls == ["norm_forward"]


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
def test_triton_kernel_writes_the_side_buffer_and_patches_zero_weights_itself(layer_norm_kernel, x_dtype, w_dtype):
    """N = 200 (BLOCK_N 256, K = 8) with 5 zero and 3 subnormal weights: the forward kernel writes HF's rounded
    xhat of the ranked columns, and the fused backward, starting from ``y`` itself, patches them: the PyTorch
    path's gradients, all finite."""
    rows, n = 6, 200
    x, w, g = _inputs((rows,), n, x_dtype, w_dtype, seed=3)
    w[[0, 31, 77, 150, 199]] = 0.0
    w[[10, 90, 180]] = torch.finfo(w_dtype).tiny / 8
    fwd = torch.ops.tempo_ds.inplace_rms_norm_fwd
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    y, _, side, idx = fwd(x, w, 1e-6, "llama", out_dtype, "output")
    seen, inner = [], layer_norm_kernel.module.norm_backward

    def spy(grad, src, *args, **kwargs):
        seen.append((kwargs["from_output"], kwargs["side"] is not None))
        return inner(grad, src, *args, **kwargs)

    layer_norm_kernel.env.setattr(layer_norm_kernel.module, "norm_backward", spy)
    kernel = _forward_backward(lambda x, w: inplace_rms_norm(x, w), x, w, g)
    assert seen == [(True, True)]
    layer_norm_kernel.env.setenv("TEMPO_DS_TRITON", "0")
    _, _, side_t, idx_t = fwd(x, w, 1e-6, "llama", out_dtype, "output")
    torch_path = _forward_backward(lambda x, w: inplace_rms_norm(x, w), x, w, g)
    assert sorted(idx.tolist()) == sorted(idx_t.tolist()) == [0, 10, 31, 77, 90, 150, 180, 199]
    side_tol = torch.finfo(x_dtype).eps if x_dtype != F32 else 1e-5  # float32: the statistics' sum order
    torch.testing.assert_close(side.float(), side_t.float(), rtol=side_tol, atol=0)
    for k, t in zip(kernel, torch_path):
        assert torch.isfinite(k).all()
        low = [d for d in (x_dtype, k.dtype) if d in (BF16, F16)]
        tol = max(torch.finfo(d).eps for d in low) if low else 1e-5
        torch.testing.assert_close(k.float(), t.float(), rtol=tol, atol=tol * t.float().abs().max().item())

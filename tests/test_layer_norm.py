"""In-place LayerNorm: PyTorch's results from the output instead of the input, for any weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (ALL_DTYPES, CHECKPOINT_MODES, assert_autocast_within_2x, assert_checkpoint_matches,
                     assert_within_2x_of_torch)
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import InplaceLayerNorm
from tempo_ds.ops import inplace_layer_norm
from tempo_ds.ops import layer_norm as ops_layer_norm
from tempo_ds.ops.layer_norm import output_is_invertible, side_columns

AFFINE = ["weight_and_bias", "weight_only", "bias_only", "none"]


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    """Tests run the PyTorch path whatever the environment, unless they ask for ``layer_norm_kernel``."""
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")


def _params(shape, dtype, affine, gen):
    """Weights in +-[0.5, 1.5] and biases in [-0.5, 0.5]: |b| <= |w|, so the output is kept."""
    w = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) * torch.randn(shape, generator=gen).sign()
    b = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
    w = w.to(dtype) if affine in ("weight_and_bias", "weight_only") else None
    b = b.to(dtype) if affine in ("weight_and_bias", "bias_only") else None
    return w, b


def _inputs(lead, shape, dtype, affine="weight_and_bias", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, *shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    w, b = _params(shape, dtype, affine, gen)
    g = torch.randn(*lead, *shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, g


def _forward_backward(fn, x, shape, w, b, g, dtype=None):
    """Output and gradients (x, then weight and bias when present) of ``fn``, inputs cast to ``dtype``."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b)]
    y = fn(leaves[0], shape, leaves[1], leaves[2])
    y.backward(g.to(dtype or g.dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _saved(fn, *args, model=None):
    with SavedTensorMeter(model) as meter:
        out = fn(*args)
    return meter, out


def _side_bytes(rows, n, element_size):
    """The side buffer: xhat of K columns per row (x's dtype) and their int64 indices."""
    k = side_columns(n, True)
    return rows * k * element_size + 8 * k


# -- exactness -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", [(7,), (3, 4)])
def test_gradcheck_float64(affine, shape):
    x, w, b, _ = _inputs((3,), shape, torch.float64, affine)
    assert output_is_invertible(w, b, torch.float64, 7)  # the output is what backward starts from
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        it = iter(args)
        return inplace_layer_norm(next(it), shape, next(it) if w is not None else None,
                                  next(it) if b is not None else None)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("case", ["zero", "tiny_next_to_bias"])
def test_gradcheck_float64_fallback(case):
    x, w, b, _ = _inputs((5,), (7,), torch.float64)
    w[2] = 0.0 if case == "zero" else 1e-3
    assert not output_is_invertible(w, b, torch.float64, 7)
    assert torch.autograd.gradcheck(lambda *a: inplace_layer_norm(a[0], 7, *a[1:]),
                                    [t.requires_grad_() for t in (x, w, b)])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("lead, shape", [((13,), (37,)), ((2, 3), (5, 7)), ((1024,), (16,))])
def test_within_2x_of_torch_against_float64(dtype, affine, lead, shape):
    x, w, b, g = _inputs(lead, shape, dtype, affine)
    ref = _forward_backward(F.layer_norm, x, shape, w, b, g, torch.float64)
    theirs = _forward_backward(F.layer_norm, x, shape, w, b, g)
    ours = _forward_backward(inplace_layer_norm, x, shape, w, b, g)
    for name, o, t, r in zip(["y", "dx", "dw/db", "db"], ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape
        assert_within_2x_of_torch(o, t, r, what=f"{name} {dtype} {affine}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", ["zero", "tiny", "small_next_to_bias", "huge"])
def test_bad_columns_come_from_the_side_buffer_and_give_torch_gradients(dtype, case):
    """Tempo's flaw: a zero weight makes every gradient of the row NaN. Ours keeps that column's xhat."""
    rows, n = 13, 37
    x, w, b, g = _inputs((rows,), (n,), dtype)
    w[5] = {"zero": 0.0, "tiny": torch.finfo(dtype).tiny / 4, "small_next_to_bias": 0.05,
            "huge": torch.finfo(dtype).max / 4}[case]
    if case == "small_next_to_bias":
        b[5] = 0.25
    assert not output_is_invertible(w, b, dtype, n)
    meter, _ = _saved(inplace_layer_norm, x.requires_grad_(), n, nn.Parameter(w), nn.Parameter(b))
    # y, rstd (float32) and the side buffer, whatever the weight
    assert meter.total_bytes == rows * n * x.element_size() + rows * 4 + _side_bytes(rows, n, x.element_size())
    x.requires_grad_(False)
    ref = _forward_backward(F.layer_norm, x, (n,), w, b, g, torch.float64)
    theirs = _forward_backward(F.layer_norm, x, (n,), w, b, g)
    ours = _forward_backward(inplace_layer_norm, x, (n,), w, b, g)
    for name, o, t, r in zip(["y", "dx", "dw", "db"], ours, theirs, ref):
        # a huge weight may overflow dx (PyTorch's, and ours in float16); ours is finite wherever PyTorch's is
        finite = torch.isfinite(t)
        assert torch.isfinite(o[finite]).all(), name
        assert_within_2x_of_torch(o[finite], t[finite], r[finite], what=f"{name} {case}")


def test_rebuilding_from_the_output_with_a_zero_weight_is_what_goes_wrong(monkeypatch):
    """The side buffer is needed: without it (K = 0), a zero weight makes the row's gradients NaN."""
    x, w, b, g = _inputs((4,), (9,), torch.float32)
    w[0] = 0.0
    x.requires_grad_()
    (dx,) = torch.autograd.grad(inplace_layer_norm(x, 9, w, b), x, g)
    assert torch.isfinite(dx).all()
    monkeypatch.setattr(ops_layer_norm, "side_columns", lambda n, affine: 0)
    (dx,) = torch.autograd.grad(inplace_layer_norm(x, 9, w, b), x, g)
    assert torch.isnan(dx).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_up_to_k_bad_columns_are_exact_and_the_saved_set_does_not_depend_on_them(dtype):
    """K = 8 bad columns at once (zeros, a subnormal, |b| > |w|, a NaN-free mix), 16-bit: within 2x of PyTorch's
    error for every gradient; the saved tensors' shapes and dtypes are those of a good weight (rule 9)."""
    rows, n = 64, 40
    x, w, b, g = _inputs((rows,), (n,), dtype)
    bad = w.clone()
    bad[[0, 3, 7]] = 0.0
    bad[11] = torch.finfo(dtype).tiny / 8
    bad[[15, 20, 33, 39]] = 0.02  # next to biases up to 0.5
    b[[15, 20, 33, 39]] = torch.tensor([0.5, -0.4, 0.3, -0.25], dtype=dtype)
    assert side_columns(n, True) == 8 and int((~torch.isclose(bad, w)).sum()) == 8

    def layout(weight):
        meter, _ = _saved(inplace_layer_norm, x.detach().requires_grad_(), n, nn.Parameter(weight), nn.Parameter(b))
        return sorted((str(r.dtype), r.shape) for r in meter.saved), meter.total_bytes

    assert layout(bad) == layout(w)
    ref = _forward_backward(F.layer_norm, x, (n,), bad, b, g, torch.float64)
    theirs = _forward_backward(F.layer_norm, x, (n,), bad, b, g)
    ours = _forward_backward(inplace_layer_norm, x, (n,), bad, b, g)
    for name, o, t, r in zip(["y", "dx", "dw", "db"], ours, theirs, ref):
        assert torch.isfinite(o).all(), name
        assert_within_2x_of_torch(o, t, r, what=f"{name} {dtype}")


def test_beyond_k_bad_columns_the_error_is_bounded_by_the_kth_score():
    """12 columns with |b|/|w| = 2..13 and K = 8: the 8 worst come from the side buffer; the others' xhat errs
    by at most u*(|xhat| + s_(K+1)), s_(K+1) = 5 here, so dw_j errs by at most sum_rows |g| u (|xhat| + 5)."""
    rows, n, dtype = 256, 40, torch.bfloat16
    x, w, b, g = _inputs((rows,), (n,), dtype)
    cols = torch.arange(12) * 3
    w[cols] = 0.1
    b[cols] = (0.1 * torch.arange(2, 14, dtype=torch.float64)).to(dtype)
    ref = _forward_backward(F.layer_norm, x, (n,), w, b, g, torch.float64)
    ours = _forward_backward(inplace_layer_norm, x, (n,), w, b, g)
    u = torch.finfo(dtype).eps / 2
    xhat = (ref[0] - b.double()) / w.double()
    bound = (g.double().abs() * u * (xhat.abs() + 5.2)).sum(0)  # 5.2: the 9th ratio, b and w rounded to bf16
    err = (ours[2].double() - ref[2]).abs()
    slack = 2 * u * ref[2].abs()  # dw's own rounding to bf16
    assert (err <= bound + slack).all()
    worst = cols[-8:]  # ratios 6..13: patched, as exact as any good column
    assert (err[worst] <= slack[worst] + (g.double().abs() * u * xhat.abs()).sum(0)[worst]).all()


def test_keep_input_saves_pytorchs_set_and_is_exact_for_a_zero_weight():
    """A weight initialised to zero leaves every column bad: ``keep_input=True`` keeps x, mean and rstd."""
    rows, n = 13, 37
    x, _, b, g = _inputs((rows,), (n,), torch.bfloat16)
    w = torch.zeros(n, dtype=torch.bfloat16)
    meter, _ = _saved(lambda *a: inplace_layer_norm(*a, keep_input=True), x.requires_grad_(), n, nn.Parameter(w),
                      nn.Parameter(b))
    assert meter.total_bytes == rows * n * 2 + 2 * rows * 4  # x, mean and rstd (float32)
    x = x.detach()
    ref = _forward_backward(F.layer_norm, x, (n,), w, b, g, torch.float64)
    theirs = _forward_backward(F.layer_norm, x, (n,), w, b, g)
    ours = _forward_backward(lambda *a: inplace_layer_norm(*a, keep_input=True), x, (n,), w, b, g)
    for name, o, t, r in zip(["y", "dx", "dw", "db"], ours, theirs, ref):
        assert_within_2x_of_torch(o, t, r, what=name)
    # without it, more zero weights than K make the rows' gradients NaN: loud, never silently wrong
    assert torch.isnan(_forward_backward(inplace_layer_norm, x, (n,), w, b, g)[1]).all()


def test_invertibility_rule():
    f32 = torch.float32
    ones = torch.ones(4)
    assert output_is_invertible(None, None, torch.float16, 4)
    assert output_is_invertible(ones, None, f32, 4)
    assert output_is_invertible(ones, ones, f32, 4)  # |b| = |w| is allowed
    assert output_is_invertible(-ones, -ones, f32, 4)  # signs do not matter
    assert not output_is_invertible(ones, ones * 1.01, f32, 4)
    assert output_is_invertible(ones * 1e-30, None, f32, 4)  # any normal weight divides out without bias
    assert not output_is_invertible(ones * 1e-30, None, torch.float16, 4)  # subnormal in float16
    assert not output_is_invertible(torch.tensor([1.0, 0.0]), None, f32, 2)
    assert not output_is_invertible(torch.tensor([1.0, float("nan")]), None, f32, 2)
    assert output_is_invertible(ones * 30000, None, torch.float16, 4)  # 30000 * sqrt(4) < 65504
    assert not output_is_invertible(ones * 40000, None, torch.float16, 4)


def test_eps_is_used():
    x, w, b, g = _inputs((6,), (8,), torch.float64)
    x = x * 1e-3  # variance ~4e-6: eps matters
    for eps in (1e-5, 1e-2):
        ours = _forward_backward(lambda *a: inplace_layer_norm(*a, eps=eps), x, (8,), w, b, g)
        ref = _forward_backward(lambda *a: F.layer_norm(*a, eps=eps), x, (8,), w, b, g)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r)


def test_non_contiguous_input():
    x, w, b, g = _inputs((37,), (13,), torch.float32)
    xt = x.t().contiguous().t()  # [37, 13] view with strides (1, 37)
    assert not xt.is_contiguous()
    ours = _forward_backward(inplace_layer_norm, xt, (13,), w, b, g)
    ref = _forward_backward(F.layer_norm, xt, (13,), w, b, g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("affine", ["weight_and_bias", "none"])
def test_empty_input(affine):
    x, w, b, g = _inputs((0, 3), (5,), torch.float32, affine)
    ours = _forward_backward(inplace_layer_norm, x, (5,), w, b, g)
    assert ours[0].shape == (0, 3, 5) and ours[1].shape == (0, 3, 5)
    for grad in ours[2:]:
        assert torch.equal(grad, torch.zeros(5))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_and_deepspeed_sees_the_overflow(dtype, bad):
    from deepspeed.runtime.utils import CheckOverflow

    x, w, b, g = _inputs((5,), (11,), dtype)
    w, b = nn.Parameter(w), nn.Parameter(b)
    x = x.requires_grad_()
    inplace_layer_norm(x, 11, w, b).backward(g)
    assert not CheckOverflow().has_overflow_serial([w, b])
    x.grad = w.grad = b.grad = None
    x.data[2, 4] = bad
    y = inplace_layer_norm(x, 11, w, b)
    y.backward(g)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3, 4]]).all()
    assert torch.isnan(w.grad).all() and torch.isfinite(b.grad).all()  # db = sum(g) does not see x
    assert CheckOverflow().has_overflow_serial([w, b])


# -- checkpointing, no_grad, autocast ------------------------------------------------------------------

@pytest.mark.parametrize("fallback", [False, True])
def test_every_checkpoint_mode_gives_identical_gradients(fallback):
    x, w, b, _ = _inputs((3, 4), (10,), torch.float32)
    if fallback:
        w[1] = 0.0
    inputs = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]

    def fn(x, w, b):
        return inplace_layer_norm(x * 1.5, 10, w, b) * 2.0

    for mode in CHECKPOINT_MODES[1:]:
        assert_checkpoint_matches(fn, inputs, mode)


def test_no_grad_saves_nothing_and_gives_the_same_output():
    x, w, b, _ = _inputs((4, 3), (10,), torch.bfloat16)
    w[0] = 0.0  # not even the invertibility check runs without grad
    with torch.no_grad():
        meter, y0 = _saved(inplace_layer_norm, x, 10, w, b)
    assert meter.total_bytes == 0 and y0.grad_fn is None
    assert torch.equal(y0, inplace_layer_norm(x, 10, w.requires_grad_(), b))


def _mlp(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), norm(16), nn.Linear(16, 8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def test_cpu_autocast_bf16():
    assert_autocast_within_2x(_mlp(InplaceLayerNorm), _mlp(nn.LayerNorm), _mlp(nn.LayerNorm).double(), torch.randn(6, 5, 12))


@pytest.mark.parametrize("mode", ["torch_reentrant", "torch_non_reentrant", "deepspeed", "no_grad_recompute"])
def test_checkpoint_under_autocast_recomputes_the_same(mode):
    model = _mlp(InplaceLayerNorm)
    x = torch.randn(6, 12, requires_grad=True)

    def fn(x, *params):
        return model(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = assert_checkpoint_matches(fn, [x], mode)
    assert out.dtype == torch.bfloat16


# -- memory --------------------------------------------------------------------------------------------

def test_saves_output_and_rstd_only():
    s, b, h = 16, 3, 40
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
    norm = InplaceLayerNorm(h).to(torch.bfloat16)
    meter, y = _saved(norm, x, model=norm)
    k = side_columns(h, True)
    assert k == 8 and meter.total_bytes == s * b * h * 2 + s * b * 4 + _side_bytes(s * b, h, 2)
    assert sorted((str(r.dtype), r.shape) for r in meter.saved) == [
        ("torch.bfloat16", (s, b, h)), ("torch.bfloat16", (s * b, k)), ("torch.float32", (s * b,)),
        ("torch.int64", (k,))]
    assert any(r.nbytes == y.nbytes and r.shape == tuple(y.shape) for r in meter.saved)


def test_the_next_linear_shares_the_saved_output():
    s, b, h = 16, 3, 40
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
    ours = nn.Sequential(InplaceLayerNorm(h), nn.Linear(h, h)).to(torch.bfloat16)
    theirs = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h)).to(torch.bfloat16)
    linear_alone, _ = _saved(theirs[1], x, model=theirs[1])
    ours_meter, _ = _saved(ours, x, model=ours)
    theirs_meter, _ = _saved(theirs, x, model=theirs)
    assert linear_alone.total_bytes == s * b * h * 2
    assert ours_meter.total_bytes == linear_alone.total_bytes + s * b * 4 + _side_bytes(s * b, h, 2)
    # PyTorch: input and output of the LayerNorm, and its mean and rstd (bfloat16 on CPU)
    assert theirs_meter.total_bytes == 2 * s * b * h * 2 + 2 * s * b * 2


# -- module --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_module_is_a_drop_in_for_nn_layer_norm(kwargs):
    torch.manual_seed(1)
    theirs = nn.LayerNorm((3, 8), **kwargs)
    ours = InplaceLayerNorm((3, 8), **kwargs)
    assert isinstance(ours, nn.LayerNorm) and ours.extra_repr() == theirs.extra_repr()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_from_module_reuses_the_parameter_objects():
    ln = nn.LayerNorm(24, eps=1e-6)
    ln.eval()
    ours = InplaceLayerNorm.from_module(ln)
    assert ours.weight is ln.weight and ours.bias is ln.bias
    assert (ours.eps, ours.normalized_shape, ours.training) == (1e-6, (24,), False)
    x = torch.randn(3, 24, requires_grad=True)
    ours(x).sum().backward()
    assert ln.weight.grad is not None
    with pytest.raises(TypeError):
        InplaceLayerNorm.from_module(nn.RMSNorm(24))


def test_zero3_partitioned_weights_are_gathered_in_backward(zero3_gather):
    """A weight that ZeRO-3 partitioned away between forward and backward is gathered for the backward."""
    x, w, b, g = _inputs((4,), (6,), torch.float32)
    w, b = nn.Parameter(w), nn.Parameter(b)
    y = inplace_layer_norm(x, 6, w, b)
    zero3_gather.partition(w, b)
    y.backward(g)
    assert zero3_gather.gathered == [[w, b]] and w.grad is not None


# -- Triton kernel (interpreter) -----------------------------------------------------------------------



@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("affine, fallback", [(a, False) for a in AFFINE] + [(a, True) for a in AFFINE[:2]])
def test_triton_kernel_matches_the_pytorch_path(layer_norm_kernel, dtype, affine, fallback):
    x, w, b, g = _inputs((6,), (37,), dtype, affine)
    if fallback:
        w[4] = 0.0
    kernel = _forward_backward(inplace_layer_norm, x, (37,), w, b, g)
    assert layer_norm_kernel.calls == ["norm_forward", "norm_backward"]
    layer_norm_kernel.env.setenv("TEMPO_DS_TRITON", "0")
    torch_path = _forward_backward(inplace_layer_norm, x, (37,), w, b, g)
    assert len(layer_norm_kernel.calls) == 2
    for k, t in zip(kernel, torch_path):
        assert k.dtype == t.dtype and k.shape == t.shape
        # one ulp of a 16-bit dtype: the kernel sums in another order, which can flip a rounding, and the
        # interpreter rounds float32 -> bfloat16 towards zero
        tol = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(k.float(), t.float(), rtol=tol, atol=tol * t.float().abs().max().item())


def test_triton_kernel_saves_output_and_rstd_and_handles_odd_layouts(layer_norm_kernel):
    x, w, b, g = _inputs((3, 2), (4, 5), torch.float32)
    meter, _ = _saved(inplace_layer_norm, x.requires_grad_(), (4, 5), nn.Parameter(w), nn.Parameter(b))
    assert meter.total_bytes == 6 * 20 * 4 + 6 * 4 + _side_bytes(6, 20, 4)  # y, rstd [6] float32, side buffer
    x.requires_grad_(False)
    xt = x.transpose(0, 1)  # non-contiguous rows
    kernel = _forward_backward(inplace_layer_norm, xt, (4, 5), w, b, g.transpose(0, 1))
    ref = _forward_backward(F.layer_norm, xt, (4, 5), w, b, g.transpose(0, 1))
    for k, r in zip(kernel, ref):
        torch.testing.assert_close(k, r)
    empty = _forward_backward(inplace_layer_norm, x[:0], (4, 5), w, b, g[:0])
    assert empty[0].shape == (0, 2, 4, 5) and torch.equal(empty[2], torch.zeros(4, 5))
    assert layer_norm_kernel.calls == ["norm_forward"] + ["norm_forward", "norm_backward"] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_input", [False, True], ids=["output", "keep_input"])
def test_16bit_weight_and_bias_gradients_are_summed_in_float32(dtype, keep_input):
    """Both saved sets sum the weight and bias gradients over rows in float32: within 2x of a float32-summing
    reference (LayerNorm on float32 copies, rounded once) against float64, where PyTorch's CPU kernel, summing
    in 16 bits, errs 10-100x more at 2048 rows."""
    torch.manual_seed(0)
    x, g = torch.randn(2048, 256), torch.randn(2048, 256)
    w, b = torch.rand(256) + 0.5, torch.rand(256) - 0.5

    def grads(fn, dt):
        xs, ws, bs = (t.detach().to(dt).requires_grad_() for t in (x, w, b))
        fn(xs, ws, bs).backward(g.to(dt))
        return [t.grad.double() for t in (xs, ws, bs)]

    ref = grads(lambda *a: F.layer_norm(a[0], (256,), a[1], a[2]), torch.float64)
    ours = grads(lambda *a: inplace_layer_norm(a[0], (256,), a[1], a[2], keep_input=keep_input), dtype)
    fp32_sums = grads(lambda *a: F.layer_norm(a[0].float(), (256,), a[1].float(), a[2].float()).to(dtype), dtype)
    for what, o, t, r in zip(("dx", "dw", "db"), ours, fp32_sums, ref):
        assert_within_2x_of_torch(o, t, r, what=f"{dtype} {what}")


def _fused_backward_spy(layer_norm_kernel):
    """Records, per kernel backward, whether it started from the saved output itself and with a side buffer."""
    seen, inner = [], layer_norm_kernel.module.norm_backward

    def spy(grad, src, *args, **kwargs):
        seen.append((src.data_ptr(), kwargs.get("from_output"), kwargs.get("side") is not None))
        return inner(grad, src, *args, **kwargs)

    layer_norm_kernel.env.setattr(layer_norm_kernel.module, "norm_backward", spy)
    return seen


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_triton_kernel_writes_the_side_buffer_and_patches_bad_columns_itself(layer_norm_kernel, dtype):
    """N = 200 (not a power of two, BLOCK_N 256 as on CUDA, K = 8) with 8 bad columns (zeros, subnormal,
    |b| > |w|): the forward kernel writes PyTorch's side buffer (same columns; xhat to one rounding, the
    interpreter rounds bfloat16 towards zero), and the fused backward, which starts from ``y`` itself and
    patches the side columns, gives the PyTorch path's gradients."""
    rows, n = 6, 200
    x, w, b, g = _inputs((rows,), (n,), dtype, seed=3)
    w[[0, 77, 199]] = 0.0
    w[100] = torch.finfo(dtype).tiny / 8
    w[[5, 64, 130, 150]] = 0.02
    b[[5, 64, 130, 150]] = torch.tensor([0.5, -0.4, 0.3, -0.25], dtype=dtype)
    assert side_columns(n, True) == 8
    fwd = torch.ops.tempo_ds.inplace_layer_norm_fwd
    y, _, _, side, idx = fwd(x, w, b, [n], 1e-5, "output")
    seen = _fused_backward_spy(layer_norm_kernel)
    kernel = _forward_backward(inplace_layer_norm, x, (n,), w, b, g)
    assert len(seen) == 1 and seen[0][1:] == (True, True)
    layer_norm_kernel.env.setenv("TEMPO_DS_TRITON", "0")
    y_t, _, _, side_t, idx_t = fwd(x, w, b, [n], 1e-5, "output")
    torch_path = _forward_backward(inplace_layer_norm, x, (n,), w, b, g)
    assert sorted(idx.tolist()) == sorted(idx_t.tolist()) == [0, 5, 64, 77, 100, 130, 150, 199]
    tol = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5  # float32: the statistics' sum order
    torch.testing.assert_close(side.float(), side_t.float(), rtol=tol, atol=0)
    for name, k, t in zip(("y", "dx", "dw", "db"), kernel, torch_path):
        assert torch.isfinite(k).all(), name
        torch.testing.assert_close(k.float(), t.float(), rtol=tol, atol=tol * t.float().abs().max().item())


def test_triton_backward_starts_from_the_saved_output(layer_norm_kernel):
    """No ``[M, N]`` rebuild in PyTorch: the kernel reads the saved ``y`` (the very storage the forward returned)."""
    x, w, b, g = _inputs((4,), (24,), torch.float32)
    seen = _fused_backward_spy(layer_norm_kernel)
    xx = x.requires_grad_()
    y = inplace_layer_norm(xx, 24, w, b)
    y.backward(g)
    assert seen == [(y.data_ptr(), True, True)]

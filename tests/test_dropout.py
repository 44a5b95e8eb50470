"""Seed dropout: the mask is a pure function of (seed, element index), saved nowhere, regenerated in backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ALL_DTYPES, CHECKPOINT_MODES, assert_checkpoint_matches, saved_bytes
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import SeedDropout
from tempo_ds.ops import _rng, seed_dropout
from tempo_ds.ops._library import draw_seed


def _seed_after(seed: int) -> torch.Tensor:
    """The seed ``seed_dropout`` draws right after ``torch.manual_seed(seed)``: a 1-element int64 tensor."""
    torch.manual_seed(seed)
    return draw_seed(torch.device("cpu"))


def _expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    keep = _rng.keep_mask(seed, p, 0, x.numel(), x.device).view(x.shape)
    return torch.mul(x, keep).mul_(1 / (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_expectation(p):
    n = 200_000
    x = torch.ones(n)
    y = seed_dropout(x, p)
    kept = (y != 0).float().mean().item()
    sd = ((1 - p) * p / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sd
    # E[y] = x: the mean of y is 1 up to the same binomial noise scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 5 * sd / (1 - p)
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - p))))


@pytest.mark.parametrize("dtype", ALL_DTYPES + [torch.float64])
def test_forward_and_backward_use_the_mask_of_the_drawn_seed(dtype):
    x = torch.randn(37, 11, dtype=torch.float64).to(dtype).requires_grad_()
    g = torch.randn(37, 11, dtype=torch.float64).to(dtype)
    torch.manual_seed(3)
    y = seed_dropout(x, 0.3)
    (dx,) = torch.autograd.grad(y, x, g)
    seed = _seed_after(3)
    keep = _rng.keep_mask(seed, 0.3, 0, x.numel(), "cpu").view(x.shape)
    assert torch.equal(y, torch.mul(x.detach(), keep).mul_(1 / 0.7))
    assert torch.equal(dx, torch.mul(g, keep).mul_(1 / 0.7))


def test_determinism_and_fresh_seeds():
    x = torch.randn(64, 64)
    torch.manual_seed(0)
    a = seed_dropout(x, 0.5)
    b = seed_dropout(x, 0.5)  # the global RNG moved on: a new seed, a new mask
    torch.manual_seed(0)
    c = seed_dropout(x, 0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a != 0, b != 0)


def test_mask_follows_logical_index_not_strides():
    x = torch.randn(23, 17).t()
    assert not x.is_contiguous()
    torch.manual_seed(1)
    y = seed_dropout(x, 0.4)
    torch.manual_seed(1)
    assert torch.equal(y, seed_dropout(x.contiguous(), 0.4))
    assert torch.equal(y, _expected(x, 0.4, _seed_after(1)))


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_every_checkpoint_mode_regenerates_the_same_mask(mode):
    x = torch.randn(6, 29, requires_grad=True)
    w = torch.randn(29, 29, requires_grad=True)

    def fn(x, w):
        return seed_dropout(torch.tanh(x @ w), 0.25) @ w

    assert_checkpoint_matches(fn, [x, w], mode)


def test_gradcheck_float64():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)

    def fn(x):
        torch.manual_seed(11)  # every evaluation draws the same seed, so the function is deterministic
        return seed_dropout(x, 0.4)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_nothing(dtype):
    x = torch.randn(33, 65, dtype=dtype, requires_grad=True)
    assert saved_bytes(seed_dropout, x, 0.5) == 0
    drop = SeedDropout(0.5)
    with SavedTensorMeter(drop) as meter:
        y = drop(x)
    assert meter.total_bytes == 0 and meter.saved == []
    # against nn.Dropout, which keeps a mask of the input's size
    assert saved_bytes(nn.Dropout(0.5), x) == x.numel() * x.element_size()
    y.sum().backward()
    assert x.grad is not None


def test_identity_without_dropout_draws_no_seed():
    x = torch.randn(4, 5, requires_grad=True)
    state = torch.get_rng_state()
    assert seed_dropout(x, 0.0) is x
    assert seed_dropout(x, 0.7, training=False) is x
    drop = SeedDropout(0.7).eval()
    assert drop(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_p_one_gives_zeros_and_zero_grads():
    x = torch.randn(8, 3, requires_grad=True)
    y = seed_dropout(x, 1.0)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(x)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_p_is_refused(p):
    with pytest.raises(ValueError, match=r"p=.*must be in \[0, 1\]"):
        seed_dropout(torch.randn(3), p)
    with pytest.raises(ValueError, match=r"p=.*must be in \[0, 1\]"):
        SeedDropout(p)


def test_empty_and_no_grad():
    e = torch.empty(0, 5, requires_grad=True)
    y = seed_dropout(e, 0.5)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert e.grad.shape == (0, 5)
    x = torch.randn(9, 4, requires_grad=True)
    torch.manual_seed(2)
    with torch.no_grad():
        y = seed_dropout(x, 0.5)
    assert y.grad_fn is None
    torch.manual_seed(2)
    assert torch.equal(y, seed_dropout(x, 0.5).detach())


def test_inf_and_nan_propagate_like_f_dropout():
    x = torch.randn(200)
    torch.manual_seed(5)
    keep = seed_dropout(torch.ones(200), 0.5) != 0
    kept, dropped = keep.nonzero()[0].item(), (~keep).nonzero()[0].item()
    x[kept], x[dropped] = float("nan"), float("inf")
    x.requires_grad_()
    torch.manual_seed(5)
    y = seed_dropout(x, 0.5)
    assert torch.isnan(y[kept]) and torch.isnan(y[dropped])  # a dropped inf times 0 is nan, as in F.dropout
    y_torch = F.dropout(torch.full((1000,), float("inf")), 0.5)
    assert torch.isnan(y_torch).any() and torch.isinf(y_torch).any()  # PyTorch's dropout does the same
    g = torch.ones(200)
    g[kept] = float("inf")
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.isinf(dx[kept]) and torch.isfinite(dx[~keep]).all()


def test_module_is_a_drop_in_for_nn_dropout():
    drop = SeedDropout(0.3, inplace=True)
    assert (drop.p, drop.inplace) == (0.3, True)
    assert repr(drop) == "SeedDropout(p=0.3, inplace=True)"
    assert drop.extra_repr() == nn.Dropout(0.3, inplace=True).extra_repr()
    x = torch.randn(10, 10)
    before = x.clone()
    torch.manual_seed(4)
    y = drop(x)
    assert torch.equal(x, before), "inplace=True is ignored: the input is never overwritten"
    assert torch.equal(y, _expected(x, 0.3, _seed_after(4)))
    assert drop.state_dict() == {}


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for the seed-dropout kernel (TRITON_INTERPRET is read when @triton.jit runs)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from tempo_ds.kernels import dropout

    rebuilt = not isinstance(dropout._seed_dropout_kernel, InterpretedFunction)
    if rebuilt:  # imported earlier in this process for the compiler: rebuild it, and undo after
        importlib.reload(dropout)
    yield dropout
    if rebuilt:
        monkeypatch.delenv("TRITON_INTERPRET")
        importlib.reload(dropout)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_triton_kernel_builds_the_same_mask(interpreter, monkeypatch, dtype):
    x = torch.randn(3001, 3).to(dtype).t().requires_grad_()  # non-contiguous, not a multiple of the block
    g = torch.randn(3, 3001).to(dtype)
    torch.manual_seed(9)
    y = seed_dropout(x, 0.35)
    (dx,) = torch.autograd.grad(y, x, g)
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")
    torch.manual_seed(9)
    y_ref = seed_dropout(x, 0.35)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(y != 0, y_ref != 0)  # the same mask, bit for bit
    if dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 -> bfloat16 towards zero (a GPU rounds to nearest even, like
        # PyTorch), so the scaled values may differ in the last bit there; the mask is still identical.
        ulp = 2.0 ** (torch.floor(torch.log2(y_ref.float().abs().clamp_min(1e-30))) - 7)
        assert torch.all((y.float() - y_ref.float()).abs() <= ulp)
        assert torch.all((dx.float() - dx_ref.float()).abs() <= 2.0 ** (torch.floor(
            torch.log2(dx_ref.float().abs().clamp_min(1e-30))) - 7))
    else:
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_triton_kernel_matches_on_large_indices(interpreter):
    """Counters beyond 2**32 exercise the high word of the hash in the kernel."""
    start, seed, n = 3 * 2**32 - 1000, 2**31 - 2, 3000
    y = interpreter.apply_seed_mask(torch.ones(n), 0.5, seed, start)
    assert torch.equal(y != 0, _rng.keep_mask(seed, 0.5, start, n, "cpu"))


def test_triton_kernel_takes_the_seed_as_a_device_tensor(interpreter):
    """The seed as ``_library.draw_seed`` gives it (a 1-element int64 tensor the kernel loads) drops exactly what
    the same int drops, at the CUDA block size (``BLOCK`` elements per program, several programs)."""
    assert interpreter.TENSOR_SEED
    n, seed = 3 * interpreter.BLOCK + 77, 2**31 - 5
    x = torch.randn(n)
    by_tensor = interpreter.apply_seed_mask(x, 0.3, torch.tensor([seed]), 5)
    assert torch.equal(by_tensor, interpreter.apply_seed_mask(x, 0.3, seed, 5))
    assert torch.equal(by_tensor != 0, _rng.keep_mask(seed, 0.3, 5, n, "cpu"))
    for bad in (torch.tensor([seed], dtype=torch.int32), torch.tensor([1, 2]), -1, 2**31):
        with pytest.raises(ValueError, match="seed"):
            interpreter.apply_seed_mask(x, 0.3, bad)

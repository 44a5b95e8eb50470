"""No host syncs in the ops of tempo_ds.ops (DESIGN.md section 5, rules 10-11), proven on CPU three ways:

* eagerly, under a dispatch mode that fails on every read of a tensor's value by the host
  (``aten._local_scalar_dense``, behind ``.item()``, ``bool(t)``, ``if t.any():``; and ``aten.equal``),
  forward and backward, the op implementations included -- with weights that need the norms' side buffer;
* ``torch.compile(fullgraph=True)`` of forward + backward (no graph break, no data-dependent guard), equal
  to eager;
* ``torch.export`` of the forward, equal to eager.
"""
import pytest
import torch
from torch import nn

from tempo_ds import ops

from helpers import NoHostReads  # noqa: F401  (test_mask_syncfree and test_megatron import it from here)


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")


def _bad_weight(n, gen):
    """Norm weight with a zero, a tiny entry and one small next to its bias: three side-buffer columns."""
    w = torch.rand(n, generator=gen) + 0.5
    w[1], w[4], w[6] = 0.0, 1e-39, 0.01
    return nn.Parameter(w)


def _cases():
    gen = torch.Generator().manual_seed(0)
    n = 16
    b = nn.Parameter(torch.rand(n, generator=gen) - 0.5)
    w_ln, w_rms = _bad_weight(n, gen), _bad_weight(n, gen)
    lin = nn.Linear(n, 8)
    return {
        "layer_norm": (lambda x: ops.inplace_layer_norm(x, n, w_ln, b), [w_ln, b]),
        "rms_norm": (lambda x: ops.inplace_rms_norm(x, w_rms), [w_rms]),
        "gelu": (lambda x: ops.inplace_gelu(x, "tanh"), []),
        "gelu_linear": (lambda x: ops.gelu_linear(x, lin.weight, lin.bias), [lin.weight, lin.bias]),
        "seed_dropout": (lambda x: ops.seed_dropout(x, 0.3), []),
        "fewbit": (lambda x: ops.fewbit(x, "silu", bits=2), []),
    }


CASES = _cases()


def _run(fn, params, x, g, seed=0):
    """Output and the gradients of x and ``params`` after one forward and backward (global RNG at ``seed``)."""
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


def _inputs(name):
    """x [3, 5, 16] and a cotangent of the op's output (gelu_linear maps 16 features to 8)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen)
    return x, torch.randn(3, 5, 8 if name == "gelu_linear" else 16, generator=gen)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_read_nothing_on_the_host(name):
    fn, params = CASES[name]
    x, g = _inputs(name)
    eager = _run(fn, params, x, g)  # fills the host-constant caches (tables, thresholds) first
    with NoHostReads():
        again = _run(fn, params, x, g)
    for a, b in zip(eager, again):
        assert torch.equal(a, b)
    assert all(torch.isfinite(t).all() for t in again)  # the norms' zero/tiny weights come from the side buffer
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        bool(x.sum() > 0)  # the detector does see a sync


@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph_forward_backward_and_export_equal_eager(name):
    fn, params = CASES[name]
    x, g = _inputs(name)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for c, e in zip(_run(compiled, params, x, g), _run(fn, params, x, g)):
        torch.testing.assert_close(c, e, rtol=0, atol=0)

    class Wrapped(nn.Module):
        def forward(self, x):
            return fn(x)

    torch.manual_seed(0)
    exported = torch.export.export(Wrapped(), (x.requires_grad_(),))
    torch.manual_seed(0)
    out = exported.module()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, fn(x), rtol=0, atol=0)


def test_opcheck_fake_implementations_and_autograd():
    """``torch.library.opcheck``: schema, fake implementations against the real ones (shapes, strides, dtypes,
    no aliasing) and the registered autograd under AOT dispatch, one representative call per op."""
    from tempo_ds.ops._library import draw_seed
    from tempo_ds.ops.fewbit import resolve

    T = torch.ops.tempo_ds
    x = torch.randn(3, 5, 16, requires_grad=True)
    w, b = _bad_weight(16, torch.Generator().manual_seed(2)), nn.Parameter(torch.rand(16) - 0.5)
    lin = nn.Linear(16, 8)
    silu = resolve("silu", 2)
    calls = [(T.inplace_layer_norm_fwd, (x, w, b, [16], 1e-5, "output")),
             (T.inplace_layer_norm_fwd, (x, w, b, [16], 1e-5, "input")),
             (T.inplace_rms_norm_fwd, (x.detach().bfloat16().requires_grad_(), w, 1e-6, "llama", torch.float32,
                                       "output")),
             (T.inplace_gelu_fwd, (x, "none")),
             (T.gelu_linear_fwd, (x, lin.weight, lin.bias, "tanh", False, torch.bfloat16)),
             (T.seed_dropout_fwd, (x, draw_seed(x.device), 0.3)),
             (T.fewbit_fwd, (x, "silu", 2, list(silu.borders), list(silu.levels), silu.band, silu.nan_code))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

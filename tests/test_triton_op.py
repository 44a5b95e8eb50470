"""What torch.compile sees of the ops (tempo_ds.ops._library, "Triton ops"), proven without a GPU.

* CUDA: every op whose CUDA path launches Triton kernels is traced with fake CUDA tensors through
  functionalization (``make_fx`` of ``dispatch_functionalize``, what AOTAutograd does under torch.compile). The
  graph must hold ``triton_kernel_wrapper_functional`` nodes for exactly the expected kernels, forward and
  backward op each, no opaque op, and no kernel may write a tensor the op received (Triton's own mutation
  analysis of the kernel's TTIR, for an sm_90 target, decides what is written; nothing the op was given may be
  among it, or Inductor would have to copy it first). Real tensors never exist: the kernels are not run.
  This runs in a subprocess, because the kernels must be compiled ``JITFunction`` objects, not the interpreted
  ones the rest of the suite imports (conftest sets ``TRITON_INTERPRET=1`` before triton is imported), and it
  needs a Triton target to build the TTIR from: a host without a GPU has no driver, so the child names sm_90.
  Autograd on fake CUDA tensors aborts a CPU-only torch build, so forward and backward ops are traced apart
  (``register_autograd`` joining them is the same code the CPU tests run). ``torch.export`` of a CUDA call
  keeps the op whole (no Triton node in the program).
* CPU: the same traces hold the opaque ops and no Triton node (and so does a forward + backward through
  autograd): the PyTorch path is unchanged, and torch.compile still cannot see into it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

WRAPPERS = ("triton_kernel_wrapper_functional", "triton_kernel_wrapper_mutation")

# op -> kernels (the JIT functions' names) its CUDA trace must launch, in order
EXPECTED = {
    "inplace_gelu_fwd": ["_forward_kernel"],
    "inplace_gelu_bwd": ["_backward_kernel"],
    "inplace_layer_norm_fwd": ["_norm_fwd_kernel"],
    "inplace_layer_norm_bwd": ["_norm_bwd_kernel"],
    "inplace_rms_norm_fwd": ["_norm_fwd_kernel"],
    "inplace_rms_norm_bwd": ["_norm_bwd_kernel"],
    "seed_dropout_fwd": ["_seed_dropout_kernel"],
    "fewbit_fwd": ["_fewbit_fwd_kernel"],
    "fewbit_bwd": ["_fewbit_bwd_kernel"],
    "attention_lean_fwd": ["_attn_fwd"],
    "attention_lean_bwd": ["_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"],
    "gated_mlp_fwd": ["gated_forward_kernel"],
    "gated_mlp_bwd": ["gated_backward_kernel"],
}


def _silu_table():
    from tempo_ds.ops.fewbit import resolve

    silu = resolve("silu", 2)  # host floats: resolved before any fake tensor exists
    return list(silu.borders), list(silu.levels), silu.band, silu.nan_code


def _calls(device: str, table):
    """(op name, callable, inputs) for one representative call of each op, inputs made on ``device``."""
    from tempo_ds.ops._library import draw_seed

    T = torch.ops.tempo_ds
    f32 = dict(device=device, dtype=torch.float32)
    x, dy = torch.randn(4, 64, **f32), torch.randn(4, 64, **f32)
    w, b = torch.rand(64, **f32) + 0.5, torch.rand(64, **f32)
    bits = torch.zeros(32, dtype=torch.uint8, device=device)
    rstd = torch.rand(4, **f32)
    side, idx = torch.randn(4, 8, **f32), torch.arange(8, device=device)
    q = torch.randn(1, 2, 16, 16, **f32)
    kv = torch.randn(1, 1, 16, 16, **f32)  # GQA: two query heads read one key/value head
    lse = torch.randn(1, 2, 16, **f32)
    mask = torch.ones(1, 1, 1, 16, dtype=torch.bool, device=device)
    gu, weight = torch.randn(4, 32, **f32), torch.randn(8, 16, **f32)
    seed = draw_seed(torch.device(device))
    return [
        ("inplace_gelu_fwd", T.inplace_gelu_fwd, (x, "none")),
        ("inplace_gelu_bwd", lambda y, bits, dy: T.inplace_gelu_bwd(y, bits, dy, "tanh"), (x, bits, dy)),
        ("inplace_layer_norm_fwd", lambda x, w, b: T.inplace_layer_norm_fwd(x, w, b, [64], 1e-5, "output"), (x, w, b)),
        ("inplace_layer_norm_bwd",
         lambda g, y, r, s, i, w, b: T.inplace_layer_norm_bwd(g, y, None, r, s, i, w, b, [64], [True, True, True]),
         (dy, x, rstd, side, idx, w, b)),
        ("inplace_rms_norm_fwd", lambda x, w: T.inplace_rms_norm_fwd(x, w, 1e-6, "llama", torch.float32, "output"),
         (x, w)),
        ("inplace_rms_norm_bwd",
         lambda g, y, r, s, i, w: T.inplace_rms_norm_bwd(g, y, r, s, i, w, True, torch.float32, [True, True]),
         (dy, x, rstd, side, idx, w)),
        ("seed_dropout_fwd", lambda x, s: T.seed_dropout_fwd(x, s, 0.3), (x, seed)),
        ("fewbit_fwd", lambda x: T.fewbit_fwd(x, "silu", 2, *table), (x,)),
        ("fewbit_bwd", lambda g, p: T.fewbit_bwd(g, p, table[1], 2), (dy, torch.zeros(64, dtype=torch.uint8,
                                                                                        device=device))),
        ("attention_lean_fwd",
         lambda q, k, v, m, s: T.attention_lean_fwd(q, k, v, m, s, True, 0.25, 0.1, 16, True), (q, kv, kv, mask, seed)),
        ("attention_lean_bwd",
         lambda do, q, k, v, o, lse, m, s: T.attention_lean_bwd(do, q, k, v, o, lse, m, s, True, 0.25, 0.1, 16, True,
                                                                False),
         (q, q, kv, kv, q, lse, mask, seed)),
        ("gated_mlp_fwd", lambda gu, w: T.gated_mlp_fwd(gu, None, w, None, "silu", None), (gu, weight)),
        ("gated_mlp_bwd",
         lambda d, gu, w: T.gated_mlp_bwd(d, gu, None, w, None, "gelu_tanh", None, [True, True, False]),
         (torch.randn(4, 8, **f32), gu, weight)),
    ]


def _trace(fn, inputs):
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*inputs)


def _base(node):
    """The node a chain of view ops (view, expand, transpose, slice, ...) starts from."""
    while node.op == "call_function" and getattr(node.target, "is_view", False):
        node = node.args[0]
    return node


def _summary(gm) -> dict:
    """Kernels launched (in order), tensors each writes that the op received, and the custom ops left."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernels, options, written_inputs, ops = [], [], [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name in WRAPPERS:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernels.append(kernel.fn.__name__)
            # launch options (num_warps, num_stages) travel as the one Config of an Autotuner wrapping the kernel
            configs = getattr(kernel, "configs", None)
            options.append([configs[0].num_warps, configs[0].num_stages] if configs else None)
            args = node.kwargs["kwargs"]
            written = node.kwargs.get("tensors_to_clone", list(args))
            written_inputs += [f"{kernels[-1]}.{a}" for a in written
                               if isinstance(args[a], torch.fx.Node) and _base(args[a]).op == "placeholder"]
        elif str(node.target).startswith("tempo_ds."):
            ops.append(str(node.target))
    return {"kernels": kernels, "options": options, "written_inputs": written_inputs, "ops": ops, "code": gm.code}


def _child() -> None:
    """Trace every op's CUDA path with fake CUDA tensors; print one JSON object, op -> summary."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget

    class Sm90:  # the target Triton's TTIR (and so torch's mutation analysis) is built for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    table = _silu_table()
    with FakeTensorMode():
        calls = _calls("cuda", table)
    out = {}
    for name, fn, inputs in calls:
        try:
            out[name] = _summary(_trace(fn, inputs))
        except Exception:  # reported per op, so one failure does not hide the others
            out[name] = {"error": traceback.format_exc()[-3000:]}
    class Gelu(torch.nn.Module):  # torch.export keeps a triton op whole: no Triton source in the program
        def forward(self, x):
            return torch.ops.tempo_ds.inplace_gelu_fwd(x, "none")[0]

    exported = torch.export.export(Gelu(), (calls[0][2][0],))
    out["export"] = _summary(exported.graph_module)
    from torch._library.triton import set_wrap_triton_enabled

    from tempo_ds.kernels import attention, gelu, layer_norm
    from tempo_ds.kernels._launch import launcher, shared_memory_limit

    with set_wrap_triton_enabled(False):  # as in a triton op's body in eager
        eager = type(launcher(gelu._forward_kernel)).__name__
    out["launchers"] = [type(launcher(gelu._forward_kernel)).__name__, eager]

    fwd, dkdv, dq = attention.tiles(16, 16, torch.float32, shared_memory_limit(torch.device("cuda")))
    out["expected_options"] = {"attention_lean_fwd": [[fwd.num_warps, fwd.num_stages]],
                               "attention_lean_bwd": [None, [dkdv.num_warps, dkdv.num_stages],
                                                      [dq.num_warps, dq.num_stages]],
                               "inplace_layer_norm_fwd": [[layer_norm._launch(64)[1], 3]],
                               "inplace_layer_norm_bwd": [[layer_norm._launch(64, backward=True)[1], 3]]}
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def cuda_traces() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TEMPO_DS_TRITON")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; what the kernels are built with today
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("op", list(EXPECTED))
def test_cuda_trace_shows_the_kernel_launches(cuda_traces, op):
    summary = cuda_traces[op]
    assert "error" not in summary, summary.get("error")
    assert summary["kernels"] == EXPECTED[op], summary["code"]
    assert summary["written_inputs"] == [], summary["code"]
    assert not any(o.endswith("_opaque.default") for o in summary["ops"]), summary["code"]
    if op in cuda_traces["expected_options"]:  # the launch options the op chose reach the graph
        assert summary["options"] == cuda_traces["expected_options"][op]


def test_launches_are_traced_or_guarded_to_their_tensors_device(cuda_traces):
    """Traced: wrap_triton's wrapper; eager: launched on the device of the tensors (Triton itself would launch on
    the current device)."""
    from tempo_ds.kernels._launch import _OnTensorsDevice

    assert cuda_traces["launchers"] == ["TraceableTritonKernelWrapper", "_OnTensorsDevice"]
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    x = torch.ones(2)
    _OnTensorsDevice(Kernel())[(3,)](x, n=2)  # no CUDA tensor: launched as it is
    assert calls == [((3,), (x,), {"n": 2})]


def test_cuda_export_keeps_the_op_whole(cuda_traces):
    summary = cuda_traces["export"]
    assert summary["ops"] == ["tempo_ds.inplace_gelu_fwd.default"] and summary["kernels"] == [], summary["code"]


def test_cpu_traces_of_every_op_hold_its_opaque_op():
    """The same calls on CPU tensors: each op decomposes into exactly its opaque op, no Triton node."""
    for name, fn, inputs in _calls("cpu", _silu_table()):
        summary = _summary(_trace(fn, inputs))
        assert summary["kernels"] == [], name
        assert summary["ops"] == [f"tempo_ds.{name}_opaque.default"], (name, summary["code"])


def test_cpu_trace_keeps_the_opaque_ops():
    """On CPU (PyTorch path) functionalization finds the opaque op, forward and backward, and no Triton node."""
    from tempo_ds import ops

    x = torch.randn(4, 64, requires_grad=True)

    def step(x):
        y = ops.inplace_gelu(x, "tanh")
        return torch.autograd.grad(y.sum(), x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPO_DS_TRITON", "0")
        summary = _summary(_trace(step, (x,)))
    assert summary["kernels"] == []
    assert summary["ops"] == ["tempo_ds.inplace_gelu_fwd_opaque.default", "tempo_ds.inplace_gelu_bwd_opaque.default"]


if __name__ == "__main__":
    _child()

"""Shared test helpers: float64 references, checkpoint flavours and the meter."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from tempo_ds.memory import SavedTensorMeter

LOW_PRECISION = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHECKPOINT_MODES = ["none", "torch_reentrant", "torch_non_reentrant", "deepspeed", "deepspeed_non_reentrant",
                    "no_grad_recompute"]


aten = torch.ops.aten
# Ops that hand a tensor's value to the host, or whose output size depends on the data (a device-to-host sync on
# CUDA either way).
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
              aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
              aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class NoHostReads(TorchDispatchMode):
    """Raise on any aten op that reads a tensor's value on the host or sizes its output by the data (boolean
    indexing included)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or (func is aten.index.Tensor
                                  and any(i is not None and i.dtype == torch.bool for i in args[1])):
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


def loss_and_grads(model, batch):
    """The loss and every parameter's gradient of one forward + backward of an HF model on ``batch``."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_2x_of_torch(ours: torch.Tensor, torch_op: torch.Tensor, ref64: torch.Tensor,
                              atol: float = 0.0, what: str = "") -> None:
    """Our low-precision result errs at most twice as much as PyTorch's own op in the same precision."""
    e_ours, e_torch = max_err(ours, ref64), max_err(torch_op, ref64)
    assert e_ours <= 2 * e_torch + atol, f"{what}: error {e_ours:.3g} > 2 x torch's {e_torch:.3g} + {atol:.3g}"


def saved_bytes(fn, *args, model=None) -> int:
    """Bytes autograd keeps for backward when ``fn(*args)`` runs, counted by the meter."""
    with SavedTensorMeter(model) as meter:
        out = fn(*args)
    del out
    return meter.total_bytes


def run_checkpointed(fn, inputs: list[torch.Tensor], mode: str, seed: int = 0):
    """Run ``fn(*inputs)`` under one checkpoint flavour, backward a fixed random cotangent, return
    ``(output, [input grads])``. The seed is set before the forward, so dropout inside ``fn`` must come
    out the same in every mode if the op regenerates it from the global RNG correctly."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    torch.manual_seed(seed)
    if mode == "none":
        out = fn(*leaves)
    elif mode == "torch_reentrant":
        out = torch_checkpoint(fn, *leaves, use_reentrant=True)
    elif mode == "torch_non_reentrant":
        out = torch_checkpoint(fn, *leaves, use_reentrant=False)
    elif mode == "deepspeed":
        from deepspeed.runtime.activation_checkpointing import checkpointing

        out = checkpointing.checkpoint(fn, *leaves)
    elif mode == "deepspeed_non_reentrant":
        from deepspeed.runtime.activation_checkpointing import checkpointing

        out = checkpointing.non_reentrant_checkpoint(fn, *leaves)
    elif mode == "no_grad_recompute":
        with torch.no_grad():
            fn(*leaves)  # a no_grad forward (reentrant checkpoint's first pass) must not disturb anything
        torch.manual_seed(seed)
        out = fn(*leaves)
    else:
        raise ValueError(mode)
    gen = torch.Generator().manual_seed(1234)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
    out.backward(cot)  # not torch.autograd.grad: reentrant checkpoints refuse it
    return out.detach(), [x.grad for x in leaves if x.requires_grad]


def assert_autocast_within_2x(ours, theirs, ref64, x: torch.Tensor) -> None:
    """Under CPU bf16 autocast, ``ours`` (a module) errs at most 2x as much as ``theirs`` against ``ref64`` (the
    same module in float64, autocast off): output, input gradient and every parameter gradient."""
    results = []
    for model, enabled in ((ours, True), (theirs, True), (ref64, False)):
        xx = x.detach().to(next(model.parameters()).dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y = model(xx)
            y.sum().backward()
        results.append([y.detach(), xx.grad] + [p.grad for p in model.parameters()])
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    for o, t, r in zip(*results):
        assert o.dtype == t.dtype
        assert_within_2x_of_torch(o, t, r, what="autocast")


def assert_checkpoint_matches(fn, inputs: list[torch.Tensor], mode: str):
    """``fn`` under checkpoint flavour ``mode`` gives bit-for-bit the output and input gradients of the run
    without checkpointing (same global seed: regenerated dropout masks must match). Returns them."""
    out_ref, grads_ref = run_checkpointed(fn, inputs, "none")
    out, grads = run_checkpointed(fn, inputs, mode)
    assert torch.equal(out, out_ref), mode
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref), mode
    return out, grads


def spied_kernel(monkeypatch, module_name: str, entry_points: tuple[str, ...]):
    """Generator for fixtures: ``tempo_ds.kernels.<module_name>`` under Triton's interpreter on CPU tensors,
    with spies recording which ``entry_points`` ran (in ``calls``). ``triton.jit`` picks the interpreter when
    the kernel module is imported, so the module is reloaded with the variables set (and again after)."""
    pytest.importorskip("triton")
    module = importlib.import_module(f"tempo_ds.kernels.{module_name}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    importlib.reload(module)
    calls = []
    for name in entry_points:
        def spy(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    yield SimpleNamespace(env=monkeypatch, calls=calls, module=module)
    monkeypatch.undo()
    importlib.reload(module)

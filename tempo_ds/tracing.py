"""Which Linear consumes each activation's output, found by running the model once on a tiny batch.

GELU recompute (``gelu=recompute``) and in-place GELU only pay where the activation's output goes straight into
a Linear, which keeps that output for its weight gradient anyway. A dedicated policy names those pairs; for
any other model this module finds them by watching one forward pass:

1. **Trace.** Forward hooks record every output tensor of each candidate activation module, and forward
   pre-hooks record which modules receive which tensors. A pair is proposed when every call's output is the
   very tensor object (not a copy, not a view) that exactly one ``nn.Linear`` / ``Conv1D`` receives, and no
   other module receives it except the Linear's ancestors (BERT's ``output`` module hands it to
   ``output.dense``).
2. **Verify.** Hooks cannot see plain tensor code (``act(x) * y``, a residual add) that reads the output too,
   and moving the activation into the Linear would change what such code reads. So each proposed pair is
   applied on its own (activation -> identity, Linear -> ``GeluLinear``) and the model's outputs must equal
   the untouched model's on the same batch; otherwise the pair is dropped.

The batch is ``model.dummy_inputs`` (transformers' tiny example input). Tracing needs real weights: a model
on the meta device, with ZeRO-3-partitioned parameters or without ``dummy_inputs`` is not traced (the
caller falls back to structural rules). The passes run in eval mode without gradients and restore the
global RNG state, so tracing changes nothing about training.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["trace_activation_consumers", "TraceResult", "why_not_traceable"]


@dataclass
class TraceResult:
    """``pairs``: {activation name: (consumer name, consumer module)}; ``rejected``: {activation name: reason}."""

    pairs: dict[str, tuple[str, nn.Module]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def _is_projection(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def why_not_traceable(model: nn.Module) -> str | None:
    """None when :func:`trace_activation_consumers` can run on ``model``, else the reason it cannot."""
    if not isinstance(getattr(model, "dummy_inputs", None), dict):
        return "the model has no dummy_inputs to trace with"
    for p in model.parameters():
        if p.is_meta or getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE":
            return "its parameters are not materialised (meta device or ZeRO-3 partitioned)"
    return None


def _inputs(model: nn.Module) -> dict:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.dummy_inputs.items()}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


@contextlib.contextmanager
def _quiet_pass(model: nn.Module):
    """Eval mode, no autograd, global RNG state restored afterwards."""
    was_training, rng = model.training, torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_rng_state(rng)
        model.train(was_training)


def _run(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    with _quiet_pass(model):
        return [t.clone() for t in _tensors(model(**batch))]


def _propose(model: nn.Module, candidates: dict[str, nn.Module], batch: dict) -> TraceResult:
    produced: dict[str, list[torch.Tensor]] = {name: [] for name in candidates}
    received: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if name in candidates:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: produced[name].append(out) if isinstance(out, torch.Tensor) else None))
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: received.extend((name, m, t) for t in args if isinstance(t, torch.Tensor))))
    try:
        _run(model, batch)  # the tensors recorded above stay referenced, so no id is reused during the pass
    finally:
        for h in handles:
            h.remove()
    result = TraceResult()
    for name, outputs in produced.items():
        if not outputs:
            result.rejected[name] = "the traced forward pass never called it"
            continue
        ids = {id(t) for t in outputs}
        calls = [(n, m) for n, m, t in received if id(t) in ids and n != name]
        projections = {n: m for n, m in calls if _is_projection(m)}
        if len(projections) != 1:
            what = ", ".join(sorted(projections) or sorted({n for n, _ in calls})) or "no module (plain tensor code)"
            result.rejected[name] = f"traced: its output goes to {what}, not to exactly one Linear"
            continue
        consumer, module = next(iter(projections.items()))
        # modules that only hand the tensor down to the Linear (BERT's `output` calls `output.dense`) are fine;
        # whatever else they do with it, the verification below sees
        others = sorted({n for n, _ in calls if n != consumer and not consumer.startswith(n + ".")})
        if others:
            result.rejected[name] = f"traced: its output goes to {consumer} and also to {', '.join(others)}"
        elif sum(n == consumer for n, _ in calls) != len(outputs):
            result.rejected[name] = f"traced: {consumer} does not read every output of it"
        else:
            result.pairs[name] = (consumer, module)
    return result


def trace_activation_consumers(model: nn.Module, candidates: dict[str, nn.Module],
                               approximate: dict[str, str]) -> TraceResult:
    """Find and verify the (activation, Linear) pairs among ``candidates`` ({name: activation module}) as the
    module docstring describes; ``approximate`` gives each candidate's GELU form for the verification."""
    from .nn.gelu_linear import GeluLinear

    batch = _inputs(model)
    result = _propose(model, candidates, batch)
    if not result.pairs:
        return result
    reference = _run(model, batch)
    for act, (consumer, linear) in list(result.pairs.items()):
        fused = GeluLinear.from_linear(linear, approximate[act])
        swapped = [(act, model.get_submodule(act), nn.Identity()), (consumer, linear, fused)]
        for name, _, new in swapped:
            _set(model, name, new)
        try:
            got = _run(model, batch)
        finally:
            for name, old, _ in swapped:
                _set(model, name, old)
        same = len(got) == len(reference) and all(
            g.shape == r.shape and torch.allclose(g, r, rtol=1e-5, atol=1e-6, equal_nan=True)
            for g, r in zip(got, reference))
        if not same:
            del result.pairs[act]
            result.rejected[act] = (f"traced: moving it into {consumer} changed the model's output, so something "
                                    "else reads its output too")
    return result


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

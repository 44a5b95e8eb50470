"""Session set-up. Without CUDA, Triton kernels run in Triton's interpreter; triton reads TRITON_INTERPRET
when it is first imported (its own helpers are decorated then), so it must be set before any test module
imports triton. Ops still take their PyTorch path unless a test also sets TEMPO_DS_TRITON=1."""
import importlib
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def zero3_gather(monkeypatch):
    """A stand-in for DeepSpeed's ``GatheredParameters``: ``partition(*params)`` marks parameters as ZeRO-3
    partitioned away; ``gathered`` records what each gather was asked for."""
    import deepspeed

    class Status:
        name = "NOT_AVAILABLE"

    gathered = []

    class FakeGather:
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            gathered.append(self.params)

        def __exit__(self, *exc):
            return False

    def partition(*params):
        for p in params:
            p.ds_status = Status()

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", FakeGather)
    return SimpleNamespace(partition=partition, gathered=gathered)


@pytest.fixture
def layer_norm_kernel(monkeypatch):
    """The LayerNorm/RMSNorm kernels under Triton's interpreter on CPU tensors, with spies recording which
    kernel entry points ran. ``triton.jit`` picks the interpreter when the kernel module is imported, so
    the module is reloaded with the variables set (and again after)."""
    pytest.importorskip("triton")
    module = importlib.import_module("tempo_ds.kernels.layer_norm")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TEMPO_DS_TRITON", "1")
    importlib.reload(module)
    calls = []
    for name in ("norm_forward", "norm_backward"):
        def spy(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    yield SimpleNamespace(env=monkeypatch, calls=calls)
    monkeypatch.undo()
    importlib.reload(module)

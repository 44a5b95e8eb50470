"""Session set-up. Without CUDA, Triton kernels run in Triton's interpreter; triton reads TRITON_INTERPRET
when it is first imported (its own helpers are decorated then), so it must be set before any test module
imports triton. Ops still take their PyTorch path unless a test also sets TEMPO_DS_TRITON=1."""
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import spied_kernel  # noqa: E402  (after TRITON_INTERPRET: it imports tempo_ds)


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
    """The LayerNorm/RMSNorm kernels under the interpreter (see ``spied_kernel``)."""
    yield from spied_kernel(monkeypatch, "layer_norm", ("norm_forward", "norm_backward"))

"""Per-op benchmark: tempo_ds op vs the PyTorch op it replaces, side by side in one run.

For each op: bytes saved for backward (counted by the meter, in the context where the saving is real —
e.g. a norm or an activation followed by the Linear that consumes its output), and the forward+backward
time ratio (ours / PyTorch) on this machine, best of ``reps`` interleaved repetitions.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..memory import SavedTensorMeter
from ..presets import DTYPES


@dataclass
class OpResult:
    op: str
    baseline: str
    context: str
    baseline_bytes: int
    tempo_bytes: int
    baseline_ms: float
    tempo_ms: float

    @property
    def time_ratio(self) -> float:
        return self.tempo_ms / self.baseline_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "time_ratio": self.time_ratio}


@dataclass
class Case:
    op: str
    baseline: str
    context: str
    inputs: Callable[[], list[torch.Tensor]]
    torch_fn: Callable
    tempo_fn: Callable


def _saved(fn, inputs) -> int:
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with SavedTensorMeter() as meter:
        out = fn(*leaves)
    del out
    return meter.total_bytes


def _fwd_bwd(fn, inputs) -> float:
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    start = time.perf_counter()
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _best_ms(fns: list, inputs, reps: int) -> list[float]:
    for fn in fns:
        _fwd_bwd(fn, inputs)  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _fwd_bwd(fn, inputs))
    return [b * 1e3 for b in best]


def cases(tokens: int, hidden: int, heads: int, seq: int, dtype: torch.dtype, p: float = 0.1) -> list[Case]:
    """The benchmark cases at one size: ``tokens`` = sequence x batch rows of width ``hidden``."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    inter = 4 * hidden
    batch = max(tokens // seq, 1)
    fc2 = nn.Linear(inter, hidden).to(dtype)
    fc1 = nn.Linear(hidden, hidden).to(dtype)
    frozen = nn.Linear(inter, hidden).to(dtype).requires_grad_(False)
    ln = nn.LayerNorm(hidden).to(dtype)
    rms = LlamaRMSNorm(hidden).to(dtype)

    def x(width):
        return lambda: [torch.randn(tokens, width, dtype=dtype)]

    def qkv():
        return [torch.randn(batch, heads, seq, hidden // heads, dtype=dtype) for _ in range(3)]

    def eager_attention(q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return F.dropout(probs, p) @ v

    return [
        Case("inplace_gelu", "F.gelu", "GELU -> Linear", x(inter),
             lambda t: fc2(F.gelu(t)), lambda t: fc2(ops.inplace_gelu(t))),
        Case("gelu_linear", "F.linear(F.gelu)", "GELU -> Linear (fused)", x(inter),
             lambda t: F.linear(F.gelu(t), fc2.weight, fc2.bias), lambda t: ops.gelu_linear(t, fc2.weight, fc2.bias)),
        Case("fewbit gelu 2-bit", "F.gelu", "GELU -> frozen Linear", x(inter),
             lambda t: frozen(F.gelu(t)), lambda t: frozen(ops.fewbit(t, "gelu", bits=2))),
        Case("inplace_layer_norm", "nn.LayerNorm", "LayerNorm -> Linear", x(hidden),
             lambda t: fc1(ln(t)), lambda t: fc1(ops.inplace_layer_norm(t, (hidden,), ln.weight, ln.bias, ln.eps))),
        Case("inplace_rms_norm", "HF LlamaRMSNorm", "RMSNorm -> Linear", x(hidden),
             lambda t: fc1(rms(t)), lambda t: fc1(ops.inplace_rms_norm(t, rms.weight, rms.variance_epsilon))),
        Case("seed_dropout", "F.dropout", f"dropout p={p}", x(hidden),
             lambda t: F.dropout(t, p), lambda t: ops.seed_dropout(t, p)),
        Case("attention (lean)", "eager attention", f"s={seq}, dropout p={p}", qkv,
             eager_attention, lambda q, k, v: ops.attention(q, k, v, dropout_p=p)),
        Case("attention (lean)", "F.sdpa", f"s={seq}, dropout p={p}", qkv,
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p),
             lambda q, k, v: ops.attention(q, k, v, dropout_p=p)),
        Case("attention (tempo mode)", "eager attention", f"s={seq}, dropout p={p}", qkv,
             eager_attention, lambda q, k, v: ops.attention(q, k, v, dropout_p=p, mode="tempo")),
    ]


def run(tokens: int = 1024, hidden: int = 1024, heads: int = 16, seq: int = 512, dtype: str = "bf16",
        reps: int = 5) -> list[OpResult]:
    results = []
    for case in cases(tokens, hidden, heads, seq, DTYPES[dtype]):
        inputs = case.inputs()
        base_ms, tempo_ms = _best_ms([case.torch_fn, case.tempo_fn], inputs, reps)
        results.append(OpResult(case.op, case.baseline, case.context, _saved(case.torch_fn, inputs),
                                _saved(case.tempo_fn, inputs), base_ms, tempo_ms))
    return results


def markdown(results: list[OpResult]) -> str:
    lines = ["| op | vs | measured in | saved bytes, PyTorch | saved bytes, tempo_ds | bytes ratio | "
             "fwd+bwd ms, PyTorch | fwd+bwd ms, tempo_ds | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.op} | {r.baseline} | {r.context} | {r.baseline_bytes:,} | {r.tempo_bytes:,} | "
                     f"{r.tempo_bytes / r.baseline_bytes:.3f} | {r.baseline_ms:.1f} | {r.tempo_ms:.1f} | "
                     f"{r.time_ratio:.2f} |")
    return "\n".join(lines)


def dump_json(results: list[OpResult], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([r.to_dict() for r in results], f, indent=2)

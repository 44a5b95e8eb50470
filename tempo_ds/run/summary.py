"""``TEMPO_DS_SUMMARY=DIR``: each rank writes ``DIR/rank<N>.json`` about the engines the hook saw being built.

One entry per ``deepspeed.initialize`` call, injected or not: whether and how the model was injected (policy,
settings, modules replaced per technique, the one-line summary), the ZeRO stage, the bytes autograd saved in the
engine's first training forward (``tempo_ds.memory.SavedTensorMeter`` on the engine's module: per transformer
layer and in total) and the step time: the median interval between the starts of consecutive training forwards
over the first 1000 (the first interval, which holds the metered forward and the warm-up, left out), i.e. one
optimizer step when gradient accumulation is 1. Nothing is recorded or timed when the variable is unset.

The file is rewritten after each of the first 100 training forwards, then every 100th (a script may end without interpreter
teardown).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import torch

__all__ = ["ENV", "record", "path"]

ENV = "TEMPO_DS_SUMMARY"
TIMED = 1000  # step time from the first 1000 training forwards
_ENGINES: list[dict] = []


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def path() -> str | None:
    """This rank's summary file, or None when TEMPO_DS_SUMMARY is unset."""
    directory = os.environ.get(ENV)
    return os.path.join(directory, f"rank{_rank()}.json") if directory else None


def _write() -> None:
    target = path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"rank": _rank(), "engines": _ENGINES}, f, indent=1)
    os.replace(tmp, target)


def record(engine: Any, model: Any, report: Any, how: str) -> None:
    """Note an engine just built (``report``: the InjectionReport, None when not injected) and meter its first
    training forward."""
    if not os.environ.get(ENV):
        return
    from ..deepspeed_integration import summary

    entry: dict = {"engine": len(_ENGINES), "injected": report is not None and bool(report.replaced), "how": how,
                   "model": type(model).__name__, "zero_stage": engine.zero_optimization_stage(),
                   "per_layer_bytes": None, "total_bytes": None,
                   "forwards": 0, "step_s": None}
    if report is not None:
        entry.update(policy=report.policy, techniques=report.config.techniques(), replaced=report.counts(),
                     summary=summary(report))
    _ENGINES.append(entry)
    _write()
    _watch_forward(engine, entry)


def _watch_forward(engine: Any, entry: dict) -> None:
    from ..memory import SavedTensorMeter

    forward = engine.forward
    starts: list[float] = []

    def metered_forward(*args, **kwargs):
        if not (engine.module.training and torch.is_grad_enabled()):  # evaluation: neither metered nor timed
            return forward(*args, **kwargs)
        entry["forwards"] = n = entry["forwards"] + 1
        if n <= TIMED:
            starts.append(time.perf_counter())
        if n == 1:
            with SavedTensorMeter(engine.module) as meter:
                out = forward(*args, **kwargs)
            entry["per_layer_bytes"], entry["total_bytes"] = meter.per_layer, meter.total_bytes
        else:
            out = forward(*args, **kwargs)
        if 3 <= n <= TIMED:
            entry["step_s"] = statistics.median(b - a for a, b in zip(starts[1:-1], starts[2:]))
        if n <= 100 or n % 100 == 0:
            _write()
        return out

    engine.forward = metered_forward  # an instance attribute: nn.Module.__call__ looks self.forward up

"""What the bench measures per variant: saved activation bytes (the meter), forward+backward time
(interleaved repetitions) and the largest micro-batch that fits a memory budget."""
from __future__ import annotations

import time

import torch

from .. import presets
from ..profile import Profile, measure
from .max_batch import largest_micro_batch
from .trial import STATE_BYTES_PER_PARAM
from .variants import Variant, applied


def activation_profile(model, variant: Variant, batch: dict, *, arch: str, size: str, dtype: str,
                       seed: int = 0) -> Profile:
    """Bytes autograd saves for backward in one training-mode forward pass of ``model`` with ``variant``
    applied, counted by the SavedTensorMeter (the middle layer gives the per-layer figure)."""
    micro_batch, seq_len = batch["input_ids"].shape
    d = presets.dims(model.config)
    with applied(model, variant):
        torch.manual_seed(seed)
        meter = measure(model, batch)
    return Profile(arch, size, seq_len, micro_batch, dtype, variant.attn, d["layers"], d["hidden"], d["heads"],
                   meter.total_bytes, meter.per_layer, variant=variant.label, tempo=variant.tempo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd_seconds(model, batch: dict, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def step_times(model, variants: list[Variant], batch: dict, *, reps: int = 3, seed: int = 0
               ) -> dict[str, list[float]]:
    """Forward+backward seconds of each variant on the same model and batch: one warm-up pass each, then
    ``reps`` rounds that run every variant once (interleaved, so a change in machine load hits all alike)."""
    device = next(model.parameters()).device
    model.train()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rnd in range(reps + 1):
        for v in variants:
            with applied(model, v):
                torch.manual_seed(seed)
                seconds = _fwd_bwd_seconds(model, batch, device)
            if rnd:
                times[v.name].append(seconds)
    return times


def model_state_bytes(params: int) -> int:
    """Bytes of weights, gradients and AdamW state for ``params`` parameters (STATE_BYTES_PER_PARAM each)."""
    return STATE_BYTES_PER_PARAM * params


def derived_micro_batch(profile: Profile, full_layers: int, params: int, budget_bytes: int) -> dict:
    """The largest micro-batch whose model states and saved activations fit ``budget_bytes``, derived from the
    meter (no allocation is made): floor((budget - 16 B x params) / bytes_per_sample), where bytes_per_sample =
    (bytes outside the layers + full_layers x bytes per layer) / the measured micro-batch. It counts what
    autograd keeps for backward, not transient buffers (logits' gradient, workspaces), so it is an upper bound."""
    states = model_state_bytes(params)
    per_batch = profile.outside_layers_bytes + full_layers * profile.bytes_per_layer
    return {"batch": max(0, (budget_bytes - states) * profile.batch // per_batch), "method": "derived",
            "budget_bytes": budget_bytes, "model_state_bytes": states, "params": params, "layers": full_layers,
            "bytes_per_sample": per_batch / profile.batch}


def gpu_spec(variant: Variant, *, arch: str, size: str, seq: int, dtype: str) -> dict:
    """The trial spec of ``variant`` for ``tempo_ds.bench.max_batch``: the full-depth preset (``layers`` None)."""
    return {"arch": arch, "size": size, "seq": seq, "dtype": dtype, "attn": variant.attn, "layers": None,
            "tempo": variant.tempo}


GPU_MARGIN_BYTES = 2 * 2**30  # kept free of the budget on the card: this process's CUDA context and workspaces


def gpu_budget(budget_bytes: int, device: torch.device) -> int:
    """``budget_bytes``, but no more than the card holds minus GPU_MARGIN_BYTES (the trial processes share the
    card with this one)."""
    return min(budget_bytes, torch.cuda.get_device_properties(device).total_memory - GPU_MARGIN_BYTES)


def measured_micro_batch(spec: dict, budget_bytes: int, device: torch.device) -> dict:
    """The largest micro-batch whose full training step fits ``budget_bytes`` on the GPU: binary search, one
    subprocess per trial, peak of ``torch.cuda.max_memory_allocated`` (``tempo_ds.bench.max_batch``). Trials run
    with fp32 master weights under autocast; this process's cached blocks are released first. A failed search
    is reported (``batch`` None, ``error``), not raised, so the other variants still run."""
    torch.cuda.empty_cache()
    try:
        return largest_micro_batch(spec, budget_bytes, device=str(device))
    except (RuntimeError, TimeoutError) as exc:
        return {"batch": None, "method": "measured", "budget_bytes": budget_bytes, "error": str(exc)[-400:]}

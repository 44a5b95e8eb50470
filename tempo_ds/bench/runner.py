"""``run_bench``: one preset, sequence length and precision; every variant side by side in one run."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from itertools import islice

import torch

from .. import __version__, presets
from . import measure
from .training import final_loss, tail, train
from .variants import BASELINE, applied, applies, liger_reason, not_applied_reason, select

GIB = 2**30


def _full_params(arch: str, size: str, vocab_size: int, seq: int) -> tuple[int, int]:
    """(parameters, layers) of the full-depth preset, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = presets.build_model(arch, size, vocab_size=vocab_size, max_seq=seq)
    return sum(p.numel() for p in model.parameters()), presets.dims(model.config)["layers"]


def _environment(device: torch.device) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tempo_ds": __version__,
            "python": platform.python_version()}


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def run_bench(arch: str = "bert", size: str = "large", *, seq: int = 512, dtype: str = "bf16", batch: int = 2,
              layers: int | None = 2, steps: int = 20, reps: int = 3, lr: float = 1e-4,
              memory_budget_gb: float = 80.0, variants: list[str] | None = None, seed: int = 0,
              device: str | None = None, progress=None) -> dict:
    """Bench one preset: for each variant the saved activation bytes per layer, forward+backward time ratio to
    HF eager, the largest micro-batch that fits ``memory_budget_gb`` GiB (measured on CUDA, derived from the
    meter on CPU) and the loss after ``steps`` AdamW steps on the embedded corpus. The model is built with
    ``layers`` layers (None: the preset's depth); the micro-batch is always for the full-depth preset.
    Bad arguments raise ValueError before any model is built."""
    from ..data import embedded_token_stream, lm_batches, load_tokenizer

    say = progress or (lambda msg: None)
    chosen = select(variants)
    if dtype not in presets.DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(presets.DTYPES)}")
    _check_positive(batch=batch, steps=steps, reps=reps)
    if not memory_budget_gb > 0:
        raise ValueError(f"memory_budget_gb={memory_budget_gb} must be > 0")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be > 0")
    if seq < 2:
        raise ValueError(f"seq={seq} must be >= 2")
    mlm = arch in presets.MLM_ARCHS
    tok = load_tokenizer()
    presets.model_config(arch, size, vocab_size=len(tok), max_seq=seq, layers=layers)  # arch, size, layers
    ids = embedded_token_stream(tok)
    if (seq - 1 if mlm else seq) > ids.numel():
        raise ValueError(f"seq={seq} is too long: the embedded corpus has {ids.numel():,} tokens")
    params, full_layers = _full_params(arch, size, len(tok), seq)
    if layers is not None and layers > full_layers:
        raise ValueError(f"layers={layers} is deeper than the {arch}-{size} preset ({full_layers} layers)")
    budget = int(memory_budget_gb * GIB)
    states = measure.model_state_bytes(params)
    if states >= budget:
        raise ValueError(f"memory budget {memory_budget_gb} GiB is too small for the model states of {arch}-{size}: "
                         f"{params:,} parameters x {measure.STATE_BYTES_PER_PARAM} B = {states / GIB:.2f} GiB; "
                         f"give a budget above {states / GIB:.2f} GiB")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    say(f"building {arch}-{size} with {layers or full_layers} of {full_layers} layers, {dtype}, on {dev}")
    model = presets.build_model(arch, size, dtype=dtype, seed=seed, vocab_size=len(tok), max_seq=seq,
                                layers=layers).to(dev)
    batches = list(islice(lm_batches(ids, seq, batch, mlm=mlm, tokenizer=tok, seed=seed), steps))
    first = {k: v.to(dev) for k, v in batches[0].items()}

    run, skipped = [], []
    for v in chosen:
        reason = liger_reason(model, dev) if v.liger else None
        if reason:
            skipped.append({"name": v.name, "label": v.label, "reason": reason})
            continue
        with applied(model, v) as report:
            if applies(report):
                run.append(v)
            else:
                skipped.append({"name": v.name, "label": v.label, "reason": not_applied_reason(report)})

    rows = {v.name: {"name": v.name, "label": v.label, "kind": v.kind, "attn": v.attn, "tempo": v.tempo} for v in run}
    for v in run:
        say(f"memory: {v.label}")
        prof = measure.activation_profile(model, v, first, arch=arch, size=size, dtype=dtype, seed=seed)
        rows[v.name]["memory"] = {"total_bytes": prof.total_bytes, "per_layer_bytes": prof.per_layer_bytes,
                                  "bytes_per_layer": prof.bytes_per_layer, "sbh_per_layer": prof.sbh_per_layer,
                                  "outside_layers_bytes": prof.outside_layers_bytes,
                                  "outside_layers_sbh": prof.outside_layers_bytes / (seq * prof.batch * prof.hidden)}
        if dev.type == "cuda" and v.liger:  # trials rebuild the model from a spec in a fresh process
            rows[v.name]["max_micro_batch"] = {"batch": None, "method": "measured", "budget_bytes": budget,
                                               "error": "not searched: the trial processes build tempo_ds variants "
                                                        "only (tempo-ds bench-gpu measures Liger at equal batch)"}
        elif dev.type == "cuda":
            say(f"largest micro-batch (GPU binary search): {v.label}")
            spec = measure.gpu_spec(v, arch=arch, size=size, seq=seq, dtype=dtype)
            rows[v.name]["max_micro_batch"] = measure.measured_micro_batch(spec, measure.gpu_budget(budget, dev),
                                                                           dev)
        else:
            rows[v.name]["max_micro_batch"] = measure.derived_micro_batch(prof, full_layers, params, budget)

    say(f"timing: {reps} interleaved rounds of forward+backward over {len(run)} variants")
    times = measure.step_times(model, run, first, reps=reps, seed=seed)
    for v in run:
        say(f"training {steps} steps: {v.label}")
        losses = train(model, batches, steps, tempo=v.tempo, attn=v.attn, liger=v.liger, lr=lr, seed=seed)
        rows[v.name]["time"] = {"times_s": times[v.name], "best_s": min(times[v.name]),
                                "median_s": statistics.median(times[v.name])}
        rows[v.name]["loss"] = {"losses": losses, "final": final_loss(losses)}

    base = rows[BASELINE.name]
    for row in rows.values():
        row["memory"]["vs_baseline"] = row["memory"]["bytes_per_layer"] / base["memory"]["bytes_per_layer"]
        row["time"]["ratio"] = row["time"]["best_s"] / base["time"]["best_s"]
        row["loss"]["delta_rel"] = (row["loss"]["final"] - base["loss"]["final"]) / base["loss"]["final"]
        row["max_micro_batch"]["vs_baseline"] = (row["max_micro_batch"]["batch"] / base["max_micro_batch"]["batch"]
                                                 if base["max_micro_batch"]["batch"]
                                                 and row["max_micro_batch"]["batch"] is not None else None)
    settings = {"arch": arch, "size": size, "seq": seq, "dtype": dtype, "batch": batch,
                "layers": presets.dims(model.config)["layers"], "full_layers": full_layers, "params": params,
                "steps": steps, "loss_last_steps": tail(steps), "reps": reps, "lr": lr, "seed": seed,
                "memory_budget_gb": memory_budget_gb, "memory_budget_bytes": budget,
                "max_micro_batch_method": base["max_micro_batch"]["method"],
                "variants": [v.name for v in chosen]}
    return {"settings": settings, "environment": _environment(dev), "baseline": BASELINE.name,
            "variants": list(rows.values()), "skipped": skipped}

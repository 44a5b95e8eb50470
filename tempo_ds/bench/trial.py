"""One training-step configuration, run in a fresh process: peak memory and speed at one micro-batch.

    python -m tempo_ds.bench.trial --spec '{"arch": "bert", "size": "large", "seq": 512, "dtype": "bf16",
        "attn": "eager", "layers": null, "tempo": {}}' --batch 64

Builds the preset (random weights) with fp32 master parameters, trains under ``torch.autocast`` in the
spec's dtype (fp32: no autocast; fp16 adds a GradScaler), injects tempo_ds when ``spec["tempo"]`` is a
dict (``{}`` = defaults; ``null`` = the untouched model), and runs ``warmup`` full steps (forward,
backward, AdamW step) then ``steps`` timed ones on a batch of the embedded corpus. Prints one JSON line.

Peak memory:

* CUDA (``"method": "measured"``): ``torch.cuda.max_memory_allocated`` over all steps, the peak statistics
  reset once the model, optimizer and batch exist. It includes the parameters, gradients and AdamW states
  (created in the first step: hence at least one warm-up step; two by default, so the timed steps follow a
  step that already had the states). ``alloc_retries`` and ``ooms`` are the caching allocator's
  ``num_alloc_retries`` and ``num_ooms``: a retry means it had to free its cache to satisfy an allocation,
  so memory was nearly full and the step time includes that. An out-of-memory error is reported as
  ``{"fits": false, "oom": true}``; ``"fits": true`` only says that the steps ran.
* CPU (``"method": "derived"``): 16 bytes per parameter of model states (fp32 parameter, gradient and two
  AdamW moments) plus the bytes autograd saves in the forward, counted by ``SavedTensorMeter`` in the
  first warm-up step (on CUDA no meter runs: ``saved_bytes`` is null). Backward temporaries are not in
  this figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

# Bytes of model state per parameter in mixed-precision AdamW training: bf16/fp16 weight and gradient (2 + 2)
# plus fp32 master weight, Adam m and v (4 + 4 + 4); in fp32 training weight, gradient, m and v (4 x 4).
STATE_BYTES_PER_PARAM = 16

SPEC_KEYS = ("arch", "size", "seq", "dtype", "attn", "layers", "tempo")
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def check_spec(spec: dict) -> dict:
    """``spec`` validated: exactly the keys of ``SPEC_KEYS``, a positive ``seq``, a dict or None ``tempo``."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec must be a JSON object with keys {', '.join(SPEC_KEYS)}; got {spec!r}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if missing or unknown:
        raise ValueError(f"spec: missing keys {missing}, unknown keys {unknown}; allowed keys: {', '.join(SPEC_KEYS)}")
    if not isinstance(spec["seq"], int) or spec["seq"] < 1:
        raise ValueError(f"spec: seq={spec['seq']!r} must be an integer >= 1")
    if spec["tempo"] is not None and not isinstance(spec["tempo"], dict):
        raise ValueError(f"spec: tempo={spec['tempo']!r} must be a tempo config dict or null")
    return spec


def trial_batch(arch: str, seq: int, batch: int) -> dict:
    """``tempo_ds.data.sample_batch(arch, tokenizer, seq, batch, seed=0)`` with the embedded corpus' tokenizer."""
    from tempo_ds.data import load_tokenizer, sample_batch

    return sample_batch(arch, load_tokenizer(), seq, batch, seed=0)


def allocator_counts(dev) -> dict:
    """The CUDA caching allocator's ``num_alloc_retries`` and ``num_ooms`` on ``dev`` since the process began."""
    import torch

    stats = torch.cuda.memory_stats(dev)
    return {"alloc_retries": stats.get("num_alloc_retries", 0), "ooms": stats.get("num_ooms", 0)}


def run_trial(spec: dict, batch: int, *, warmup: int = 2, steps: int = 1, device: str | None = None) -> dict:
    """Train ``steps`` timed steps of ``spec`` at micro-batch ``batch`` after ``warmup`` steps; return the
    figures (see the module docstring). Raises ``torch.OutOfMemoryError`` when CUDA runs out of memory."""
    import torch

    from tempo_ds import presets
    from tempo_ds.data import load_tokenizer
    from tempo_ds.inject import inject
    from tempo_ds.memory import SavedTensorMeter

    check_spec(spec)
    if batch < 1 or warmup < 1 or steps < 1:
        raise ValueError(f"batch={batch}, warmup={warmup} and steps={steps} must all be >= 1 (the peak needs "
                         "one warm-up step: AdamW creates its states in the first step)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec["dtype"] not in presets.DTYPES:
        raise ValueError(f"spec: dtype={spec['dtype']!r} is not supported; allowed values: {', '.join(presets.DTYPES)}")
    amp_dtype = None if spec["dtype"] == "fp32" else presets.DTYPES[spec["dtype"]]
    tok = load_tokenizer()
    with dev:  # weights are initialised where they train
        model = presets.build_model(spec["arch"], spec["size"], dtype="fp32", vocab_size=len(tok),
                                    max_seq=spec["seq"], attn=spec["attn"], layers=spec["layers"])
        if spec["tempo"] is not None:
            inject(model, spec["tempo"])
    model.to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=spec["dtype"] == "fp16")
    inputs = {k: v.to(dev) for k, v in trial_batch(spec["arch"], spec["seq"], batch).items()}

    def step(meter: SavedTensorMeter | None = None) -> float:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if meter is None:
                loss = model(**inputs).loss
            else:
                with meter:
                    loss = model(**inputs).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    meter = None if dev.type == "cuda" else SavedTensorMeter(model)  # only the derived peak needs it
    step(meter)
    for _ in range(warmup - 1):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()  # .item() waits for the device
    step_s = (time.perf_counter() - start) / steps
    result = {"batch": batch, "fits": True, "oom": False, "device": str(dev), "params": params,
              "saved_bytes": None if meter is None else meter.total_bytes, "step_s": step_s,
              "tokens_per_s": batch * spec["seq"] / step_s, "loss": loss}
    if dev.type == "cuda":
        result.update(method="measured", peak_bytes=torch.cuda.max_memory_allocated(dev),
                      reserved_bytes=torch.cuda.max_memory_reserved(dev), **allocator_counts(dev))
    else:
        result.update(method="derived", peak_bytes=STATE_BYTES_PER_PARAM * params + meter.total_bytes)
    return result


def main(argv: list[str] | None = None) -> int:
    """The trial process: run one trial and print its figures as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m tempo_ds.bench.trial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help=f"JSON object with keys {', '.join(SPEC_KEYS)}")
    parser.add_argument("--batch", type=int, required=True, help="micro-batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2, at least 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps (default 1)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    import torch

    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as e:
        print(f"error: --spec is not valid JSON: {e}", file=sys.stderr)
        return 2
    try:
        result = run_trial(spec, args.batch, warmup=args.warmup, steps=args.steps, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.OutOfMemoryError, or a library's allocation failing inside CUDA
        if not isinstance(e, torch.OutOfMemoryError) and not any(m in str(e) for m in OOM_MESSAGES):
            raise
        result = {"batch": args.batch, "fits": False, "oom": True, "method": "measured", "peak_bytes": None,
                  **allocator_counts(torch.device(args.device or "cuda"))}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

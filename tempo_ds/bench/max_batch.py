"""The largest micro-batch that fits a memory budget, found by trials: one fresh process per trial.

Each trial (``python -m tempo_ds.bench.trial``) trains a few steps at one micro-batch and reports its peak
memory (measured with ``torch.cuda.max_memory_allocated`` on CUDA, derived from the meter on CPU). A batch
fits when the trial did not run out of memory and its peak is within the budget. The search starts with
trials at ``start`` and ``2 * start``, predicts the answer from their peaks (peak memory grows linearly with
the batch), then grows steps of 1, 2, 4, ... away from the prediction until the answer is bracketed, and
bisects: a good prediction costs two more trials, a bad one a few more.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

from .trial import check_spec

TRIAL_KEYS = ("batch", "fits", "peak_bytes", "reserved_bytes", "oom", "step_s", "tokens_per_s")
STDERR_TAIL = 2000  # characters of a failed trial's stderr quoted in the error


def binary_search(fits: Callable[[int], bool], max_batch: int, guess: int = 1) -> int:
    """The largest b in [1, max_batch] with ``fits(b)``, for a ``fits`` that holds up to some b and not
    above; 0 when ``fits(1)`` is False. Probes ``guess`` (clamped to the range) first, then moves away from
    it in steps of 1, 2, 4, ... (up while batches fit, down while they don't) until the answer is
    bracketed, then bisects. With ``guess=1`` the probes grow 1, 2, 4, 8, ..."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    probe = min(max(guess, 1), max_batch)
    step = 1
    if fits(probe):
        lo, hi = probe, None  # lo fits; hi (the least known misfit) not found yet
        while hi is None and lo < max_batch:
            probe = min(lo + step, max_batch)
            if fits(probe):
                lo = probe
            else:
                hi = probe
            step *= 2
        if hi is None:
            return max_batch
    else:
        lo, hi = None, probe
        while lo is None and hi > 1:
            probe = max(hi - step, 1)
            if fits(probe):
                lo = probe
            else:
                hi = probe
            step *= 2
        if lo is None:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def run_trial(spec: dict, batch: int, *, timeout_s: float = 300, warmup: int = 1, steps: int = 1,
              isolate: bool = True) -> dict:
    """The JSON result of one trial (see ``tempo_ds.bench.trial``) at micro-batch ``batch``, run in a fresh
    Python process (``isolate=False``: in this one, for the CPU's derived figures, which no allocator state
    can change). A failure other than running out of memory raises RuntimeError quoting the trial's stderr."""
    check_spec(spec)
    if not isolate:
        from .trial import run_trial as run_here

        return run_here(spec, batch, warmup=warmup, steps=steps)
    cmd = [sys.executable, "-m", "tempo_ds.bench.trial", "--spec", json.dumps(spec), "--batch", str(batch),
           "--warmup", str(warmup), "--steps", str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"trial at batch {batch} of {json.dumps(spec)} timed out after {timeout_s:.0f} s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    raise RuntimeError(f"trial at batch {batch} of {json.dumps(spec)} failed (exit {proc.returncode}); "
                       f"its stderr ends with:\n{proc.stderr[-STDERR_TAIL:]}")


def largest_micro_batch(spec: dict, budget_bytes: int, *, max_batch: int = 4096, timeout_s: float = 300,
                        start: int = 1, warmup: int = 1, steps: int = 1, isolate: bool = True,
                        deadline: float | None = None) -> dict:
    """The largest micro-batch of ``spec`` (see ``tempo_ds.bench.trial.SPEC_KEYS``) whose trial fits
    ``budget_bytes``: no out-of-memory error and peak memory <= budget. Returns ``{"batch", "peak_bytes",
    "tokens_per_s", "trials", "method", "budget_bytes"}``; ``trials`` lists every trial in the order run
    (``TRIAL_KEYS``; ``reserved_bytes`` only on CUDA), ``batch`` is 0 when batch 1 does not fit.
    ``timeout_s`` bounds each trial; ``deadline`` (a ``time.monotonic()`` value) the whole search: a trial
    that cannot start before it raises TimeoutError."""
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes} must be > 0")
    if not 1 <= start <= max_batch:
        raise ValueError(f"start={start} must be in [1, max_batch={max_batch}]")
    results: dict[int, dict] = {}
    trials: list[dict] = []

    def trial(batch: int) -> dict:
        if batch not in results:
            timeout = timeout_s
            if deadline is not None:
                timeout = min(timeout_s, deadline - time.monotonic())
                if timeout <= 0:
                    raise TimeoutError(f"deadline reached before the trial at batch {batch} of {json.dumps(spec)} "
                                       f"(after {len(trials)} trials)")
            r = run_trial(spec, batch, timeout_s=timeout, warmup=warmup, steps=steps, isolate=isolate)
            r["fits"] = bool(r["fits"]) and r["peak_bytes"] <= budget_bytes
            results[batch] = r
            trials.append({k: r.get(k) for k in TRIAL_KEYS})
        return results[batch]

    def fits(batch: int) -> bool:
        return trial(batch)["fits"]

    guess = start
    if fits(start) and 2 * start <= max_batch and fits(2 * start):
        low, high = results[start]["peak_bytes"], results[2 * start]["peak_bytes"]
        per_sample = (high - low) / start
        guess = max_batch if per_sample <= 0 else 2 * start + int((budget_bytes - high) // per_sample)
    batch = binary_search(fits, max_batch, guess=guess)
    best = results.get(batch, {})
    return {"batch": batch, "peak_bytes": best.get("peak_bytes"), "tokens_per_s": best.get("tokens_per_s"),
            "trials": trials, "method": results[start]["method"],
            "budget_bytes": budget_bytes}

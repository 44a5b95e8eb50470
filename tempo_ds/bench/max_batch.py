"""The largest micro-batch that fits a memory budget, found by trials: one fresh process per trial.

Each trial (``python -m tempo_ds.bench.trial``) trains a few steps at one micro-batch and reports its peak
memory (measured with ``torch.cuda.max_memory_allocated`` on CUDA, derived from the meter on CPU). A batch
fits when the trial did not run out of memory and its peak is within the budget. The search starts with
trials at ``start`` and ``2 * start``, predicts the answer from their peaks (peak memory grows linearly with
the batch), then grows steps of 1, 2, 4, ... away from the prediction until the answer is bracketed, and
bisects: a good prediction costs two more trials, a bad one a few more. A search given a ``deadline`` that
cannot finish before it stops there and returns what it measured, marked incomplete.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

from .trial import check_spec

TRIAL_KEYS = ("batch", "fits", "peak_bytes", "reserved_bytes", "oom", "step_s", "tokens_per_s", "params",
              "alloc_retries", "ooms", "wall_s")
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


def run_trial(spec: dict, batch: int, *, timeout_s: float = 300, warmup: int = 2, steps: int = 1,
              isolate: bool = True, device: str | None = None) -> dict:
    """The JSON result of one trial (see ``tempo_ds.bench.trial``) at micro-batch ``batch`` on ``device``
    (default: cuda when available, else cpu), run in a fresh Python process. ``isolate=False`` runs it in this
    one, which only the CPU allows: its figures are derived, while a CUDA peak would include this process's
    own allocations. Raises TimeoutError when the trial runs past ``timeout_s``, RuntimeError quoting the
    trial's stderr when it fails otherwise than by running out of memory."""
    check_spec(spec)
    if not isolate:
        import torch

        from .trial import run_trial as run_here

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type != "cpu":
            raise ValueError(f"isolate=False runs the trial in this process, which only device='cpu' allows "
                             f"(got {str(dev)!r}): a CUDA peak would include this process's allocations")
        return run_here(spec, batch, warmup=warmup, steps=steps, device="cpu")
    cmd = [sys.executable, "-m", "tempo_ds.bench.trial", "--spec", json.dumps(spec), "--batch", str(batch),
           "--warmup", str(warmup), "--steps", str(steps)] + ([] if device is None else ["--device", device])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"trial at batch {batch} of {json.dumps(spec)} timed out after {timeout_s:.3g} s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    raise RuntimeError(f"trial at batch {batch} of {json.dumps(spec)} failed (exit {proc.returncode}); "
                       f"its stderr ends with:\n{proc.stderr[-STDERR_TAIL:]}")


class _Stopped(Exception):
    """The search's deadline came before its answer; the message says where."""


def largest_micro_batch(spec: dict, budget_bytes: int, *, max_batch: int = 4096, timeout_s: float = 300,
                        start: int = 1, warmup: int = 2, steps: int = 1, isolate: bool = True,
                        device: str | None = None, deadline: float | None = None, trial_s: float = 0.0) -> dict:
    """The largest micro-batch of ``spec`` (see ``tempo_ds.bench.trial.SPEC_KEYS``) whose trial fits
    ``budget_bytes``: no out-of-memory error and peak memory <= budget. Returns ``{"batch", "peak_bytes",
    "tokens_per_s", "trials", "method", "budget_bytes", "complete", "stopped"}``; ``trials`` lists every trial
    in the order run (``TRIAL_KEYS``: ``wall_s`` is its wall time here, process start included;
    ``reserved_bytes``, ``alloc_retries`` and ``ooms`` only on CUDA), ``batch`` is 0 when batch 1 does not fit.

    ``timeout_s`` bounds each trial: one that runs past it raises TimeoutError. ``deadline`` (a
    ``time.monotonic()`` value) bounds the whole search: a trial is not started with less than ``trial_s`` or
    the longest trial so far left, and one still running at the deadline is stopped. The search then returns
    ``"complete": False``, ``stopped`` saying why, and as ``batch`` the largest batch that fitted so far."""
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
                left = deadline - time.monotonic()
                needed = max([trial_s] + [t["wall_s"] for t in trials])
                if left <= 0:
                    raise _Stopped(f"the deadline passed before the trial at batch {batch}")
                if left < needed:
                    raise _Stopped(f"{left:.0f} s before the deadline, too little for the trial at batch {batch} "
                                   f"(one takes about {needed:.0f} s)")
                timeout = min(timeout_s, left)
            began = time.monotonic()
            try:
                r = run_trial(spec, batch, timeout_s=timeout, warmup=warmup, steps=steps, isolate=isolate,
                              device=device)
            except TimeoutError:
                if timeout == timeout_s:
                    raise
                raise _Stopped(f"the trial at batch {batch} was still running at the deadline, after {timeout:.1f} s")
            r["fits"] = bool(r["fits"]) and r["peak_bytes"] <= budget_bytes
            r["wall_s"] = time.monotonic() - began
            results[batch] = r
            trials.append({k: r.get(k) for k in TRIAL_KEYS})
        return results[batch]

    def fits(batch: int) -> bool:
        return trial(batch)["fits"]

    stopped = None
    try:
        guess = start
        if fits(start) and 2 * start <= max_batch and fits(2 * start):
            low, high = results[start]["peak_bytes"], results[2 * start]["peak_bytes"]
            per_sample = (high - low) / start
            guess = max_batch if per_sample <= 0 else 2 * start + int((budget_bytes - high) // per_sample)
        batch = binary_search(fits, max_batch, guess=guess)
    except _Stopped as e:
        stopped = str(e)
        batch = max((b for b, r in results.items() if r["fits"]), default=0)
    best = results.get(batch, {})
    return {"batch": batch, "peak_bytes": best.get("peak_bytes"), "tokens_per_s": best.get("tokens_per_s"),
            "trials": trials, "method": results[start]["method"] if start in results else None,
            "budget_bytes": budget_bytes, "complete": stopped is None, "stopped": stopped}

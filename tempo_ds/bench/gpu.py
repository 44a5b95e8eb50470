"""GPU benchmark of tempo_ds: one script, under 8 minutes on one H200, to run whenever a GPU is available.

    tempo-ds bench-gpu --out $OUT           # CUDA; writes gpu.json and gpu.md, prints the Markdown
    tempo-ds bench-gpu --smoke --out DIR    # tiny sizes on the CPU (Triton's interpreter): the test

(``python -m tempo_ds.bench.gpu`` is the same; docs/gpu-bench.md says how to run it on a lent GPU machine.)

Before anything runs, triton and the kernel modules of ``tempo_ds.kernels`` must import.

Phase 1, kernels: each tempo_ds op on its Triton kernel (``TEMPO_DS_TRITON=1``) and on its PyTorch path
(``TEMPO_DS_TRITON=0``), and the plain PyTorch op it replaces, on the same inputs: the largest error of the
output and of the gradients against a float64 reference, which kernel launchers of ``tempo_ds.kernels`` each
path called, and the median forward+backward time (``passes`` passes queued between one pair of CUDA events,
so one launch's latency is not what is timed; ``perf_counter`` on the CPU). An op that fails is a note in the
report; the others still run.

Phase 2, models: BERT-Large and GPT-2 Large at s=512 in bf16 (fp32 master weights, AdamW), HF eager,
HF sdpa and tempo_ds (defaults): peak memory and tokens/s at an equal micro-batch, the largest micro-batch
within the memory budget (``tempo_ds.bench.max_batch.largest_micro_batch``: one process per trial, peak =
``torch.cuda.max_memory_allocated``) and tokens/s at each run's largest micro-batch, with ratios to HF
eager. The Tempo paper reports up to 2x the batch and +16% throughput on BERT-Large. Order: BERT-Large HF
eager and tempo_ds, then GPT-2 Large's, then HF sdpa, so a short budget drops the least important runs.

Every phase checks the clock: what would run past ``--budget_s`` is skipped with a note, a search that the
deadline cuts short keeps the trials it finished, and both files are rewritten after every measurement, so a
run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GIB = 2**30
KERNEL_SHARE = 0.25        # of --budget_s, at most, for phase 1
TRIAL_ESTIMATE_S = 20      # wall time of one CUDA trial until one is measured: new interpreter, imports, model, steps
SEARCH_RESERVE_TRIALS = 5  # a largest-batch search is not started with less than this many trials' time left

# Sizes: kernels on rows x hidden / rows x inter activations and [B, H, S, D] attention; models at seq, the
# equal micro-batch first. Triton's interpreter has no bfloat16 tl.dot (it multiplies the raw bits), so the
# smoke kernels run in fp16; its trials run in this process (derived figures depend on no allocator state).
GPU = {"kernel_dtype": "bf16", "rows": 16384, "hidden": 1024, "inter": 4096, "attn": (16, 16, 512, 64),
       "warmup": 2, "reps": 20, "passes": 10,
       "models": [("BERT-Large", "bert", "large"), ("GPT-2 Large", "gpt2", "large")],
       "seq": 512, "equal_batch": 8, "max_batch": 4096, "warmup_steps": 2, "steps": 2}
SMOKE = {"kernel_dtype": "fp16", "rows": 32, "hidden": 128, "inter": 256, "attn": (1, 2, 64, 32),
         "warmup": 0, "reps": 1, "passes": 1, "models": [("BERT tiny", "bert", "tiny"), ("GPT-2 tiny", "gpt2", "tiny")],
         "seq": 64, "equal_batch": 2, "max_batch": 256, "warmup_steps": 1, "steps": 1}
SMOKE_BUDGET_GIB = 0.035
DROPOUT_P = 0.1
VARIANTS = {"HF eager": ("eager", None), "HF sdpa": ("sdpa", None), "tempo_ds": ("eager", {})}  # (attn, tempo)
BASELINE = "HF eager"
RUN_FIRST = ("HF eager", "tempo_ds")  # for every model before the other runs: the comparison that matters most
# The Python launchers of the Triton kernels in tempo_ds.kernels, which the ops call on their kernel path
KERNEL_ENTRY_POINTS = {"gelu": ("forward", "backward"), "layer_norm": ("norm_forward", "norm_backward"),
                       "attention": ("attention_forward", "attention_backward"), "dropout": ("apply_seed_mask",),
                       "fewbit": ("forward", "backward")}
INSTALL_HINT = ("the repository's kernels/ folder becomes tempo_ds.kernels only once installed: run "
                "`pip install --no-deps --no-build-isolation -e .` in the repository first (docs/gpu-bench.md)")


def parse_args(argv=None) -> argparse.Namespace:
    """The script's options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out-gpu",
                   help="output folder for gpu.json and gpu.md (default: $OUT, else ./bench-out-gpu)")
    p.add_argument("--budget_s", type=float, default=450, help="wall-clock budget in seconds (default 450)")
    p.add_argument("--budget_gb", type=float, default=None,
                   help="memory budget per trial in GiB (default: the card's memory minus --margin_gb)")
    p.add_argument("--margin_gb", type=float, default=4.0,
                   help="GiB of the card left out of the default budget: CUDA contexts (this process keeps "
                        "its own), fragmentation (default 4)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the script in < 60 s")
    return p.parse_args(argv)


def preflight() -> str | None:
    """None when triton and every module of ``KERNEL_ENTRY_POINTS`` import with their entry points; else the
    error to print."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton does not import ({_brief(e)}): the kernels need it; install the triton that matches torch"
    for name, entry_points in KERNEL_ENTRY_POINTS.items():
        try:
            module = importlib.import_module(f"tempo_ds.kernels.{name}")
        except Exception as e:
            return f"tempo_ds.kernels.{name} does not import ({_brief(e)}); if the module is missing, {INSTALL_HINT}"
        missing = [f for f in entry_points if not callable(getattr(module, f, None))]
        if missing:
            return f"tempo_ds.kernels.{name} has no {', '.join(missing)}: KERNEL_ENTRY_POINTS is out of date"
    return None


# ------------------------------------------------------------------------------------------------
# Phase 1: kernels
# ------------------------------------------------------------------------------------------------
@dataclass
class KernelCase:
    op: str                     # the tempo_ds op
    torch_op: str               # the plain PyTorch op it replaces
    inputs: list                # leaf tensors in the benchmark dtype, all requiring grad
    ours: Callable
    plain: Callable
    reference: Callable         # (float64 inputs, float64 cotangent) -> (output, [input gradients])
    has_kernel: bool = True
    comparable: bool = True     # False when the plain op draws other dropout masks: its error means nothing


@contextlib.contextmanager
def triton_flag(value: str | None):
    """``TEMPO_DS_TRITON`` set to ``value`` (read by the ops at call time; None: left as it is), restored
    afterwards."""
    if value is None:
        yield
        return
    old = os.environ.get("TEMPO_DS_TRITON")
    os.environ["TEMPO_DS_TRITON"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["TEMPO_DS_TRITON"]
        else:
            os.environ["TEMPO_DS_TRITON"] = old


@contextlib.contextmanager
def kernel_calls():
    """The list of the ``KERNEL_ENTRY_POINTS`` (as ``"module.function"``) called inside the block, in order:
    each is wrapped in a counter for the block and restored afterwards."""
    calls: list[str] = []
    originals = []
    for name, entry_points in KERNEL_ENTRY_POINTS.items():
        module = importlib.import_module(f"tempo_ds.kernels.{name}")
        for fn_name in entry_points:
            fn = getattr(module, fn_name)

            def counted(*args, _fn=fn, _name=f"{name}.{fn_name}", **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)
            originals.append((module, fn_name, fn))
            setattr(module, fn_name, counted)
    try:
        yield calls
    finally:
        for module, fn_name, fn in originals:
            setattr(module, fn_name, fn)


def _autograd_reference(fn: Callable) -> Callable:
    def reference(inputs, cot):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(cot)
        return out.detach(), [t.grad for t in leaves]
    return reference


def kernel_cases(cfg: dict, dtype, device, seed: int) -> list[KernelCase]:
    """The ops at the sizes of ``cfg``. Dropout cases call ``torch.manual_seed(seed)`` before each run
    (see ``run_case``), so our op and the reference draw the same mask seed."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tempo_ds import ops
    from tempo_ds.ops import _rng
    from tempo_ds.ops.dropout import fill_keep_mask
    from tempo_ds.ops.fewbit import reference_backward, resolve

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype) \
            .requires_grad_()

    rows, h, inter = cfg["rows"], cfg["hidden"], cfg["inter"]
    B, H, S, D = cfg["attn"]
    eps = 1e-5
    rms = LlamaRMSNorm(h, eps=eps).to(device, dtype)
    with torch.no_grad():
        rms.weight.copy_(randn(h, scale=0.1, shift=1.0))

    def keep_mask(shape, device):
        torch.manual_seed(seed)  # the seed our op draws after the same manual_seed
        flat = torch.empty(math.prod(shape), dtype=torch.bool, device=device)
        return fill_keep_mask(flat, _rng.draw_seed(), DROPOUT_P, 0).view(shape)

    def dropout_ref(inputs, cot):
        (x,) = inputs
        leaf = x.detach().requires_grad_()
        out = leaf * keep_mask(x.shape, x.device) / (1 - DROPOUT_P)
        out.backward(cot)
        return out.detach(), [leaf.grad]

    def attention_ref(inputs, cot):
        leaves = [t.detach().requires_grad_() for t in inputs]
        q, k, v = leaves
        probs = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
        out = (probs * keep_mask(probs.shape, q.device) / (1 - DROPOUT_P)) @ v
        out.backward(cot)
        return out.detach(), [t.grad for t in leaves]

    spec = resolve("gelu", 2)

    def fewbit_ref(inputs, cot):
        (x,) = inputs
        return F.gelu(x), [reference_backward(cot, x, spec)]

    def rms_ref(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ln = [randn(rows, h), randn(h, scale=0.1, shift=1.0), randn(h, scale=0.1)]
    return [
        KernelCase("inplace_gelu", "F.gelu", [randn(rows, inter)], ops.inplace_gelu, F.gelu,
                   _autograd_reference(F.gelu)),
        KernelCase("inplace_gelu tanh", "F.gelu tanh", [randn(rows, inter)],
                   lambda x: ops.inplace_gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"),
                   _autograd_reference(lambda x: F.gelu(x, approximate="tanh"))),
        KernelCase("gelu_linear", "F.linear(F.gelu)",
                   [randn(rows, inter), randn(h, inter, scale=inter**-0.5), randn(h, scale=0.1)],
                   ops.gelu_linear, lambda x, w, b: F.linear(F.gelu(x), w, b),
                   _autograd_reference(lambda x, w, b: F.linear(F.gelu(x), w, b)), has_kernel=False),
        KernelCase("inplace_layer_norm", "F.layer_norm", ln,
                   lambda x, w, b: ops.inplace_layer_norm(x, (h,), w, b, eps),
                   lambda x, w, b: F.layer_norm(x, (h,), w, b, eps),
                   _autograd_reference(lambda x, w, b: F.layer_norm(x, (h,), w, b, eps))),
        KernelCase("inplace_rms_norm", "HF LlamaRMSNorm", [randn(rows, h), rms.weight],
                   lambda x, w: ops.inplace_rms_norm(x, w, eps),
                   lambda x, w: rms(x),  # w is rms.weight itself: no parameter to bind per call
                   _autograd_reference(rms_ref)),
        KernelCase(f"attention (lean), dropout {DROPOUT_P}", f"F.sdpa, dropout {DROPOUT_P}",
                   [randn(B, H, S, D) for _ in range(3)],
                   lambda q, k, v: ops.attention(q, k, v, dropout_p=DROPOUT_P),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT_P),
                   attention_ref, comparable=False),
        KernelCase(f"seed_dropout p={DROPOUT_P}", "F.dropout", [randn(rows, h)],
                   lambda x: ops.seed_dropout(x, DROPOUT_P), lambda x: F.dropout(x, DROPOUT_P),
                   dropout_ref, comparable=False),
        KernelCase("fewbit gelu 2-bit", "F.gelu", [randn(rows, inter)], lambda x: ops.fewbit(x, "gelu", 2),
                   F.gelu, fewbit_ref, comparable=False),
    ]


def _fwd_bwd(fn, flag, inputs, cot, seed):
    """Output and input gradients of ``fn`` (forward and backward under ``TEMPO_DS_TRITON=flag``)."""
    import torch

    with triton_flag(flag):
        torch.manual_seed(seed)
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, cot)
    return out.detach(), list(grads)


def _max_err(results, ref) -> tuple[float, float]:
    out, grads = results
    ref_out, ref_grads = ref
    out_err = (out.double() - ref_out).abs().max().item()
    grad_err = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return out_err, grad_err


def _timed_ms(fn, flag, inputs, cot, seed, passes: int, device) -> float:
    """Milliseconds per forward+backward: ``passes`` of them queued between one pair of CUDA events
    (``perf_counter`` on the CPU). The gradients are returned, not accumulated, and dropped at once."""
    import torch

    with triton_flag(flag):
        torch.manual_seed(seed)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(passes):
                torch.autograd.grad(fn(*inputs), inputs, cot)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / passes
        start_s = time.perf_counter()
        for _ in range(passes):
            torch.autograd.grad(fn(*inputs), inputs, cot)
        return (time.perf_counter() - start_s) * 1e3 / passes


def run_case(case: KernelCase, cfg: dict, device, seed: int) -> dict:
    """Errors against float64, the kernel launchers called (``{path}_kernels``) and the median fwd+bwd ms of
    the Triton path, the PyTorch path and the plain op."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        out_shape = case.plain(*case.inputs).shape
    cot = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device, case.inputs[0].dtype)
    ref = case.reference([t.detach().double() for t in case.inputs], cot.double())
    paths = {"triton": (case.ours, "1")} if case.has_kernel else {}
    paths.update(pytorch=(case.ours, "0"), torch=(case.plain, None))
    row: dict = {"op": case.op, "torch_op": case.torch_op}
    for name in ("triton", "pytorch", "torch"):
        row[f"{name}_out_err"] = row[f"{name}_grad_err"] = row[f"{name}_kernels"] = None
        if name in paths:
            fn, flag = paths[name]
            with kernel_calls() as calls:
                result = _fwd_bwd(fn, flag, case.inputs, cot, seed)
            row[f"{name}_kernels"] = sorted(set(calls))
            if name != "torch" or case.comparable:
                row[f"{name}_out_err"], row[f"{name}_grad_err"] = _max_err(result, ref)
            del result
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(cfg["warmup"] + cfg["reps"]):
        for name, (fn, flag) in paths.items():  # interleaved: clock and load changes hit every path alike
            ms = _timed_ms(fn, flag, case.inputs, cot, seed, cfg["passes"], device)
            if rep >= cfg["warmup"]:
                times[name].append(ms)
    for name in ("triton", "pytorch", "torch"):
        row[f"{name}_ms"] = statistics.median(times[name]) if name in times else None
    return row


def kernel_phase(cases: list[KernelCase], cfg: dict, device, deadline: float, notes: list, rows: list,
                 save: Callable) -> None:
    """Phase 1: one row per case (see ``run_case``) appended to ``rows``; a case that raises is a note
    naming it and its error, and one that would start after ``deadline`` is skipped with a note."""
    for case in cases:
        if time.monotonic() > deadline:
            notes.append(f"kernels: {case.op} skipped, the kernel phase's share of --budget_s was spent")
            continue
        try:
            rows.append(run_case(case, cfg, device, seed=0))
            _log(f"kernel {case.op}: done")
        except Exception as e:
            notes.append(f"kernels: {case.op} failed: {_brief(e)}")
            _log(f"kernel {case.op} failed:\n{traceback.format_exc()}")
        save()


# ------------------------------------------------------------------------------------------------
# Phase 2: models
# ------------------------------------------------------------------------------------------------
def model_phase(cfg: dict, dtype: str, budget_bytes: int, device, deadline: float, trial_estimate_s: float,
                notes: list, rows: list, save: Callable) -> None:
    """Phase 2: for each model and run, the largest micro-batch search, starting at the equal micro-batch
    (whose trial gives the equal-batch figures); trials in fresh processes on CUDA, in this one on the CPU.
    Baseline and tempo_ds of every model go first. A search starts only with ``SEARCH_RESERVE_TRIALS``
    trials' time left, a trial taking the longest one measured so far (``trial_estimate_s`` before any)."""
    from tempo_ds.bench.max_batch import largest_micro_batch

    order = [(m, v) for m in cfg["models"] for v in RUN_FIRST]
    order += [(m, v) for v in VARIANTS if v not in RUN_FIRST for m in cfg["models"]]
    walls: list[float] = []
    for (label, arch, size), variant in order:
        attn, tempo = VARIANTS[variant]
        trial_s = max(walls, default=trial_estimate_s)
        left = deadline - time.monotonic()
        if left <= 0 or left < SEARCH_RESERVE_TRIALS * trial_s:
            notes.append(f"models: {label} {variant} skipped, {max(left, 0):.0f} s of --budget_s left "
                         f"(a search needs about {SEARCH_RESERVE_TRIALS} x {trial_s:.0f} s)")
            continue
        spec = {"arch": arch, "size": size, "seq": cfg["seq"], "dtype": dtype, "attn": attn, "layers": None,
                "tempo": tempo}
        try:
            found = largest_micro_batch(spec, budget_bytes, max_batch=cfg["max_batch"], start=cfg["equal_batch"],
                                        warmup=cfg["warmup_steps"], steps=cfg["steps"],
                                        isolate=device.type == "cuda", device=device.type, deadline=deadline,
                                        trial_s=trial_s)
        except Exception as e:  # a trial that crashed, or hung past its own timeout
            notes.append(f"models: {label} {variant} failed: {_brief(e)}")
            _log(traceback.format_exc())
            continue
        trials = found["trials"]
        walls += [t["wall_s"] for t in trials]
        if not found["complete"]:
            notes.append(f"models: {label} {variant}: search stopped after {len(trials)} trials, {found['stopped']}; "
                         "its largest micro-batch is the largest that fitted so far, a lower bound")
        if not trials:
            continue
        by_batch = {t["batch"]: t for t in trials}
        equal, largest = by_batch[cfg["equal_batch"]], by_batch.get(found["batch"], {})  # the first trial; 0: none
        rows.append({"model": label, "arch": arch, "size": size, "variant": variant, "attn": attn, "tempo": tempo,
                     "params": next((t["params"] for t in trials if t["params"]), None),
                     "method": found["method"], "complete": found["complete"], "equal_batch": cfg["equal_batch"],
                     "equal_fits": equal["fits"], "equal_peak_bytes": equal["peak_bytes"],
                     "equal_reserved_bytes": equal["reserved_bytes"],
                     "equal_tokens_per_s": equal["tokens_per_s"], "equal_alloc_retries": equal["alloc_retries"],
                     "largest_batch": found["batch"], "largest_peak_bytes": found["peak_bytes"],
                     "largest_tokens_per_s": found["tokens_per_s"],
                     "largest_alloc_retries": largest.get("alloc_retries"),
                     "search_s": sum(t["wall_s"] for t in trials), "trials": trials})
        _log(f"model {label} {variant}: largest micro-batch {found['batch']} ({len(trials)} trials, "
             f"{'complete' if found['complete'] else 'stopped'})")
        save()


def ratios(rows: list[dict]) -> list[dict]:
    """Each run against HF eager of the same model: largest batch and tokens/s there (None unless both searches
    completed), tokens/s and peak at the equal batch."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    base = {r["model"]: r for r in rows if r["variant"] == BASELINE}
    out = []
    for r in rows:
        b = base.get(r["model"])
        if b is None or r is b:
            continue
        both = r["complete"] and b["complete"]  # a stopped search's largest batch is only a lower bound
        out.append({"model": r["model"], "variant": r["variant"],
                    "largest_batch": ratio(r["largest_batch"], b["largest_batch"]) if both else None,
                    "equal_tokens_per_s": ratio(r["equal_tokens_per_s"], b["equal_tokens_per_s"]),
                    "largest_tokens_per_s":
                        ratio(r["largest_tokens_per_s"], b["largest_tokens_per_s"]) if both else None,
                    "equal_peak_bytes": ratio(r["equal_peak_bytes"], b["equal_peak_bytes"])})
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.3g}"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _retried(text: str, retries) -> str:
    return f"{text}*" if retries else text


def _kernels(names) -> str:
    if names is None:
        return "-"
    return ", ".join(names) if names else "NONE"


def _display_order(rows: list[dict]) -> list[dict]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(rows, key=lambda r: (models.index(r["model"]), list(VARIANTS).index(r["variant"])))


def markdown(doc: dict) -> str:
    """The Markdown report: header, kernel table, model table, ratio table, notes."""
    k, m = doc["kernels"], doc["models"]
    eq, sizes = m["equal_batch"], k["sizes"]
    shapes = (f"activations {sizes['rows']} x {sizes['hidden']} and {sizes['rows']} x {sizes['inter']}, attention "
              + " x ".join(map(str, sizes["attn"])) + " (batch, heads, seq, head dim)")
    lines = [f"# tempo_ds GPU benchmark{' (smoke)' if doc['smoke'] else ''}", "",
             f"Date: {doc['date']}. Card: {doc['card']}. Python {doc['python']}, torch {doc['torch']} "
             f"(CUDA {doc['cuda'] or 'none'}), triton {doc['triton']}, transformers {doc['transformers']}. "
             f"TEMPO_DS_TRITON: {doc['tempo_ds_triton'] or 'unset'} (the tempo_ds trials inherit it). "
             f"Command: `{doc['command']}`; {doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget.", "",
             f"## Kernels ({k['dtype']}; {shapes})", "",
             "Max |error| against a float64 reference on the same inputs (output; input gradients), the median "
             f"forward+backward time (each timing over {k['passes']} queued passes) and the Triton kernel launchers "
             "the Triton "
             "path called (NONE: no kernel ran). Triton = the op's Triton kernel, PyTorch path = the same op with "
             "`TEMPO_DS_TRITON=0`, torch = the PyTorch op it replaces (its error is left out where it draws other "
             "dropout masks; few-bit's reference is its own table).", "",
             "| op | replaces | out err Triton | out err PyTorch path | out err torch | grad err Triton | "
             "grad err PyTorch path | grad err torch | ms Triton | ms PyTorch path | ms torch | Triton / torch time "
             "| kernels run by the Triton path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
        speed = r["triton_ms"] / r["torch_ms"] if r["triton_ms"] is not None and r["torch_ms"] else None
        lines.append(f"| {r['op']} | {r['torch_op']} | {_fmt(r['triton_out_err'])} | {_fmt(r['pytorch_out_err'])} | "
                     f"{_fmt(r['torch_out_err'])} | {_fmt(r['triton_grad_err'])} | {_fmt(r['pytorch_grad_err'])} | "
                     f"{_fmt(r['torch_grad_err'])} | {_fmt(r['triton_ms'], '.3f')} | {_fmt(r['pytorch_ms'], '.3f')} | "
                     f"{_fmt(r['torch_ms'], '.3f')} | {_fmt(speed, '.2f')} | {_kernels(r['triton_kernels'])} |")
    lines += ["", f"## Models (s={m['seq']}, {m['dtype']} autocast, fp32 master weights, AdamW)", "",
              f"Vocabulary {m['vocab']} (the embedded corpus' tokenizer, not the original models' own, so the "
              "parameter counts are below theirs). "
              f"Memory budget per trial: {m['budget_bytes'] / GIB:.2f} GiB ({m['budget_source']}). Peak = "
              + ("`torch.cuda.max_memory_allocated` over the warm-up and timed steps, one process per trial. "
                 "`*`: the caching allocator had to free its cache and retry an allocation in that trial "
                 "(memory nearly full; its time includes the retries)."
                 if m["method"] == "measured" else
                 "derived on the CPU: 16 B/parameter of model states + bytes saved for backward (meter).")
              + ("" if all(r["complete"] for r in m["rows"]) else
                 " `>=`: a search stopped by the deadline, its largest batch so far (see the notes)."), "",
              f"| model | params | run | peak GiB at batch {eq} | reserved GiB at batch {eq} | "
              f"tokens/s at batch {eq} | largest micro-batch | peak GiB there | tokens/s there | trials (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _display_order(m["rows"]):
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        largest = f"{r['largest_batch']}" if r["complete"] else f">= {r['largest_batch']}"
        lines.append(f"| {r['model']} | {params} | {r['variant']} | "
                     f"{_retried(_gib(r['equal_peak_bytes']), r['equal_alloc_retries'])} | "
                     f"{_gib(r['equal_reserved_bytes'])} | "
                     f"{_retried(_fmt(r['equal_tokens_per_s'], ',.0f'), r['equal_alloc_retries'])} | {largest} | "
                     f"{_retried(_gib(r['largest_peak_bytes']), r['largest_alloc_retries'])} | "
                     f"{_retried(_fmt(r['largest_tokens_per_s'], ',.0f'), r['largest_alloc_retries'])} | "
                     f"{len(r['trials'])} ({r['search_s']:.0f}) |")
    lines += ["", "Ratios to HF eager of the same model (the Tempo paper: up to 2x batch, +16% throughput on "
              "BERT-Large; `-`: not computable, e.g. a search stopped by the deadline):", "",
              "| model | run | largest micro-batch | tokens/s at equal batch | tokens/s at each largest batch | "
              "peak memory at equal batch |", "|---|---|---|---|---|---|"]
    for r in _display_order(m["ratios"]):
        lines.append(f"| {r['model']} | {r['variant']} | {_times(r['largest_batch'])} | "
                     f"{_times(r['equal_tokens_per_s'])} | {_times(r['largest_tokens_per_s'])} | "
                     f"{_times(r['equal_peak_bytes'])} |")
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path) -> str:
    """Write gpu.json and gpu.md into ``out``; return the Markdown."""
    text = markdown(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "gpu.md").write_text(text, encoding="utf-8")
    return text


def _brief(e: BaseException) -> str:
    """``Type: message`` on one line, at most 400 characters (Triton's compile errors run to pages)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 400 else text[:397] + "..."


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    """Run the phases within --budget_s and write gpu.json and gpu.md; 2 when the kernels cannot be imported."""
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: no CUDA device; on a CPU only --smoke runs", file=sys.stderr)
        return 2
    if cuda and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 runs the Triton kernels in Python on the CPU: on a GPU their timings "
              "would mean nothing; unset it", file=sys.stderr)
        return 2
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (by the preflight)
    problem = preflight()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from tempo_ds.data import embedded_token_stream, load_tokenizer
    from tempo_ds.presets import DTYPES

    cfg = SMOKE if args.smoke else GPU
    device = torch.device("cuda" if cuda else "cpu")
    if args.budget_gb is not None:
        budget, source = int(args.budget_gb * GIB), "--budget_gb"
    elif cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        budget, source = int(total - args.margin_gb * GIB), f"card total {total / GIB:.2f} GiB - {args.margin_gb} GiB"
    else:
        budget, source = int(SMOKE_BUDGET_GIB * GIB), "smoke default"
    tok = load_tokenizer()
    embedded_token_stream(tok)  # tokenizer and corpus ids cached on disk here, not by the first trial
    out = Path(args.out)
    notes: list[str] = []
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    doc = {"date": datetime.date.today().isoformat(), "card": card, "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
           "transformers": _version("transformers"), "tempo_ds_triton": os.environ.get("TEMPO_DS_TRITON"),
           "smoke": args.smoke, "budget_s": args.budget_s,
           "command": "tempo-ds bench-gpu " + " ".join(sys.argv[1:] if argv is None else argv),
           "elapsed_s": 0.0, "notes": notes,
           "kernels": {"dtype": cfg["kernel_dtype"], "passes": cfg["passes"], "rows": [],
                       "sizes": {k: cfg[k] for k in ("rows", "hidden", "inter", "attn")}},
           "models": {"seq": cfg["seq"], "dtype": "bf16", "vocab": len(tok), "equal_batch": cfg["equal_batch"],
                      "method": "measured" if cuda else "derived", "budget_bytes": budget,
                      "budget_source": source, "rows": [], "ratios": []}}

    def save() -> None:
        doc["elapsed_s"] = time.monotonic() - started
        doc["models"]["ratios"] = ratios(doc["models"]["rows"])
        write(doc, out)

    kernel_phase(kernel_cases(cfg, DTYPES[cfg["kernel_dtype"]], device, seed=0), cfg, device,
                 started + KERNEL_SHARE * args.budget_s, notes, doc["kernels"]["rows"], save)
    if cuda:
        try:
            torch.cuda.empty_cache()  # the inputs of phase 1 are gone; the trials of phase 2 run in other processes
        except RuntimeError as e:  # a kernel that faulted leaves this process's CUDA context unusable
            notes.append(f"kernels: torch.cuda.empty_cache() failed after phase 1 ({_brief(e)})")
    model_phase(cfg, "bf16", budget, device, deadline, TRIAL_ESTIMATE_S if cuda else 0.0, notes,
                doc["models"]["rows"], save)
    save()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

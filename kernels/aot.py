"""Compile every Triton kernel of tempo_ds ahead of time for sm_80 (A100) and sm_90 (H100/H200), without a GPU.

Each ``kernels/<op>.py`` lists the specializations its CUDA dispatch launches (``aot_specializations``, see
``kernels/_spec.py``). This module compiles each one for a named target::

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": ..., "num_stages": ...})

which runs on the CPU: Triton lowers to PTX itself and its wheel ships ``ptxas``. For each specialization it
reports the shared memory one program needs (``metadata.shared``), the registers per thread and the stack
frame per thread read from the cubin with the bundled ``cuobjdump -res-usage``, the bytes of spill stores
from ptxas' own ``-v`` report (the stack frame also holds register arrays indexed at run time, which are not
spills), and whether the shared memory fits the target's per-block limit (a launch
that does not fit raises ``OutOfResources`` on the GPU).

The kernels must be the compiled kind: run this with ``TRITON_INTERPRET`` unset or 0 (``@triton.jit`` picks
the interpreter when a kernel module is imported). :func:`run_subprocess` starts a clean process for that, as
the tests do (their conftest sets ``TRITON_INTERPRET=1``).

Command line: ``tempo-ds aot [--full] [--arch 80,90] [--jobs N] [--json PATH]`` or
``python -m tempo_ds.kernels.aot`` with the same options.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from tempo_ds.kernels._launch import SHARED_MEMORY

__all__ = ["ARCHS", "MODULES", "specializations", "compile_one", "run", "run_subprocess", "table", "summary",
           "main"]

ARCHS = (80, 90)
# Kernel modules, in report order (a module that does not exist yet is skipped).
MODULES = ("attention", "dropout", "fewbit", "gelu", "layer_norm", "gated_mlp")
_SPECS: list[tuple[str, int, dict]] = []  # (module, arch, spec): inherited by forked workers


def specializations(full: bool = False, archs=ARCHS, only=None) -> list[tuple[str, int, dict]]:
    """``(module, arch, spec)`` for every kernel module's ``aot_specializations(full, arch=arch)`` (or the modules
    named in ``only``)."""
    unknown = set(only or ()) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown kernel modules {sorted(unknown)}; allowed: {', '.join(MODULES)}")
    out = []
    for module_name in MODULES:
        if only and module_name not in only:
            continue
        if importlib.util.find_spec(f"tempo_ds.kernels.{module_name}") is None:
            continue
        module = importlib.import_module(f"tempo_ds.kernels.{module_name}")
        lister = getattr(module, "aot_specializations", None)
        if lister is None:
            raise RuntimeError(f"tempo_ds.kernels.{module_name} has no aot_specializations(full=False)")
        takes_arch = "arch" in inspect.signature(lister).parameters
        for arch in archs:
            for spec in (lister(full=full, arch=arch) if takes_arch else lister(full=full)):
                out.append((module_name, arch, spec))
    return out


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread from ``cuobjdump -res-usage`` on the cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


@contextlib.contextmanager
def _ptxas_log(buffer):
    """Compile afresh (no cache hit) with ptxas' ``-v`` report printed, and capture it: the report is the only
    place that tells spilled registers from other stack use (e.g. dynamically indexed register arrays)."""
    try:
        from triton import knobs

        scopes = (knobs.nvidia.scope(), knobs.compilation.scope())
    except (ImportError, AttributeError):  # an older triton: its environment variables
        scopes = ()
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope)
        if scopes:
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
        else:
            os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
        stack.enter_context(contextlib.redirect_stdout(buffer))
        yield


def compile_one(module: str, arch: int, spec: dict) -> dict:
    """Compile one specialization for ``sm_<arch>``; a result row (``ok``, ``error``, ``shared``, ``limit``,
    ``fits``, ``regs``, ``stack``, ``seconds``, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = spec["fn"]
    row = {"module": module, "name": spec["name"], "arch": arch, "limit": SHARED_MEMORY[arch],
           **spec.get("options", {}), "ok": False, "error": None, "shared": None, "fits": False,
           "regs": None, "stack": None, "spill_stores": None, "spill_loads": None}
    if not isinstance(fn, JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; compile them in a process "
                           "without it (tempo_ds.kernels.aot.run_subprocess)")
    args = list(spec["signature"])
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args)
             if spec["signature"][a].startswith("*") or a in spec.get("divisible_by_16", ())}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with _ptxas_log(log):
            compiled = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], attrs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(spec.get("options", {})))
        row["shared"] = int(compiled.metadata.shared)
        row["regs"], row["stack"] = _resources(compiled.asm["cubin"])
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if spills:
            row["spill_stores"], row["spill_loads"] = int(spills.group(1)), int(spills.group(2))
        row["ok"] = True
        row["fits"] = row["shared"] <= row["limit"]
    except Exception as exc:  # a compile error is a result to report, not a crash
        row["error"] = _describe(exc)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _describe(exc: BaseException) -> str:
    """The root cause of a compile error in one line (a CompilationError wraps e.g. the NameError of a global)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if type(exc).__name__ == "CompilationError" and len(lines) > 1:  # "at L:C:", source lines, caret
        text = f"{lines[0]} {lines[-2] if lines[-1] == '^' else lines[-1]}"
    else:
        text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _compile_index(i: int) -> dict:
    return compile_one(*_SPECS[i])


def run(full: bool = False, archs=ARCHS, jobs: int | None = None, progress=None, only=None) -> list[dict]:
    """Compile every specialization for every arch (``jobs`` worker processes); result rows in spec order."""
    global _SPECS
    for arch in archs:
        if arch not in SHARED_MEMORY:
            raise ValueError(f"arch={arch} is not one of {sorted(SHARED_MEMORY)}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud
    _SPECS = specializations(full, archs, only)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(_SPECS) or 1))
    if jobs == 1:
        rows = []
        for i in range(len(_SPECS)):
            rows.append(_compile_index(i))
            if progress:
                progress(rows[-1], len(rows), len(_SPECS))
        return rows
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = [None] * len(_SPECS)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(_compile_index, i): i for i in range(len(_SPECS))}
        from concurrent.futures import as_completed

        for done, fut in enumerate(as_completed(futures), 1):
            rows[futures[fut]] = fut.result()
            if progress:
                progress(rows[futures[fut]], done, len(_SPECS))
    return rows


def run_subprocess(full: bool = False, archs=ARCHS, jobs: int | None = None, timeout: float | None = None,
                   only=None) -> list[dict]:
    """:func:`run` in a fresh Python process with ``TRITON_INTERPRET`` unset (safe to call from tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tempo_ds.kernels.aot", "--json", "-", "--arch", ",".join(map(str, archs))]
    if full:
        cmd.append("--full")
    if jobs:
        cmd += ["--jobs", str(jobs)]
    if only:
        cmd += ["--only", ",".join(only)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def failures(rows: list[dict]) -> list[dict]:
    """Rows that did not compile or do not fit the target's shared memory."""
    return [r for r in rows if not (r["ok"] and r["fits"])]


def _or_dash(n) -> str:
    return "-" if n is None else str(n)


def _kb(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def table(rows: list[dict]) -> str:
    """One Markdown line per specialization and arch."""
    lines = ["| kernel | arch | warps | stages | shared KB | limit KB | regs | spill stores B | stack B | s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "ok" if r["ok"] and r["fits"] else (r["error"] or "exceeds shared memory")
        lines.append(f"| {r['name']} | sm_{r['arch']} | {r.get('num_warps', '-')} | {r.get('num_stages', '-')} | "
                     f"{_kb(r['shared'])} | {_kb(r['limit'])} | {_or_dash(r['regs'])} | {_or_dash(r['spill_stores'])} | "
                     f"{_or_dash(r['stack'])} | {r['seconds']} | {status} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One Markdown line per kernel module and arch: specializations, failures, the largest shared memory,
    registers, spill stores and stack frame, and how many specializations spill."""
    lines = ["| module | arch | specializations | failures | max shared KB | max regs | max spill stores B | "
             "max stack B | spilling | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["module"], r["arch"]) for r in rows}, key=lambda k: (MODULES.index(k[0]), k[1]))
    for module, arch in keys:
        group = [r for r in rows if r["module"] == module and r["arch"] == arch]
        ok = [r for r in group if r["ok"]]

        def top(field):
            values = [r[field] for r in ok if r[field] is not None]
            return max(values) if values else None

        lines.append(f"| {module} | sm_{arch} | {len(group)} | {len(failures(group))} | {_kb(top('shared'))} | "
                     f"{_or_dash(top('regs'))} | {_or_dash(top('spill_stores'))} | {_or_dash(top('stack'))} | "
                     f"{sum(1 for r in ok if r['spill_stores'])} | {sum(r['seconds'] for r in group):.1f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the whole matrix (default: the representative CI subset)")
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90; "
                   f"known: {','.join(map(str, sorted(SHARED_MEMORY)))})")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--only", default=None, metavar="MODULES", help="comma-separated kernel modules (default: all of "
                   f"{','.join(MODULES)})")
    p.add_argument("--json", metavar="PATH", default=None, help="write the result rows as JSON ('-' = stdout only)")
    p.add_argument("--all-rows", action="store_true", help="print every specialization, not only the summary "
                   "and the failures")


def parse_archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        archs = ()
    if not archs or any(a not in SHARED_MEMORY for a in archs):
        raise ValueError(f"--arch={text!r}: give comma-separated compute capabilities from "
                         f"{','.join(map(str, sorted(SHARED_MEMORY)))}")
    return archs


def execute(args) -> int:
    """Run the compile check for parsed arguments; exit status 1 when any specialization fails."""
    archs = parse_archs(args.arch)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs} must be >= 1")
    only = tuple(m for m in args.only.split(",") if m) if args.only else None
    to_stdout = args.json == "-"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        rows = run_subprocess(args.full, archs, args.jobs, only=only)
    else:
        start = time.perf_counter()
        rows = run(args.full, archs, args.jobs, only=only)
        if not to_stdout:
            print(f"compiled {len(rows)} specializations for {', '.join(f'sm_{a}' for a in archs)} in "
                  f"{time.perf_counter() - start:.1f} s")
    if to_stdout:
        print(json.dumps(rows))
    else:
        print(summary(rows))
        bad = failures(rows)
        shown = rows if args.all_rows else bad
        if shown:
            print()
            print(table(shown))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return 1 if failures(rows) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tempo_ds.kernels.aot", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return execute(p.parse_args(argv))
    except ValueError as exc:
        print(f"aot: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

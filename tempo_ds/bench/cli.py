"""``tempo-ds bench``: one preset, every variant side by side; writes bench.json, bench.md and bench.png."""
from __future__ import annotations

import shlex
import sys
import time

from .. import presets


def add_parser(subparsers) -> None:
    """Add the ``bench`` sub-command to the ``tempo-ds`` parser's sub-parsers."""
    from .variants import VARIANTS

    p = subparsers.add_parser(
        "bench", help="HF eager / sdpa vs tempo_ds (each technique, all): memory, time, batch, loss",
        description="For one preset, sequence length and precision, side by side in one run: HF eager (the "
        "baseline), HF sdpa, tempo_ds with each technique alone (those that apply to the model) and with all "
        "exact techniques. Per variant: saved activation bytes per layer (sbh), forward+backward time ratio to "
        "HF eager, the largest micro-batch that fits the memory budget (measured by binary search on CUDA, "
        "derived from the meter on CPU) and the loss after --steps AdamW steps on the embedded corpus. "
        "Writes bench.json, bench.md and bench.png into --out and prints the table.")
    p.add_argument("--arch", default="bert", help=f"one of {', '.join(presets.ARCHS)} (default bert)")
    p.add_argument("--size", default="large", help=f"one of {', '.join(presets.SIZES)} (default large)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--dtype", default="bf16", help=f"one of {', '.join(presets.DTYPES)} (default bf16)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch of the measured runs (default 2)")
    p.add_argument("--layers", type=int, default=2, help="depth of the model built for memory, time and loss "
                   "(default 2; 0 = the preset's depth); the max micro-batch is always for the full depth")
    p.add_argument("--steps", type=int, default=20, help="training steps for the loss column (default 20)")
    p.add_argument("--reps", type=int, default=3, help="interleaved timing rounds, best kept (default 3)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--memory_budget_gb", type=float, default=80.0, help="GPU memory budget in GiB (default 80)")
    p.add_argument("--variants", default=None, metavar="NAMES",
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all; eager always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from .report import markdown, write
    from .runner import run_bench

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    if args.layers < 0:
        raise ValueError(f"--layers={args.layers} must be >= 1, or 0 for the preset's depth")
    start = time.monotonic()
    names = None if args.variants is None else [n.strip() for n in args.variants.split(",") if n.strip()]
    result = run_bench(args.arch, args.size, seq=args.seq, dtype=args.dtype, batch=args.batch,
                       layers=args.layers or None, steps=args.steps, reps=args.reps, lr=args.lr,
                       memory_budget_gb=args.memory_budget_gb, variants=names, seed=args.seed,
                       progress=lambda msg: print(f"[bench {time.monotonic() - start:5.0f} s] {msg}", file=sys.stderr,
                                                  flush=True))
    result["command"] = _command(args)
    paths = write(result, args.out)
    print(markdown(result))
    print(f"\nwrote {', '.join(paths.values())}")
    return 0


def _command(args) -> str:
    """The command line that repeats this run, every option spelled out."""
    words = ["tempo-ds", "bench"]
    for name in ("arch", "size", "seq", "dtype", "batch", "layers", "steps", "reps", "lr", "memory_budget_gb",
                 "variants", "seed", "threads", "out"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name}", str(value)]
    return shlex.join(words)

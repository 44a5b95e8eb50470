"""The ``tempo-ds`` command line: one entry point, one sub-command per job."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, presets
from .bench.cli import add_parser as add_bench
from .fewbit.cli import add_parser as add_fewbit_tables
from .pretrain.cli import add_parser as add_pretrain


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="activation memory of a preset model, total and per layer",
                       description="Build a HuggingFace model from a preset config (no downloads), run one "
                       "training-mode forward pass on real text and count the bytes autograd saves for backward.")
    p.add_argument("--arch", choices=presets.ARCHS, default="bert")
    p.add_argument("--size", choices=presets.SIZES, default="tiny")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size (default 2)")
    p.add_argument("--dtype", choices=tuple(presets.DTYPES), default="bf16")
    p.add_argument("--attn", choices=presets.ATTN, default="eager", help="transformers attention implementation")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth (per-layer figures "
                   "do not depend on it; fewer layers profile large models faster)")
    p.add_argument("--data", default=None, help="text file, folder of .txt files or a dataset saved with "
                   "datasets' save_to_disk (default: the embedded corpus)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json "
                   "(default: trained on the embedded corpus, cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tempo", action="store_true", help="also profile the model with tempo_ds injected "
                   "(default techniques, or --tempo_config)")
    p.add_argument("--tempo_config", default=None, metavar="JSON", help="tempo settings: a JSON file, inline "
                   "JSON, or a DeepSpeed config with a \"tempo\" section (implies --tempo)")
    p.add_argument("--techniques", action="store_true", help="also profile each technique alone")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the profiles as JSON ('-' = stdout)")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    from .config import TempoConfig
    from .profile import compare, comparison_table, dump_json, variants

    tempo = None
    if args.tempo or args.tempo_config:
        tempo = TempoConfig.build(args.tempo_config).model_dump()  # validated before any model is built
    results = compare(args.arch, args.size, seq=args.seq, batch=args.batch, dtype=args.dtype, attn=args.attn,
                      layers=args.layers, data=args.data, tokenizer=args.tokenizer, seed=args.seed,
                      runs=variants(tempo, args.techniques))
    if args.json != "-":
        for result in results:
            print(result.summary())
        if len(results) > 1:
            print(comparison_table(results))
    if args.json:
        dump_json(results, args.json)
    return 0


def _add_bench_ops(sub) -> None:
    p = sub.add_parser("bench-ops", help="each tempo_ds op vs the PyTorch op it replaces: saved bytes and time",
                       description="Side by side in one run: bytes saved for backward (meter) and forward+backward "
                       "time of each tempo_ds op and the PyTorch op it replaces, as a Markdown table.")
    p.add_argument("--tokens", type=int, default=1024, help="rows = sequence x batch (default 1024)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=512, help="attention sequence length (default 512)")
    p.add_argument("--dtype", choices=tuple(presets.DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", default=None)
    p.set_defaults(func=_run_bench_ops)


def _run_bench_ops(args) -> int:
    import torch

    from .bench.ops import dump_json, markdown, run

    for name in ("tokens", "hidden", "heads", "seq", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.tokens, args.hidden, args.heads, args.seq, args.dtype, args.reps)
    print(f"tempo-ds bench-ops: dtype={args.dtype} tokens={args.tokens} hidden={args.hidden} heads={args.heads} "
          f"seq={args.seq} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(markdown(results))
    if args.json:
        dump_json(results, args.json)
    return 0


# sub-commands that hand all their arguments to a module's own ``main(argv)`` (its --help lists them)
PASSTHROUGH = {
    "bench-gpu": ("tempo_ds.bench.gpu",
                  "the GPU benchmark: kernels vs PyTorch paths, models' peak memory, tokens/s, largest batch"),
    "bench-deepspeed": ("tempo_ds.bench.engines",
                        "plain vs tempo_ds DeepSpeed engines on 2 ranks: bytes per layer and step time per ZeRO case"),
}


def _add_aot(sub) -> None:
    from .kernels import aot

    p = sub.add_parser("aot", help="compile every Triton kernel ahead of time for sm_80/sm_90 (no GPU needed)",
                       description="Compile the specializations the CUDA dispatch launches for each target with "
                       "triton.compile (on the CPU) and report shared memory, registers and spill stack per kernel; "
                       "exit status 1 if any does not compile or exceeds the target's per-block shared memory.")
    aot.add_arguments(p)
    p.set_defaults(func=aot.execute)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempo-ds", description="Memory-lean transformer training tools.")
    parser.add_argument("--version", action="version", version=f"tempo_ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_pretrain(sub)
    add_bench(sub)
    _add_profile(sub)
    _add_bench_ops(sub)
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed here; main() forwards their arguments
    add_fewbit_tables(sub)
    _add_aot(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: say what was wrong, no traceback
        print(f"tempo-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

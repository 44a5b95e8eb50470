"""``tempo-ds pretrain``'s command line, its embedded DeepSpeed config, and every check that must pass before a
process group starts (config, tempo section, data, tokenizer, resume point)."""
from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import presets

DEFAULTS = {"arch": "bert", "size": "tiny", "steps": 600, "seq_len": 128, "micro_batch": 16, "lr": 1e-3}

# The embedded default: what `tempo-ds pretrain` with no arguments runs. bf16 (this CPU has avx512_bf16: twice
# fp32's speed) with fp32 master weights, ZeRO-1, tempo_ds with its default (exact) techniques, metrics through
# DeepSpeed's csv monitor. The scheduler's total_num_steps and the monitor's output path are filled in per run.
EMBEDDED_CONFIG = {
    "train_micro_batch_size_per_gpu": DEFAULTS["micro_batch"],
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": DEFAULTS["lr"], "betas": [0.9, 0.98], "eps": 1e-6,
                                              "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": DEFAULTS["lr"],
                                                      "warmup_num_steps": 30, "total_num_steps": None}},
    "zero_optimization": {"stage": 1},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
    "csv_monitor": {"enabled": True, "output_path": None, "job_name": "pretrain"},
    "tempo": {},
}


def build_parser() -> argparse.ArgumentParser:
    """The worker's parser: pretrain's options, tempo_ds's (``--tempo_*``) and DeepSpeed's (``--deepspeed_config``)."""
    import deepspeed

    import tempo_ds

    p = argparse.ArgumentParser(
        prog="tempo-ds pretrain",
        description="Pretrain a preset model (MLM for BERT/RoBERTa, causal LM for GPT-2/Llama) with DeepSpeed and "
        "tempo_ds on real text. Without arguments: a small BERT on the embedded corpus, 2 ranks, a few minutes. "
        "Started by hand it launches --nproc ranks itself; under deepspeed, torchrun, mpirun or launch/slurm.sbatch "
        "it is one rank.")
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", "--model", dest="arch", choices=presets.ARCHS, default=None,
                   help=f"preset architecture (default {DEFAULTS['arch']}, or the config's folder: configs/<arch>-<size>/)")
    g.add_argument("--size", choices=presets.SIZES, default=None, help=f"preset size (default {DEFAULTS['size']})")
    g.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    g.add_argument("--seq_len", "--seq", dest="seq_len", type=int, default=DEFAULTS["seq_len"], help=f"tokens per row (default {DEFAULTS['seq_len']})")
    g.add_argument("--micro_batch", type=int, default=None,
                   help="rows per rank and step (default: the config's train_micro_batch_size_per_gpu)")
    g.add_argument("--data", default=None, help="a .txt/.txt.gz file, a folder of them, or a datasets save_to_disk "
                   "folder (default: the embedded Shakespeare corpus)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: BPE trained on "
                   "the embedded corpus)")
    g.add_argument("--seed", type=int, default=0, help="model initialisation and data order (default 0)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps in all (default "
                   f"{DEFAULTS['steps']}; a resumed run continues to this count)")
    t.add_argument("--out", default="tempo-ds-out", help="run folder: checkpoints/, monitor/ (csv_monitor), "
                   "summary.json (default tempo-ds-out)")
    t.add_argument("--save_interval", type=int, default=100, help="checkpoint every N steps (default 100; 0: only at "
                   "the end and on Ctrl-C)")
    t.add_argument("--keep", type=int, default=2, help="complete checkpoints kept, older ones are removed "
                   "(default 2)")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in "
                   "OUT/checkpoints (model, optimizer, scheduler, RNG and data position)")
    t.add_argument("--overwrite", action="store_true", help="start over in an --out folder that holds a run: its "
                   "checkpoints, monitor/ and summary.json are removed first")
    t.add_argument("--log_interval", type=int, default=25, help="a log line and monitor events every N steps "
                   "(default 25)")
    t.add_argument("--no_tempo", action="store_true", help="train the untouched model (the config's \"tempo\" "
                   "section is ignored; --tempo_* options and the DeepSpeedExamples aliases conflict with it)")
    t.add_argument("--no_progress", action="store_true", help="no progress bar, log lines only (also the case when "
                   "stderr is not a terminal)")
    r = p.add_argument_group("processes")
    r.add_argument("--nproc", type=int, default=None, help="ranks to start when not under a launcher (default: "
                   "the number of GPUs, else 2)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU (default 1: ranks "
                   "sharing cores spin otherwise)")
    r.add_argument("--report_dir", default=None, help="each rank writes DIR/rank<N>.json: losses, replaced modules")
    r.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # inserted by `deepspeed`
    tempo_ds.add_config_arguments(p)
    deepspeed.add_config_arguments(p)
    return p


@dataclass
class Inputs:
    """What the checks loaded, kept for the run so that nothing is read twice: the DeepSpeed config, the
    documents of --data (None: the embedded corpus) and the tokenizer."""

    config: dict
    texts: list[str] | None
    tokenizer: object


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Inputs]:
    """Parse and check ``argv``; raises ValueError (a clear message) for anything a run would trip over later."""
    args = build_parser().parse_args(argv)
    return args, check(args)


def _positive(args, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name}={value} must be >= {minimum}")


def preset_of(args) -> tuple[str, str]:
    """The model preset: --arch/--size, else the config's folder name when it is ``<arch>-<size>`` (as in
    configs/), else the defaults."""
    arch, size = args.arch, args.size
    if args.deepspeed_config and (arch is None or size is None):
        folder = Path(args.deepspeed_config).resolve().parent.name
        parts = folder.split("-", 1)
        if len(parts) == 2 and parts[0] in presets.ARCHS and parts[1] in presets.SIZES:
            arch, size = arch or parts[0], size or parts[1]
    return arch or DEFAULTS["arch"], size or DEFAULTS["size"]


def check(args) -> Inputs:
    """Everything that can be checked before a process group exists; returns what it loaded."""
    _positive(args, "steps", "seq_len", "micro_batch", "layers", "log_interval", "keep", "nproc", "threads")
    _positive(args, "save_interval", minimum=0)
    args.arch, args.size = preset_of(args)
    presets.model_config(args.arch, args.size, max_seq=args.seq_len, layers=args.layers)  # size defined for arch
    config = ds_config(args)
    from ..config import TempoConfig
    from ..deepspeed_integration import resolve_config

    if args.no_tempo:
        from ..deepspeed_integration import DEEPSPEED_EXAMPLES_FLAGS

        asked = [flag for flag, value in vars(args).items() if value not in (None, False)
                 and (flag.startswith("tempo") or flag in DEEPSPEED_EXAMPLES_FLAGS)]
        if asked:
            raise ValueError(f"--no_tempo conflicts with --{', --'.join(asked)}")
    else:
        # the section and --tempo_* options, named in any error (the config travels as a dict)
        resolve_config(argparse.Namespace(**{**vars(args), "deepspeed_config": None}), config=config)
    TempoConfig.build(config)
    _check_deepspeed(config)
    from ..data import load_texts, load_tokenizer

    texts = None if args.data is None else load_texts(args.data)
    tokenizer = load_tokenizer(args.tokenizer)
    from .checkpoints import latest

    found = latest(checkpoint_dir(args))
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.resume and found is None:
        raise ValueError(f"--resume: no complete checkpoint in {checkpoint_dir(args)} (no 'latest' file); "
                         "run without --resume to start a new run there")
    if not args.resume and not args.overwrite and found is not None:
        raise ValueError(f"--out {args.out} holds a run (checkpoint {found}): pass --resume to continue it, "
                         "--overwrite to start over, or another --out")
    return Inputs(config, texts, tokenizer)


def _check_deepspeed(config: dict) -> None:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    accelerator = get_accelerator()
    for precision in ("fp16", "bf16"):
        supported = getattr(accelerator, f"is_{precision}_supported")()
        if config.get(precision, {}).get("enabled") and not supported:
            raise ValueError(f"DeepSpeed config: {precision} is enabled but DeepSpeed's {accelerator.device_name()} "
                             "accelerator does not support it here; use fp32 or the other half precision")

    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except Exception as exc:  # DeepSpeed raises assorted types for a bad config
        raise ValueError(f"DeepSpeed config: {exc}") from None


def checkpoint_dir(args) -> str:
    """OUT/checkpoints: where the run's DeepSpeed checkpoints and ``latest`` live."""
    return os.path.join(args.out, "checkpoints")


def clear_run(args) -> None:
    """--overwrite: remove the previous run's checkpoints, monitor/ and summary.json from --out."""
    import shutil

    for name in ("checkpoints", "monitor"):
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    summary = os.path.join(args.out, "summary.json")
    if os.path.isfile(summary):
        os.remove(summary)


def ds_config(args) -> dict:
    """The DeepSpeed config of this run: --deepspeed_config (a JSON file) or the embedded one, with the micro batch
    override, train_batch_size dropped (derived from micro batch x accumulation x ranks) and, for the embedded
    one, the scheduler's length and the monitor's folder filled in."""
    if args.deepspeed_config:
        path = Path(args.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"--deepspeed_config {path}: no such file")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--deepspeed_config {path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ValueError(f"--deepspeed_config {path}: expected a JSON object")
    else:
        config = copy.deepcopy(EMBEDDED_CONFIG)
        config["scheduler"]["params"]["total_num_steps"] = args.steps
        config["scheduler"]["params"]["warmup_num_steps"] = min(30, max(1, args.steps // 10))
        config["csv_monitor"]["output_path"] = os.path.join(args.out, "monitor")
    if args.micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config.pop("train_batch_size", None)
    if args.no_tempo:
        config["tempo"] = {"enabled": False}
    return config

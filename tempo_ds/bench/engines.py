"""DeepSpeed benchmark: a plain and a tempo_ds engine side by side in one run, per ZeRO case.

    tempo-ds bench-deepspeed [--cases zero2 zero3-ckpt2] [--seq 128] [--steps 8] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ..config import SECTION
from ..deepspeed_integration import _rank, deepspeed_activation_checkpointing, initialize

BENCH_CASES = {
    "zero2": {"stage": 2, "checkpoint_every": 0},
    "zero3-ckpt2": {"stage": 3, "checkpoint_every": 2},
}


def _bench_ds_config(stage: int, micro_batch: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "bf16": {"enabled": True}, "zero_optimization": zero,
            "activation_checkpointing": {"partition_activations": False}}


def _bench_model(stage: int, ds_config: dict, seq: int, layers: int | None, seed: int):
    from ..presets import build_model

    return build_model("bert", "base", seed=seed, vocab_size=8192, max_seq=seq, layers=layers,
                       zero3_config=ds_config if stage == 3 else None)


def _bench_case(name: str, seq: int, micro_batch: int, steps: int, layers: int | None, seed: int) -> dict:
    """One side-by-side case: a plain and a tempo_ds engine on the same model, batch and seed."""
    from ..memory import SavedTensorMeter

    case = BENCH_CASES[name]
    ds_config = _bench_ds_config(case["stage"], micro_batch)
    gen = torch.Generator().manual_seed(seed + _rank())
    batches = [torch.randint(5, 8192, (micro_batch, seq), generator=gen) for _ in range(steps + 1)]
    engines = {}
    for variant in ("baseline", "tempo_ds"):
        model = _bench_model(case["stage"], ds_config, seq, layers, seed)
        if case["checkpoint_every"]:
            deepspeed_activation_checkpointing(model, every_n_layers=case["checkpoint_every"])
        config = ds_config if variant == "baseline" else {**ds_config, SECTION: {}}
        engine, *_ = initialize(model=model, config=config, model_parameters=model.parameters())
        engines[variant] = engine
    out: dict = {"case": name, **case, "seq": seq, "micro_batch": micro_batch, "steps": steps}
    times: dict[str, list[float]] = {v: [] for v in engines}
    for step, ids in enumerate(batches):
        for variant, engine in engines.items():  # interleaved, so load changes hit both alike
            ids = ids.to(engine.device)
            torch.manual_seed(seed + step)
            start = time.perf_counter()
            if step == 0:
                with SavedTensorMeter(engine.module) as meter:
                    loss = engine(input_ids=ids, labels=ids).loss
                out[variant] = {"per_layer_bytes": meter.per_layer, "total_bytes": meter.total_bytes}
            else:
                loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            if step:  # step 0 is warm-up
                times[variant].append(time.perf_counter() - start)
            out[variant].setdefault("losses", []).append(round(loss.item(), 4))
    hidden = engines["baseline"].module.config.hidden_size
    every = case["checkpoint_every"]
    # deepspeed.checkpointing keeps a checkpointed layer's input as a ctx attribute, which saved-tensor hooks (and
    # so the meter) cannot see: add it, one bf16 [micro_batch, seq, hidden] tensor per checkpointed layer.
    kept_input = micro_batch * seq * hidden * 2
    for variant in engines:
        out[variant]["step_s"] = statistics.median(times[variant])
        per_layer = [b + (kept_input if every and i % every == 0 else 0)
                     for i, b in enumerate(out[variant]["per_layer_bytes"])]
        out[variant]["per_layer_bytes"] = per_layer
        out[variant]["sbh_per_layer"] = [round(b / (seq * micro_batch * hidden), 2) for b in per_layer]
    return out


def _bench_table(results: list[dict]) -> str:
    lines = ["| case | layer | baseline bytes (sbh) | tempo_ds bytes (sbh) | ratio |", "|---|---|---|---|---|"]
    for r in results:
        b, t = r["baseline"], r["tempo_ds"]
        for i, (bb, tb) in enumerate(zip(b["per_layer_bytes"], t["per_layer_bytes"])):
            lines.append(f"| {r['case']} | {i} | {bb:,} ({b['sbh_per_layer'][i]}) | {tb:,} ({t['sbh_per_layer'][i]}) "
                         f"| {tb / max(bb, 1):.2f} |")
    lines += ["", "| case | baseline step (s) | tempo_ds step (s) | ratio | baseline losses | tempo_ds losses |",
              "|---|---|---|---|---|---|"]
    for r in results:
        b, t = r["baseline"], r["tempo_ds"]
        lines.append(f"| {r['case']} | {b['step_s']:.2f} | {t['step_s']:.2f} | {t['step_s'] / b['step_s']:.2f} "
                     f"| {b['losses']} | {t['losses']} |")
    return "\n".join(lines)


def _bench_worker(opts) -> int:
    import deepspeed

    from deepspeed.accelerator import get_accelerator

    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores; no oversubscription
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    results = [_bench_case(name, opts.seq, opts.batch, opts.steps, opts.layers, opts.seed) for name in opts.cases]
    if _rank() == 0:
        print(_bench_table(results), flush=True)
        if opts.json:
            with open(opts.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``tempo-ds bench-deepspeed [--cases zero2 zero3-ckpt2] [--seq 128] ...``

    BERT-base (12 x 768) under DeepSpeed on 2 ranks (gloo on CPU), bf16, AdamW: bytes saved for backward per
    layer (meter, first step) and median step time, baseline and tempo_ds engines side by side in one run
    (steps interleaved). ``zero2``: ZeRO-2; ``zero3-ckpt2``: ZeRO-3 under ``zero.Init`` with DeepSpeed
    activation checkpointing on every other layer. Starts ``deepspeed --num_gpus N`` on itself unless
    already running under a launcher."""
    parser = argparse.ArgumentParser(prog="tempo-ds bench-deepspeed", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=tuple(BENCH_CASES), default=list(BENCH_CASES))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--layers", type=int, default=None, help="override BERT-base's 12 layers")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        return _bench_worker(opts)
    from ..pretrain.spawn import free_port

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(opts.ranks),
           "--master_port", str(free_port()), "--module", "tempo_ds.bench.engines", *argv]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

"""Launched by tests/test_deepspeed_integration.py as a training script is usually launched:

    deepspeed --num_gpus 2 ds_train_cli.py --deepspeed --deepspeed_config ds2.json --tempo_gelu inplace \
        --out OUT_DIR --stage3_config ds3.json

Arguments come from tempo_ds.add_config_arguments + deepspeed.add_config_arguments; the configs' "tempo" sections
say gelu=recompute, the command line overrides it. For ZeRO-2 and ZeRO-3 (under zero.Init), on BERT:

* resume: with dropout ON, 4 steps uninterrupted vs 2 steps, tempo_ds.deepspeed_integration.save_checkpoint, a
  fresh engine (other initial weights, RNG disturbed), load_checkpoint, 2 more steps; and the same resume through
  DeepSpeed's own load_checkpoint only (no RNG states);
* cross-loading (dropout off): a tempo_ds checkpoint continued by a plain engine, and a plain checkpoint continued
  by a tempo_ds engine, each against the run that saved it continuing itself;
* fp16 (ZeRO-2 only): an engine with dynamic loss scaling and an inf injected before a tempo op: the step is
  skipped and the scale halved, as for the plain model; where the accelerator refuses fp16 its message is kept.

Each rank writes OUT_DIR/rank<N>.json.
"""
import argparse
import os

import deepspeed
import torch

import tempo_ds
from ds_common import batches, build_model, finish, free, init_distributed, max_diff, snapshot, train, write
from tempo_ds.deepspeed_integration import load_checkpoint, save_checkpoint


def parse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage3_config", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = tempo_ds.add_config_arguments(parser)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def load(path: str) -> dict:
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return load_ds_config(path)


def tempo_engine(args, seed: int, dropout: float):
    """An engine built by tempo_ds.initialize from args (config path + command-line tempo options)."""
    model = build_model("bert", load(args.deepspeed_config), seed=seed, dropout=dropout)
    engine, *_ = tempo_ds.initialize(args=args, model=model, model_parameters=model.parameters())
    return engine


def plain_engine(args, seed: int, dropout: float):
    config = {k: v for k, v in load(args.deepspeed_config).items() if k != "tempo"}
    model = build_model("bert", config, seed=seed, dropout=dropout)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def resume(args, ckpt: str) -> dict:
    data = batches(4)
    torch.manual_seed(123)
    engine = tempo_engine(args, seed=0, dropout=0.1)
    report = engine.module._tempo_ds_state["report"]
    full = train(engine, data)
    full_params = snapshot(engine)
    free(engine)

    torch.manual_seed(123)
    engine = tempo_engine(args, seed=0, dropout=0.1)
    first = train(engine, data[:2])
    save_checkpoint(engine, ckpt, tag="mid")
    free(engine)
    out = {"techniques": report.config.techniques(), "full": full, "first": first}
    for how in ("tempo_ds", "deepspeed_only"):
        torch.manual_seed(999)  # another RNG state and other initial weights: all must come from the checkpoint
        engine = tempo_engine(args, seed=7, dropout=0.1)
        if how == "tempo_ds":
            load_checkpoint(engine, ckpt, tag="mid")
        else:
            engine.load_checkpoint(ckpt, tag="mid")
        out[how] = {"losses": train(engine, data[2:]), "param_diff": max_diff(snapshot(engine), full_params),
                    "global_steps": engine.global_steps}
        free(engine)
    return out


def cross(args, ckpt: str) -> dict:
    data = batches(4, seed=5)
    out = {}
    for saver, loader in (("tempo", "plain"), ("plain", "tempo")):
        make = {"tempo": tempo_engine, "plain": plain_engine}
        engine = make[saver](args, seed=0, dropout=0.0)
        train(engine, data[:2])
        engine.save_checkpoint(ckpt, tag=f"{saver}2")
        itself = train(engine, data[2:])
        itself_params = snapshot(engine)
        free(engine)
        engine = make[loader](args, seed=3, dropout=0.0)
        _, client = engine.load_checkpoint(ckpt, tag=f"{saver}2")
        other = train(engine, data[2:])
        out[f"{saver}->{loader}"] = {"itself": itself, "other": other,
                                     "param_diff": max_diff(snapshot(engine), itself_params),
                                     "injected": tempo_ds.is_injected(engine.module)}
        free(engine)
    return out


def fp16_overflow(args) -> dict:
    """Dynamic loss scaling with an inf entering the first LayerNorm (a tempo op once injected) on rank 0."""
    out = {}
    for variant in ("plain", "tempo"):
        config = {k: v for k, v in load(args.deepspeed_config).items() if k not in ("bf16", "tempo")}
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 100}
        if variant == "tempo":
            config["tempo"] = {}
        model = build_model("bert", config)
        try:
            engine, *_ = tempo_ds.initialize(model=model, config=config, model_parameters=model.parameters())
        except ValueError as exc:
            return {"refused": str(exc)}
        if int(os.environ.get("RANK", 0)) == 0:
            def poison(module, inputs, output):
                output = output.clone()
                output[0, 0, 0] = float("inf")
                return output
            engine.module.bert.embeddings.word_embeddings.register_forward_hook(poison)
        before = snapshot(engine)
        scale = engine._get_optimizer_loss_scale()
        train(engine, batches(1))
        out[variant] = {"scale": [scale, engine._get_optimizer_loss_scale()], "skipped": engine.skipped_steps,
                        "param_diff": max_diff(snapshot(engine), before)["abs"],
                        "injected": tempo_ds.is_injected(engine.module)}
        free(engine)
    return out


def main():
    args = parse()
    init_distributed()
    configs = {2: args.deepspeed_config, 3: args.stage3_config}
    results = {}
    for stage, path in configs.items():
        args.deepspeed_config = path
        ckpt = os.path.join(args.out, f"ckpt{stage}")
        results[f"resume{stage}"] = resume(args, ckpt)
        results[f"cross{stage}"] = cross(args, ckpt)
    args.deepspeed_config = configs[2]
    results["fp16"] = fp16_overflow(args)
    results["ranks_rng_files"] = sorted(f for f in os.listdir(os.path.join(args.out, "ckpt2", "mid"))
                                        if f.startswith("tempo_ds_rng"))
    write(args.out, results)


if __name__ == "__main__":
    main()
    finish()

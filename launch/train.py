"""A small training entry point that every script in launch/ starts by default.

    deepspeed --num_gpus 2 launch/train.py --deepspeed --deepspeed_config configs/bert-large/zero2-bf16.json \
        --model bert --size tiny --steps 3 --micro_batch 2 --report_dir out/

Builds a preset model (tempo_ds.presets), trains it a few steps on real text (tempo_ds.data: the embedded corpus
and its BPE tokenizer; MLM for BERT/RoBERTa, causal LM otherwise) through ``tempo_ds.initialize`` and prints the
per-step loss on rank 0. The printed loss is the mean over all ranks, so every rank and every launcher with the
same world size and seed reports the same numbers.

Arguments (plus those of tempo_ds.add_config_arguments and deepspeed.add_config_arguments):

  --model {bert,roberta,gpt2,llama}  preset architecture (default bert)
  --size {tiny,base,medium,large}    preset size (default tiny)
  --layers N                         override the preset's depth
  --steps N                          optimizer steps (default 3)
  --seq_len N                        tokens per row (default 64)
  --micro_batch N                    override the config's train_micro_batch_size_per_gpu
  --seed N                           model init and data seed (default 0); rank r reads data with seed + r
  --threads N                        torch threads per rank (default 1: ranks sharing cores spin otherwise)
  --report_dir DIR                   each rank writes DIR/rank<N>.json: ranks, losses, replaced modules
  --local_rank N                     inserted by the deepspeed launcher (LOCAL_RANK is read as well)

Without --deepspeed_config a built-in config is used (ZeRO-1, fp32, AdamW, micro batch 2, no tempo section);
tempo_ds is then on only when a tempo option (--tempo, --tempo_gelu ..., a DeepSpeedExamples alias) asks for it.

Ranks come from the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT: deepspeed,
torchrun, srun via launch/slurm.sbatch). Under mpirun none of these is set: ranks are discovered through mpi4py by
``deepspeed.init_distributed(auto_mpi_discovery=True)``. DeepSpeed's discovery takes the master address from
``hostname -I`` on rank 0; when MASTER_ADDR is exported (launch/mpirun.sh --master_addr) rank, world size and
local rank are read from mpi4py here in the same way and the given address is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch

import deepspeed
import tempo_ds
from tempo_ds import presets
from tempo_ds.data import lm_batches, load_texts, load_tokenizer, token_stream

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 1},
}
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert", choices=presets.ARCHS)
    parser.add_argument("--size", default="tiny", choices=presets.SIZES)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--micro_batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report_dir", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = tempo_ds.add_config_arguments(parser)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def mpi_ranks_with_given_master() -> None:
    """Under mpirun with MASTER_ADDR exported: RANK, WORLD_SIZE and LOCAL_RANK from mpi4py (as DeepSpeed's
    mpi_discovery computes them), keeping the given master address instead of rank 0's ``hostname -I``."""
    if "RANK" in os.environ or "MASTER_ADDR" not in os.environ or not any(v in os.environ for v in MPI_VARS):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    names = comm.allgather(MPI.Get_processor_name())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(sum(n == names[rank] for n in names[:rank])))
    os.environ.setdefault("MASTER_PORT", "29500")


def load_config(args) -> dict:
    if args.deepspeed_config:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

        config = load_ds_config(args.deepspeed_config)
    else:
        config = json.loads(json.dumps(DEFAULT_CONFIG))
    if args.micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config.pop("train_batch_size", None)  # derived from micro batch x accumulation x world size
    return config


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mpi_ranks_with_given_master()
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=True,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(args)
    dtype = "bf16" if config.get("bf16", {}).get("enabled") else "fp16" if config.get("fp16", {}).get("enabled") \
        else "fp32"

    tok = load_tokenizer()
    model = presets.build_model(args.model, args.size, seed=args.seed, vocab_size=len(tok),
                                max_seq=max(args.seq_len, 64), layers=args.layers)
    if "activation_checkpointing" in config:
        tempo_ds.deepspeed_integration.deepspeed_activation_checkpointing(model)
    args.deepspeed_config = None  # the (possibly overridden) dict goes in as config=
    engine, *_ = tempo_ds.initialize(args=args, model=model, model_parameters=model.parameters(), config=config)
    state = getattr(engine.module, "_tempo_ds_state", None)
    report = state["report"] if state else None

    ids = token_stream(load_texts(), tok)
    data = lm_batches(ids, args.seq_len, engine.train_micro_batch_size_per_gpu(), mlm=args.model in presets.MLM_ARCHS,
                      tokenizer=tok, seed=args.seed + rank)
    losses = []
    for step in range(args.steps):
        batch = {k: v.to(engine.device) for k, v in next(data).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.6f}", flush=True)

    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        out = {"rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
               "master_addr": os.environ.get("MASTER_ADDR"), "host": socket.gethostname(), "pid": os.getpid(),
               "model": f"{args.model}-{args.size}", "dtype": dtype, "zero_stage": engine.zero_optimization_stage(),
               "tempo": report.config.techniques() if report else None,
               "replaced": [[s.name, type(s.old).__name__, type(s.new).__name__, s.technique]
                            for s in report.replaced] if report else [],
               "losses": losses}
        with open(os.path.join(args.report_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

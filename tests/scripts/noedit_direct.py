"""A training script with no tempo_ds code that calls deepspeed.initialize itself, as DeepSpeedExamples' do.

    deepspeed --num_gpus 2 --module tempo_ds.run noedit_direct.py --deepspeed --deepspeed_config ds.json \
        --tempo_gelu inplace --losses_json out/direct

Its parser takes --local_rank and DeepSpeed's options (deepspeed.add_config_arguments): under tempo_ds.run the
latter also brings the --tempo* options, so they can be given after the script. With --losses_json PREFIX each
rank writes its per-step losses to PREFIX.rank<N>.json. noedit_reference.py builds the same engine with
tempo_ds.initialize (the documented code change) for the losses to compare with.
"""
import argparse
import json
import os
import sys

import deepspeed
import torch
import transformers

VOCAB = 101


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="tiny BERT MLM with deepspeed.initialize")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--losses_json", default=None)
    return deepspeed.add_config_arguments(p)


def build(args) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=2, intermediate_size=4 * args.hidden,
                                     max_position_embeddings=2 * args.seq)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


def engine(args, model):
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    return engine


def train(engine, args) -> list[float]:
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(1 + 1000 * rank)
    micro = engine.train_micro_batch_size_per_gpu()
    torch.manual_seed(5)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(3, VOCAB, (micro, args.seq), generator=gen).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if args.losses_json:
        with open(f"{args.losses_json}.rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "argv": sys.argv, "losses": losses}, f)
    return losses


def main(argv=None) -> list[float]:
    args = parser().parse_args(argv)
    model = build(args)
    return train(engine(args, model), args)


if __name__ == "__main__":
    main()
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's communication threads can abort interpreter teardown on CPU

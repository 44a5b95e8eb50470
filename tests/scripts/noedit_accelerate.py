"""An accelerate training script with no tempo_ds code: the DeepSpeed plugin comes from the launcher's config.

    accelerate launch --config_file accelerate.yaml -m tempo_ds.run noedit_accelerate.py --losses_json out/acc

accelerate.yaml is what `accelerate config` writes for DeepSpeed with a config file (distributed_type: DEEPSPEED,
deepspeed_config: {deepspeed_config_file: ds.json}); ds.json carries the "tempo" section. A tiny Llama causal LM
(run_clm-style) with a torch AdamW, prepared by accelerate (which builds the engine with deepspeed.initialize);
each rank writes its per-step losses to PREFIX.rank<N>.json. noedit_reference.py runs it with tempo_ds.inject
before accelerator.prepare (the documented code change) for the losses to compare with.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from accelerate import Accelerator

VOCAB = 101


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="tiny Llama causal LM with accelerate")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--losses_json", default=None)
    return p


def build(args) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=3 * args.hidden,
                                      max_position_embeddings=2 * args.seq, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, use_cache=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def train(accelerator: Accelerator, model, args) -> list[float]:
    ids = torch.randint(3, VOCAB, (args.steps * 2 * accelerator.num_processes, args.seq),
                        generator=torch.Generator().manual_seed(7))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if args.losses_json:
        # On a machine without an accelerator, accelerate 1.15's DeepSpeed path finds no backend of its own and
        # reports process_index 0 (and shards no data) on every rank, while DeepSpeed's engine spans them all.
        rank = int(os.environ.get("RANK", accelerator.process_index))
        with open(f"{args.losses_json}.rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "argv": sys.argv, "losses": losses}, f)
    return losses


def main(argv=None) -> list[float]:
    args = parser().parse_args(argv)
    accelerator = Accelerator()
    return train(accelerator, build(args), args)


if __name__ == "__main__":
    main()
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's communication threads can abort interpreter teardown on CPU

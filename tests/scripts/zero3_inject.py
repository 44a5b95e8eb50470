"""Run by tests/test_inject_zero3.py in its own process: a tiny BERT built under deepspeed.zero.Init, injected,
then trained two steps by a ZeRO-3 engine; prints one JSON line of findings."""
import json
import os
import sys

import deepspeed
import torch
import torch._dynamo  # noqa: F401  imported lazily inside zero.Init it trips over zero.Init's patched constructors
import transformers
from transformers import BertForMaskedLM
from transformers.integrations import HfDeepSpeedConfig

import tempo_ds

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def build():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    # transformers' own route to ZeRO-3 construction: with an HfDeepSpeedConfig alive, from_config builds the
    # model under deepspeed.zero.Init and initialises weights inside GatheredParameters
    return BertForMaskedLM._from_config(cfg)


def train(model):
    engine, *_ = deepspeed.initialize(model=model, config=CONFIG, model_parameters=model.parameters())
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        ids = torch.randint(3, 101, (2, 24), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    keep_alive = HfDeepSpeedConfig(CONFIG)  # noqa: F841
    model = build()
    params = {n: p for n, p in model.named_parameters()}
    partitioned_before = sum(p.ds_status.name == "NOT_AVAILABLE" for p in params.values())
    report = tempo_ds.inject(model, sys.argv[1] if len(sys.argv) > 1 else None)
    same = all(p is params[n] for n, p in model.named_parameters())
    still = sum(p.ds_status.name == "NOT_AVAILABLE" for p in params.values())
    tempo_losses = train(model)
    plain_losses = train(build())
    print(json.dumps({"params": len(params), "partitioned_before": partitioned_before, "partitioned_after": still,
                      "same_objects": same, "replaced": len(report.replaced), "tempo": tempo_losses,
                      "plain": plain_losses, "rank": int(os.environ.get("RANK", 0))}))


if __name__ == "__main__":
    main()

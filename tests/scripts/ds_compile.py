"""tests/test_compile.py's DeepSpeed check, in its own process (it starts a gloo process group): one CPU rank,
a tiny injected BERT with dropout, a ZeRO-1 engine trained 3 steps uncompiled and 3 steps after
``engine.compile(backend=aot_eager counting graphs, compile_kwargs={"fullgraph": True})``, from the same weights
and seeds. Writes {"eager": [losses], "compiled": [losses], "graphs": n} to argv[1]."""
import json
import os
import sys

import torch
import transformers

import deepspeed
import tempo_ds

GRAPHS = []


def counting_backend(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    GRAPHS.append(gm)
    return aot_eager(gm, example_inputs)


def engine():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                                  attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    tempo_ds.inject(model, gelu="recompute", norm="inplace", attention="lean", dropout="seed")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 1},
              # the engine's forward hook starts its throughput timer (time.time(), untraceable) when it has no
              # dataloader: DeepSpeed's own graph break, off here
              "timers": {"throughput": {"enabled": False}}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return eng


def train(eng, steps=3):
    g = torch.Generator().manual_seed(1)
    losses = []
    torch.manual_seed(5)
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        loss = eng(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    return losses


def main(out: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="gloo")
    eager = train(engine())
    eng = engine()
    eng.compile(backend=counting_backend, compile_kwargs={"fullgraph": True})
    compiled = train(eng)
    with open(out, "w") as f:
        json.dump({"eager": eager, "compiled": compiled, "graphs": len(GRAPHS)}, f)


if __name__ == "__main__":
    main(sys.argv[1])

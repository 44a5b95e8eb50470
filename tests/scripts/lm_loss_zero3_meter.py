"""lm_loss=chunked under a real ZeRO-3 engine with saved-tensor hooks active (tempo_ds.memory.SavedTensorMeter around
the forward), 1 or 2 ranks, GPT-2 (tied head) or BERT MLM: two training steps must run.

    torchrun --nproc_per_node 2 tests/scripts/lm_loss_zero3_meter.py gpt2

Under saved-tensor hooks autograd hands the op's backward its saved weight without ZeRO-3's ``ds_status``, so the
op's own ``gathered()`` cannot fetch it; the head's placeholder output on the loss's graph makes DeepSpeed's
pre-backward hook fetch it first (before that change: "invalid gradient at index 1 - got [0]" on 2 ranks).
"""
import sys

import deepspeed
import torch
import torch._dynamo  # noqa: F401  imported before zero.Init patches constructors
import transformers
from transformers.integrations import HfDeepSpeedConfig

import tempo_ds
from tempo_ds.memory import SavedTensorMeter

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def main(arch: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    keep_alive = HfDeepSpeedConfig(CONFIG)  # noqa: F841  (from_config builds under zero.Init)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=40)
        model = transformers.GPT2LMHeadModel._from_config(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=40)
        model = transformers.BertForMaskedLM._from_config(cfg)
    report = tempo_ds.inject(model)
    assert any(s.technique == "lm_loss=chunked" for s in report.replaced)
    engine, *_ = deepspeed.initialize(model=model, config=CONFIG, model_parameters=model.parameters())
    ids = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        with SavedTensorMeter(engine.module) as meter:
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        print(f"step {step} loss {loss.item():.6f} saved {meter.total_bytes:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpt2")

"""Launched by tests/test_deepspeed_integration.py: `deepspeed --num_gpus 2 ds_trainer.py OUT_DIR`.

The HF Trainer route: TrainingArguments(deepspeed=ds_config, use_cpu=True, bf16=True) with ZeRO-2, and
tempo_ds.inject(model, ds_config) before the Trainer is built (the Trainer calls deepspeed.initialize itself).
A plain and a tempo_ds Trainer train the same tiny BERT (dropout off, same weights, same data order) for a few
steps in one process, in bf16 and in fp32; each rank writes OUT_DIR/rank<N>.json with the loss histories.
"""
import torch
import transformers
from transformers import Trainer, TrainingArguments

import tempo_ds
from ds_common import MICRO_BATCH, SEQ, VOCAB, finish, model_config, script_args, write

STEPS = 6
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "tempo": {"gelu": "recompute", "norm": "inplace", "attention": "lean", "dropout": "seed"},
}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(11)
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(out_dir: str, tempo: bool, bf16: bool) -> tuple[list[float], bool]:
    args = TrainingArguments(output_dir=out_dir, deepspeed=DS_CONFIG, use_cpu=True, bf16=bf16, max_steps=STEPS,
                             per_device_train_batch_size=MICRO_BATCH, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to=[], seed=0, disable_tqdm=True)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(model_config("bert"))
    if tempo:
        tempo_ds.inject(model, DS_CONFIG)  # before the Trainer exists: it wraps the model in a DeepSpeed engine
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(STEPS * MICRO_BATCH * 2))
    trainer.train()
    injected = tempo_ds.is_injected(trainer.model_wrapped.module)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    del trainer
    return losses, injected


def main():
    (out_dir,) = script_args()
    found = {}
    for dtype in ("bf16", "fp32"):
        plain, _ = run(out_dir, tempo=False, bf16=dtype == "bf16")
        ours, injected = run(out_dir, tempo=True, bf16=dtype == "bf16")
        found[dtype] = {"plain": plain, "tempo": ours, "injected": injected}
    write(out_dir, found)


if __name__ == "__main__":
    main()
    finish()

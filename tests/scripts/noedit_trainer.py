"""An HF Trainer training script with no tempo_ds code, in the style of transformers' examples (run_mlm.py).

    deepspeed --num_gpus 2 --module tempo_ds.run noedit_trainer.py --deepspeed ds.json --use_cpu --bf16 \
        --output_dir out --max_steps 3 --per_device_train_batch_size 2 --losses_json out/losses
    deepspeed --num_gpus 2 noedit_trainer.py ...        # the same run without tempo_ds

A tiny BERT masked-LM (built from a config, the weights from the seed) trained on random token ids with the
Trainer's DeepSpeed integration (ZeRO-2 or ZeRO-3: the model is built after TrainingArguments, so under ZeRO-3
it is partitioned while it is built, as from_pretrained does). With --losses_json PREFIX each rank writes the
logged losses to PREFIX.rank<N>.json. tests/test_runner.py launches it through tempo_ds.run; noedit_reference.py
runs it with tempo_ds.inject added (the documented code change) for the losses to compare with.
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

VOCAB = 101


@dataclass
class ModelArguments:
    layers: int = 2
    hidden: int = 32
    heads: int = 2
    seq: int = 16
    dropout: float = 0.1
    losses_json: str | None = None


def parse(argv=None) -> tuple[ModelArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def build(model_args: ModelArguments, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=model_args.hidden,
                                     num_hidden_layers=model_args.layers,
                                     num_attention_heads=model_args.heads,
                                     intermediate_size=4 * model_args.hidden,
                                     max_position_embeddings=2 * model_args.seq,
                                     hidden_dropout_prob=model_args.dropout,
                                     attention_probs_dropout_prob=model_args.dropout)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM._from_config(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int):
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(11))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, model_args: ModelArguments, training_args: TrainingArguments) -> list[float]:
    n = training_args.max_steps * training_args.per_device_train_batch_size * training_args.world_size
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens(n, model_args.seq))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if model_args.losses_json:
        rank = training_args.process_index
        with open(f"{model_args.losses_json}.rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "argv": sys.argv, "losses": losses}, f)
    return losses


def main(argv=None) -> list[float]:
    model_args, training_args = parse(argv)
    return train(build(model_args), model_args, training_args)


def fast_exit() -> None:
    """DeepSpeed's communication threads can abort interpreter teardown on CPU: exit once every rank is done."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    fast_exit()

"""Writes the DeepSpeed configs under configs/ (run from anywhere: ``python configs/generate.py``).

    configs/<model>/zero<S>-<dtype>[-ckpt].json            tempo_ds on ("tempo" section)
    configs/baselines/<model>/zero<S>-<dtype>[-ckpt].json  the same config without the "tempo" section

<model>: bert-large, roberta-large, gpt2-medium; S: 1, 2, 3; dtype: bf16, fp16; -ckpt: activation checkpointing
on. tests/test_configs.py checks that the files equal this script's output and validates every one of them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# model -> (preset arch, preset size, micro batch per device, accumulation, optimizer, lr, warmup steps, tempo)
MODELS = {
    # BERT-Large pretraining (seq 128): Adam, lr 1e-4, 10k warmup (Devlin et al. 2019).
    "bert-large": ("bert", "large", 32, 1, "AdamW", 1e-4, 10000,
                   {"gelu": "recompute", "norm": "inplace", "attention": "tempo", "dropout": "seed"}),
    # RoBERTa-Large: Adam, lr 4e-4, 30k warmup (Liu et al. 2019).
    "roberta-large": ("roberta", "large", 32, 1, "AdamW", 4e-4, 30000,
                      {"gelu": "recompute", "norm": "inplace", "attention": "tempo", "dropout": "seed"}),
    # GPT-2 medium (355M): causal LM, lr 1.5e-4 as in Megatron-LM's GPT-2 345M recipe; no attention dropout
    # recomputation needed with "lean" attention.
    "gpt2-medium": ("gpt2", "medium", 8, 4, "AdamW", 1.5e-4, 3000,
                    {"gelu": "recompute", "norm": "inplace", "attention": "lean", "dropout": "seed"}),
}
STAGES = (1, 2, 3)
DTYPES = ("bf16", "fp16")
CHECKPOINTING = (False, True)


def config(model: str, stage: int, dtype: str, ckpt: bool, tempo: bool) -> dict:
    arch, size, micro, accum, opt, lr, warmup, techniques = MODELS[model]
    params = {"lr": lr, "betas": [0.9, 0.98 if arch == "roberta" else 0.999], "eps": 1e-6, "weight_decay": 0.01}
    if opt == "AdamW":
        params["torch_adam"] = True
    out: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "steps_per_print": 100,
        "optimizer": {"type": opt, "params": params},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                          "warmup_num_steps": warmup, "total_num_steps": 100000}},
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        out["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                         "stage3_prefetch_bucket_size": 50_000_000,
                                         "stage3_max_live_parameters": 1_000_000_000})
    if dtype == "bf16":
        out["bf16"] = {"enabled": True}
    else:
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if ckpt:
        # Every layer recomputed through deepspeed.checkpointing (launch/train.py turns it on for the model when
        # this section is present). partition_activations / cpu_checkpointing stay off: see DESIGN.md section 7.
        out["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False,
                                           "synchronize_checkpoint_boundary": False}
    if tempo:
        out["tempo"] = {"enabled": True, **techniques}
    return out


def files() -> dict[Path, dict]:
    out = {}
    for model in MODELS:
        for stage in STAGES:
            for dtype in DTYPES:
                for ckpt in CHECKPOINTING:
                    name = f"zero{stage}-{dtype}{'-ckpt' if ckpt else ''}.json"
                    out[Path(model) / name] = config(model, stage, dtype, ckpt, tempo=True)
                    out[Path("baselines") / model / name] = config(model, stage, dtype, ckpt, tempo=False)
    return out


def render(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(root: Path = ROOT) -> int:
    for rel, data in files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(data), encoding="utf-8")
    print(f"wrote {len(files())} configs under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))

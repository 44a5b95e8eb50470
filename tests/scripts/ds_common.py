"""Shared by the ds_*.py scripts that tests/test_deepspeed_integration.py launches under `deepspeed --num_gpus 2`:
tiny BERT and Llama models, DeepSpeed configs, a training loop, parameter snapshots, per-rank JSON output."""
import json
import os
import sys
import warnings

import torch
import torch._dynamo  # noqa: F401  imported lazily inside zero.Init it trips over zero.Init's patched constructors
import transformers

import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

import tempo_ds
from tempo_ds.deepspeed_integration import deepspeed_activation_checkpointing

VOCAB = 101
SEQ = 16
MICRO_BATCH = 2
CHECKPOINTING = ("none", "deepspeed", "deepspeed_non_reentrant", "torch_reentrant", "torch_non_reentrant")


def model_config(arch: str, dropout: float = 0.0):
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=172, max_position_embeddings=32,
                                       attention_dropout=dropout, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return cfg


def ds_config(stage: int, dtype: str = "fp32", checkpointing: str = "none", arch: str = "bert", **extra) -> dict:
    """fp32 trains with AdamW. bf16 trains with SGD + momentum: Adam divides by sqrt(v), so a bf16 rounding
    difference in a near-zero gradient becomes a +-lr step (measured with AdamW, lr 1e-3, 3 steps: 3-5% of the
    elements moved opposite ways, loss still within 1.3e-4); SGD keeps parameter differences proportional to
    gradient differences, so comparing final parameters stays meaningful."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition LayerNorm weights and biases too
    if dtype == "fp32":
        optimizer = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}
    else:
        optimizer = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
              "optimizer": optimizer, "zero_allow_untested_optimizer": True, "zero_optimization": zero, **extra}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if checkpointing.startswith("deepspeed"):
        # DeepSpeed 0.19.8's partition_activations misplaces None positional arguments on recompute (its
        # merge_tensors skips the size slot only after a tensor), and HF BERT layers get encoder_hidden_states=None
        # positionally; cpu_checkpointing needs partition_activations on the CPU accelerator. Llama gets both.
        offload = arch == "llama"
        config["activation_checkpointing"] = {"partition_activations": offload, "cpu_checkpointing": offload,
                                              "synchronize_checkpoint_boundary": True}
    return config


def build_model(arch: str, config: dict, seed: int = 0, dropout: float = 0.0):
    """The same initial weights for a given seed; under ZeRO-3 built inside zero.Init the way transformers does
    (an HfDeepSpeedConfig alive during construction, weights initialised inside GatheredParameters)."""
    cfg = model_config(arch, dropout)
    cls = transformers.BertForMaskedLM if arch == "bert" else transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    if config["zero_optimization"]["stage"] == 3:
        keep = HfDeepSpeedConfig(config)  # noqa: F841  (a weak global reference: must outlive construction)
        return cls._from_config(cfg)
    return cls(cfg)


def enable_checkpointing(model, mode: str) -> None:
    if mode == "none":
        return
    if mode.startswith("deepspeed"):
        deepspeed_activation_checkpointing(model, reentrant=mode == "deepspeed")
    elif mode == "torch_reentrant":  # HF's long-standing name (a deprecated alias in transformers 5.23)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.activation_checkpointing_enable({"use_reentrant": False})


def batches(steps: int, seed: int = 1):
    """Different data on each rank, the same on every run."""
    gen = torch.Generator().manual_seed(seed + 1000 * int(os.environ.get("RANK", 0)))
    return [torch.randint(3, VOCAB, (MICRO_BATCH, SEQ), generator=gen) for _ in range(steps)]


def train(engine, data) -> list[float]:
    losses = []
    for ids in data:
        ids = ids.to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Full (gathered under ZeRO-3) float32 copies of the module's parameters."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def max_diff(a: dict, b: dict) -> dict:
    """Over all parameters: the largest |a - b|, and the largest excess of |a - b| over two tolerances
    (<= 0 means within): fp32 ``1e-5 * |b| + 1e-5``; bf16 ``2**-7 * |b|``, one bf16 rounding step at worst."""
    out = {"abs": 0.0, "excess_fp32": -1.0, "excess_bf16": -1.0}
    for name, x in a.items():
        d = (x - b[name]).abs()
        out["abs"] = max(out["abs"], d.max().item())
        out["excess_fp32"] = max(out["excess_fp32"], (d - 1e-5 * b[name].abs() - 1e-5).max().item())
        out["excess_bf16"] = max(out["excess_bf16"], (d - 2 ** -7 * b[name].abs()).max().item())
    return out


def free(*engines) -> None:
    for engine in engines:
        engine.destroy()


def init_distributed() -> None:
    """One thread per rank: 2 ranks on 2 cores, and OpenMP threads spinning on a shared core cost 100x."""
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def script_args() -> list[str]:
    """The script's arguments without the --local_rank=N the launcher inserts."""
    return [a for a in sys.argv[1:] if not a.startswith("--local_rank")]


def write(out_dir: str, data: dict) -> None:
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, **data}, f)


def finish() -> None:
    """Exit without interpreter teardown once the results are written: DeepSpeed's shared-memory communication
    threads can abort the process ("terminate called without an active exception") while C++ statics are
    destroyed, turning a finished run into a failed launch."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def layer_calls(model) -> list[int]:
    """A counter of forward calls of the first layer's attention (recomputation makes it 2 per step)."""
    prefix, _ = tempo_ds.memory.find_layers(model)
    attention = next(m for n, m in model.named_modules() if n.startswith(prefix + ".0.") and
                     n.endswith(("attention", "self_attn")))
    calls = [0]
    attention.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


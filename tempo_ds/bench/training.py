"""Loss after N training steps: the same initial weights, batches and dropout draws for every variant."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from ..inject import inject
from .variants import liger_patched


def train(model, batches: list[dict], steps: int, *, tempo: dict | None = None, attn: str | None = None,
          liger: bool = False, lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Per-step losses of ``steps`` AdamW steps on ``batches[:steps]``, trained on a copy of ``model`` (which
    stays untouched) with ``tempo`` (a TempoConfig dict) injected into the copy, or none, and with the
    transformers attention implementation ``attn`` (default: the model's); ``liger``: Liger-Kernel's instance patch
    on the copy instead (CUDA).

    A 16-bit model trains as mixed-precision frameworks do: 16-bit weights and gradients, an fp32 master copy
    of the weights that AdamW updates and that is copied back after each step; fp16 adds a dynamic loss scale
    (``torch.amp.GradScaler``). The loss is ``lm_loss``. The global RNG is seeded with ``seed`` once before
    the first step, so dropout differs between two runs only through ``seed``.
    """
    if steps < 1 or steps > len(batches):
        raise ValueError(f"steps={steps} must be between 1 and the {len(batches)} batches given")
    model = copy.deepcopy(model)
    model.train()
    if attn is not None and attn != model.config._attn_implementation:
        model.set_attn_implementation(attn)
    if tempo is not None:
        inject(model, tempo)
    with liger_patched(model) if liger else nullcontext():
        return _train(model, batches, steps, lr=lr, seed=seed)


def _train(model, batches: list[dict], steps: int, *, lr: float, seed: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    device, dtype = params[0].device, params[0].dtype
    low = dtype != torch.float32
    master = [p.detach().float().clone().requires_grad_() for p in params] if low else params
    opt = torch.optim.AdamW(master, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(seed)
    losses = []
    for batch in batches[:steps]:
        loss = lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        scaler.scale(loss).backward()
        if low:
            for p, m in zip(params, master):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if low:
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
        losses.append(loss.item())
    return losses


def lm_loss(model, batch: dict) -> torch.Tensor:
    """The model's own LM loss on ``batch`` (labels included), as float32: transformers' ``loss_function`` on
    logits upcast to float32 for an untouched model, ``lm_loss="chunked"``'s op for an injected one (the same
    value, without the logits)."""
    return model(**batch).loss.float()


def tail(steps: int) -> int:
    """How many final steps the reported loss averages: a quarter of the run, at least 1, at most 20."""
    return max(1, min(20, steps // 4))


def final_loss(losses: list[float], last: int | None = None) -> float:
    """Mean loss of the last ``last`` steps (default ``tail(len(losses))``)."""
    last = tail(len(losses)) if last is None else last
    return sum(losses[-last:]) / last

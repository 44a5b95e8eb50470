"""``inject`` / ``revert``: make a model memory-lean in place, and undo it.

``inject`` swaps modules in place and keeps the original Parameter objects, so ``state_dict`` keys,
optimizers, pretrained weights and ZeRO-3 partitions survive. Call it before ``deepspeed.initialize``.
The whole plan is built (every new module constructed) before anything is changed, so a failure leaves
the model untouched. Calling it again with the same config does nothing; with another config it first
reverts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import TempoConfig
from .policies import Plan, Skip, Swap, policy_for

__all__ = ["inject", "revert", "InjectionReport", "is_injected"]

_STATE = "_tempo_ds_state"


@dataclass
class InjectionReport:
    """What ``inject`` replaced, what it left alone and why; ``measure(batch)`` adds bytes before/after."""

    policy: str
    config: TempoConfig
    replaced: list[Swap] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    attention: tuple[str, str] | None = None  # (before, after) transformers attention implementation
    notes: list[str] = field(default_factory=list)
    memory: dict | None = None
    _model: nn.Module | None = field(default=None, repr=False)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for swap in self.replaced:
            out[swap.technique] = out.get(swap.technique, 0) + 1
        return out

    def measure(self, batch: dict, *, seed: int = 0) -> dict:
        """Meter one training-mode forward pass on ``batch`` with tempo_ds and without (reverting and
        re-injecting around it); returns and stores ``{"before": ..., "after": ...}`` byte figures."""
        from .memory import SavedTensorMeter

        model = self._model
        if model is None or not is_injected(model):
            raise RuntimeError("measure() needs the model this report came from, still injected")

        def run() -> dict:
            was_training = model.training
            model.train()
            rng = torch.get_rng_state()
            torch.manual_seed(seed)
            with SavedTensorMeter(model) as meter:
                out = model(**batch)
            del out
            torch.set_rng_state(rng)
            model.train(was_training)
            return {"total_bytes": meter.total_bytes, "per_layer_bytes": meter.per_layer}

        after = run()
        config = self.config
        revert(model)
        try:
            before = run()
        finally:
            report = inject(model, config)
        self.memory = {"before": before, "after": after}
        report.memory = self.memory
        return self.memory

    def __str__(self) -> str:
        lines = [f"tempo_ds injection (policy: {self.policy}; "
                 + ", ".join(f"{k}={v}" for k, v in self.config.techniques().items()) + ")"]
        if self.attention:
            lines.append(f"  attention implementation: {self.attention[0]} -> {self.attention[1]}")
        lines.extend(f"  note: {note}" for note in self.notes)
        width = max([len(s.name) for s in self.replaced + self.skipped] + [6])
        if self.replaced:
            lines.append(f"  {'replaced':<{width}}  {'before':<22} {'after':<22} technique")
            for s in self.replaced:
                lines.append(f"  {s.name:<{width}}  {type(s.old).__name__:<22} {type(s.new).__name__:<22} {s.technique}")
        if self.skipped:
            lines.append(f"  {'left alone':<{width}}  {'module':<22} reason")
            for s in self.skipped:
                lines.append(f"  {s.name:<{width}}  {s.kind:<22} {s.reason}")
        if self.memory:
            b, a = self.memory["before"], self.memory["after"]
            lines.append(f"  saved for backward: {b['total_bytes']:,} -> {a['total_bytes']:,} bytes "
                         f"({a['total_bytes'] / max(b['total_bytes'], 1):.2f}x)")
            if b["per_layer_bytes"]:
                mid = len(b["per_layer_bytes"]) // 2
                lines.append(f"  per layer (layer {mid}): {b['per_layer_bytes'][mid]:,} -> "
                             f"{a['per_layer_bytes'][mid]:,} bytes")
        return "\n".join(lines)


def is_injected(model: nn.Module) -> bool:
    return hasattr(model, _STATE)


def inject(model: nn.Module, config: TempoConfig | dict | str | None = None, *, policy: str | None = None,
           **overrides) -> InjectionReport:
    """Swap memory-lean modules into ``model`` in place and return an :class:`InjectionReport`.

    ``config``: a TempoConfig, a dict, a JSON path/text or a whole DeepSpeed config (its ``"tempo"``
    section); ``overrides`` win (``inject(model, gelu="inplace")``). ``policy`` forces a registered policy
    by name instead of choosing by ``model.config.model_type``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects a torch.nn.Module, got {type(model).__name__}")
    cfg = TempoConfig.build(config, **overrides)
    state = getattr(model, _STATE, None)
    if state is not None:
        if state["report"].config == cfg and (policy is None or policy == state["report"].policy):
            return state["report"]
        revert(model)
    chosen = policy_for(model, policy)
    if not cfg.enabled:
        return InjectionReport(chosen.name, cfg, _model=model)
    plan = chosen.plan(model, cfg)
    report = _apply(model, plan, cfg)
    return report


def _apply(model: nn.Module, plan: Plan, cfg: TempoConfig) -> InjectionReport:
    originals: dict[str, nn.Module] = {}
    for swap in plan.swaps:
        _set_submodule(model, swap.name, swap.new)
        originals.setdefault(swap.name, swap.old)
    attention = None
    if plan.attention is not None:
        before = model.config._attn_implementation
        model.set_attn_implementation(plan.attention)
        attention = (before, model.config._attn_implementation)
    for patch in plan.patches:
        patch.apply(model)
    notes = _notes(model) + [patch.note for patch in plan.patches if getattr(patch, "note", None)]
    report = InjectionReport(plan.policy, cfg, plan.swaps, plan.skips, attention, notes, _model=model)
    # A plain attribute (not a submodule): the originals share their Parameters with the replacements and
    # must not appear twice in parameters() or state_dict().
    object.__setattr__(model, _STATE, {"originals": originals, "attention": attention, "report": report,
                                       "patches": plan.patches})
    return report


def _notes(model: nn.Module) -> list[str]:
    notes = []
    can_generate = getattr(model, "can_generate", None)
    if getattr(getattr(model, "config", None), "use_cache", False) and callable(can_generate) and can_generate():
        notes.append("config.use_cache is True: a forward that fills a KV cache keeps a copy of k and v in every "
                     "layer; set model.config.use_cache = False for training")
    return notes


def revert(model: nn.Module) -> nn.Module:
    """Put back the modules (and attention implementation) ``inject`` replaced; a no-op if not injected."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for patch in reversed(state.get("patches", ())):
        patch.undo(model)
    for name, module in state["originals"].items():
        write_back = getattr(model.get_submodule(name), "write_back", None)
        if callable(write_back):  # a replacement with Parameters of its own hands their values back
            write_back(module)
        _set_submodule(model, name, module)
    if state["attention"] is not None:
        model.set_attn_implementation(state["attention"][0])
    object.__delattr__(model, _STATE)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

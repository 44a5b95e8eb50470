"""Injection policies: which modules of a model tempo_ds replaces, with what, and which it leaves alone.

A policy plans; ``tempo_ds.inject`` applies the plan. Every policy handles the parts that are safe in any
transformer — LayerNorm/RMSNorm (saving the output instead of the input is never worse), ``nn.Dropout``
(a seed instead of a mask) and attention through transformers' ``AttentionInterface`` — and differs in
what it knows about the MLP: which activation feeds which Linear. In-place GELU and GELU recompute only
pay when that Linear saves the activation's output, so an activation whose consumer the policy cannot
see is left alone and reported. Few-bit activations keep only their code and are safe anywhere.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .config import TempoConfig
from .memory import find_layers

__all__ = ["Policy", "Swap", "Skip", "Plan", "register_policy", "policy_for", "POLICIES"]

TANH_GELU = "gelu_tanh"
GELU_NAMES = ("gelu", TANH_GELU)


@dataclass
class Swap:
    """Replace the module at ``name`` with ``new`` (built by the policy, holding the old Parameters)."""

    name: str
    old: nn.Module
    new: nn.Module
    technique: str


@dataclass
class Skip:
    name: str
    kind: str
    reason: str


@dataclass
class Plan:
    policy: str
    swaps: list[Swap] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    attention: str | None = None  # the transformers attention implementation to select
    patches: list = field(default_factory=list)  # model-level changes: apply(model), undo(model), note


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class Policy:
    """A family's knowledge: the model types it serves and its MLP's (activation, consumer) pairs.

    ``mlp_pairs`` are paths relative to one transformer layer, e.g. BERT's
    ``("intermediate.intermediate_act_fn", "output.dense")``. ``gated`` marks SwiGLU/GeGLU MLPs, whose
    activation output feeds a multiplication (which saves it) rather than a Linear.
    """

    name: str
    model_types: tuple[str, ...] = ()
    mlp_pairs: tuple[tuple[str, str], ...] = ()
    gated: bool = False

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    # -- planning ------------------------------------------------------------------------------------
    def plan(self, model: nn.Module, cfg: TempoConfig) -> Plan:
        plan = Plan(self.name)
        skip = _skipper(cfg)
        pairs = self._activation_pairs(model)
        claimed: set[str] = set()
        for name, module in model.named_modules():
            if not name:
                continue
            if skip(name):
                if _is_candidate(module):
                    plan.skips.append(Skip(name, type(module).__name__, "matched a 'skip' pattern"))
                continue
            if any(name.startswith(c + ".") for c in claimed):
                continue
            step = self._plan_module(name, module, cfg, pairs, plan)
            if step:
                claimed.add(name)
        from .lm_loss import plan_lm_loss

        plan_lm_loss(model, cfg, plan, skip)
        plan.attention = self._plan_attention(model, cfg, plan)
        return plan

    def _plan_module(self, name, module, cfg, pairs, plan) -> bool:
        from .nn.fewbit import activation_name

        if type(module).__module__.startswith("tempo_ds."):
            return False  # already one of ours
        if cfg.mlp == "recompute" and _is_gated_candidate(module):
            return self._plan_gated_mlp(name, module, cfg, plan)
        if cfg.norm == "inplace" and cfg.qk_norm == "rope" and _is_qk_norm_attention(module) and \
                not any(_skipper(cfg)(f"{name}.{norm}") for norm in ("q_norm", "k_norm")):
            return self._swap(plan, name, module, "qk_norm=rope", _qk_norm_rope_attention)
        if cfg.norm == "inplace" and _is_norm(module):
            return self._swap(plan, name, module, "norm=inplace", _inplace_norm)
        if cfg.norm == "inplace" and _norms_not_worth_replacing(module):
            plan.skips.append(Skip(name, type(module).__name__, f"norm=inplace: {_norms_not_worth_replacing(module)}"))
            return True  # claimed: the norms inside stay HF's
        if cfg.dropout == "seed" and type(module) is nn.Dropout:
            return self._swap(plan, name, module, "dropout=seed", _seed_dropout)
        act = activation_name(module)
        if act in GELU_NAMES and cfg.gelu != "off":
            return self._plan_gelu(name, module, act, cfg, pairs, plan)
        if act == "silu" and cfg.silu == "fewbit":
            return self._swap(plan, name, module, "silu=fewbit", _fewbit(cfg, "silu"))
        return False

    def _plan_gated_mlp(self, name, module, cfg, plan) -> bool:
        """A whole gated MLP (any family: recognised by structure) fused into its down projection; transformers 5's
        3-D MoE experts keep only the routed gate_up outputs."""
        from .nn.gated_mlp import GatedMLP
        from .nn.moe_experts import MoEExperts, is_moe_experts

        moe = is_moe_experts(module)
        try:
            fused = MoEExperts.from_module(module) if moe else GatedMLP.from_module(module)
        except TypeError as exc:
            plan.skips.append(Skip(name, type(module).__name__, f"mlp=recompute: {'MoE experts: ' if moe else ''}{exc}"))
            return False
        plan.swaps.append(Swap(name, module, fused, "mlp=recompute"))
        act_name = "act_fn" if moe else fused.act_name
        key = "silu" if fused.activation == "silu" else "gelu"
        if getattr(cfg, key) == "fewbit" and hasattr(module, act_name):  # (Liger's MLPs have no activation module)
            what = "MoE experts" if moe else "a gated MLP"
            plan.skips.append(Skip(f"{name}.{act_name}", type(getattr(module, act_name)).__name__,
                                   f"{key}=fewbit: inside {what} fused by mlp=recompute, which keeps fewer bytes "
                                   "(the gate and up outputs only) and is exact; set mlp='off' for few-bit here"))
        return True

    def _plan_gelu(self, name, module, act, cfg, pairs, plan) -> bool:
        approximate = "tanh" if act == TANH_GELU else "none"
        if cfg.gelu == "fewbit":
            return self._swap(plan, name, module, "gelu=fewbit", _fewbit(cfg, act))
        consumer = pairs.get(name)
        if consumer is None:
            why = getattr(pairs, "reasons", {}).get(name) or \
                f"the {self.name} policy cannot see which Linear consumes this activation"
            plan.skips.append(Skip(name, type(module).__name__,
                                   f"gelu={cfg.gelu}: {why}, so saving its output might cost memory "
                                   "(gelu=fewbit is safe here)"))
            return False
        consumer_name, consumer_module = consumer
        if cfg.gelu == "inplace":
            return self._swap(plan, name, module, "gelu=inplace", lambda m: _inplace_gelu(m, approximate))
        from .nn.gelu_linear import GeluLinear

        try:
            fused = GeluLinear.from_linear(consumer_module, approximate)
        except (TypeError, ValueError) as exc:
            plan.skips.append(Skip(consumer_name, type(consumer_module).__name__, f"gelu=recompute: {exc}"))
            return False
        plan.swaps.append(Swap(name, module, nn.Identity(), "gelu=recompute (moved into the next Linear)"))
        plan.swaps.append(Swap(consumer_name, consumer_module, fused, "gelu=recompute"))
        return True

    def _swap(self, plan: Plan, name: str, module: nn.Module, technique: str, build: Callable) -> bool:
        try:
            new = build(module)
        except (TypeError, ValueError) as exc:
            plan.skips.append(Skip(name, type(module).__name__, f"{technique}: {exc}"))
            return False
        plan.swaps.append(Swap(name, module, new, technique))
        return True

    def _plan_attention(self, model: nn.Module, cfg: TempoConfig, plan: Plan) -> str | None:
        if cfg.attention == "off":
            return None
        config = getattr(model, "config", None)
        can_set = getattr(model, "_can_set_attn_implementation", None)
        if config is None or not callable(can_set) or not can_set():
            plan.skips.append(Skip("<attention>", type(model).__name__,
                                   f"attention={cfg.attention}: the model does not dispatch attention through "
                                   "transformers' AttentionInterface"))
            return None
        if getattr(config, "attn_logit_softcapping", None) is not None:  # Gemma 2
            plan.skips.append(Skip("<attention>", type(model).__name__,
                                   f"attention={cfg.attention}: the model soft-caps its attention scores "
                                   "(config.attn_logit_softcapping), which tempo_ds's attention does not compute"))
            return None
        from .hf_attention import implementation_name

        return implementation_name(cfg.attention, cfg.mask_check)

    # -- which activation feeds which Linear ---------------------------------------------------------
    def _activation_pairs(self, model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
        """{activation module name: (consumer name, consumer module)} for the pairs this policy knows."""
        pairs: dict[str, tuple[str, nn.Module]] = {}
        prefix, count = find_layers(model)
        modules = dict(model.named_modules())
        for i in range(count):
            base = f"{prefix}.{i}." if prefix else f"{i}."
            for act, consumer in self.mlp_pairs:
                c = modules.get(base + consumer)
                if base + act in modules and c is not None and (_is_linear(c) or _is_conv1d(c)):
                    pairs[base + act] = (base + consumer, c)
        return pairs


class _Pairs(dict):
    """{activation name: (consumer name, consumer module)}, with ``reasons``: {activation name: why it has none}."""

    def __init__(self, *args, reasons: dict[str, str] | None = None):
        super().__init__(*args)
        self.reasons = reasons or {}


class GenericPolicy(Policy):
    """Any model built from ``nn.LayerNorm``, GELU modules and transformers' attention interface.

    Finds (activation, consumer) pairs by tracing one forward pass on the model's ``dummy_inputs`` and
    verifying each pair by its outputs (``tempo_ds.tracing``). A model that cannot be traced (meta device,
    ZeRO-3-partitioned parameters, no ``dummy_inputs``) gets structural rules instead: an activation followed
    by a Linear in an ``nn.Sequential``, or an activation attribute beside a conventionally named output
    projection (``fc2``, ``c_proj``, ``dense_4h_to_h``, ``wo``) in a module without a gate
    (``gate_proj``/``up_proj``).
    """

    SIBLINGS = ("fc2", "c_proj", "dense_4h_to_h", "wo", "fc_out")

    def matches(self, model: nn.Module) -> bool:
        return True

    def _activation_pairs(self, model):
        from .nn.fewbit import activation_name
        from .tracing import trace_activation_consumers, why_not_traceable

        candidates = {n: m for n, m in model.named_modules() if activation_name(m) in GELU_NAMES}
        if not candidates:
            return _Pairs()
        untraceable = why_not_traceable(model)
        if untraceable is None:
            forms = {n: "tanh" if activation_name(m) == TANH_GELU else "none" for n, m in candidates.items()}
            traced = trace_activation_consumers(model, candidates, forms)
            return _Pairs(traced.pairs, reasons=traced.rejected)
        pairs = self._structural_pairs(model)
        reason = f"not traced ({untraceable}) and no structural rule names its consumer"
        return _Pairs(pairs, reasons={n: reason for n in candidates if n not in pairs})

    def _structural_pairs(self, model):
        from .nn.fewbit import activation_name

        pairs = {}
        for parent_name, parent in model.named_modules():
            children = list(parent.named_children())
            gated = any(n in ("gate_proj", "up_proj", "w3") for n, _ in children)
            for idx, (child_name, child) in enumerate(children):
                if activation_name(child) not in GELU_NAMES or gated:
                    continue
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                consumer = None
                if isinstance(parent, nn.Sequential) and idx + 1 < len(children):
                    consumer = children[idx + 1]
                else:
                    consumer = next(((n, m) for n, m in children if n in self.SIBLINGS), None)
                if consumer and (_is_linear(consumer[1]) or _is_conv1d(consumer[1])):
                    c_full = f"{parent_name}.{consumer[0]}" if parent_name else consumer[0]
                    pairs[full] = (c_full, consumer[1])
        return pairs


POLICIES: list[Policy] = [
    Policy("bert", ("bert", "roberta", "xlm-roberta", "camembert"),
           (("intermediate.intermediate_act_fn", "output.dense"),)),
    Policy("gpt2", ("gpt2",), (("mlp.act", "mlp.c_proj"),)),
    Policy("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3",
                     "mixtral", "olmo2", "granite", "cohere", "stablelm"), (), gated=True),
]
GENERIC = GenericPolicy("generic")


def register_policy(policy: Policy, *, first: bool = True) -> Policy:
    """Add a policy to the registry (checked before the built-in ones unless ``first=False``)."""
    if not isinstance(policy, Policy):
        raise TypeError(f"register_policy expects a tempo_ds.policies.Policy, got {type(policy).__name__}")
    POLICIES.insert(0, policy) if first else POLICIES.append(policy)
    return policy


def policy_for(model: nn.Module, name: str | None = None) -> Policy:
    """The policy named ``name``, else the first registered policy matching the model, else the generic one."""
    if name is not None:
        for policy in POLICIES + [GENERIC]:
            if policy.name == name:
                return policy
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(p.name for p in POLICIES + [GENERIC])}")
    return next((p for p in POLICIES if p.matches(model)), GENERIC)


def _is_candidate(module: nn.Module) -> bool:
    """Whether some technique would consider this module (for reporting what 'skip' left alone)."""
    from .nn.fewbit import activation_name

    return (_is_norm(module)
            or type(module) is nn.Dropout or activation_name(module) is not None or _is_gated_candidate(module))


def _is_gated_candidate(module: nn.Module) -> bool:
    from .nn.gated_mlp import is_gated_mlp_candidate
    from .nn.moe_experts import is_moe_experts

    return is_gated_mlp_candidate(module) or is_moe_experts(module)


def _skipper(cfg: TempoConfig):
    patterns = list(cfg.skip)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -- builders: each returns a new module holding the old module's Parameter objects ----------------------
def _is_norm(module):
    from .nn.norm_families import is_norm

    return is_norm(module)


def _is_qk_norm_attention(module):
    from .nn.qk_norm_rope import is_qk_norm_attention_candidate

    return is_qk_norm_attention_candidate(module)


def _qk_norm_rope_attention(module):
    """The attention with its q/k norms and RoPE fused (``tempo_ds.nn.qk_norm_rope``); TypeError with the reason."""
    from .nn.qk_norm_rope import QKNormRopeAttention

    return QKNormRopeAttention.from_module(module)


def _norms_not_worth_replacing(module):
    from .nn.norm_families import not_worth_replacing

    return not_worth_replacing(module)


def _inplace_norm(module):
    """The norm's in-place replacement, chosen by the arithmetic its code runs (``tempo_ds.nn.norm_families``)."""
    from .nn.norm_families import inplace_norm

    return inplace_norm(module)


def _seed_dropout(module):
    from .nn.dropout import SeedDropout

    return SeedDropout(module.p, module.inplace).train(module.training)


def _inplace_gelu(module, approximate):
    from .nn.gelu import InplaceGELU

    return InplaceGELU(approximate).train(module.training)


def _fewbit(cfg: TempoConfig, name: str):
    def build(module):
        from .nn.fewbit import from_module

        return from_module(module, bits=cfg.fewbit.bits_for(name)).train(module.training)
    return build

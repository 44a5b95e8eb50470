"""``MoEExperts``: transformers 5's gated MoE experts module (3-D ``gate_up_proj`` / ``down_proj``) over
:func:`tempo_ds.ops.moe_experts`, which keeps only each routed slot's gate_up output for backward.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and the other models whose ``*Experts`` class is decorated with
``@use_experts_implementation`` in its default form (concatenated [gate; up] rows, not transposed, no bias,
no post-expert norm, the default ``_apply_gate``) and whose own forward is the per-expert loop
``down(act(gate) * up) * w`` summed with ``index_add_``. :meth:`MoEExperts.from_module` recognises these by
structure, never by class name: the two 3-D Parameters and their shapes, the decorator's flags, the
activation child (exactly ``F.silu`` or tanh-GELU), the forward's syntax tree and the configured experts
implementation (``grouped_mm``, ``eager`` or ``batched_mm``; the GPU-only kernels ``deepgemm`` / ``sonicmoe``
and expert parallelism are left to HF). Anything else raises ``TypeError`` with the reason, so a policy
skips and reports it.

The new module holds the original Parameter objects under the same names, and the activation module as
``act_fn``, so ``state_dict`` keys, optimizers and ZeRO-3 partitions carry over; DeepSpeed's per-module
hooks gather the Parameters when it is called. Exact: bit for bit against HF's default ``grouped_mm``
implementation, within reduction order against ``eager`` / ``batched_mm`` (see the op's docstring).
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import nn

from tempo_ds.ops._library import autocast_dtype
from tempo_ds.ops.moe_experts import moe_experts

__all__ = ["MoEExperts", "is_moe_experts"]

# The experts implementations whose maths this module reproduces (how each treats autocast: ``MoEExperts.forward``)
IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
          "has_post_expert_norm": False, "_is_expert_parallel": False}
_PLAIN_ATTRS = ("config", "num_experts", "hidden_dim", "intermediate_dim", "has_gate", "has_bias",
                "is_transposed", "is_concatenated", "has_post_expert_norm", "_is_expert_parallel")
_LOOP = '''
def forward(self, hidden_states, top_k_index, top_k_weights):
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.ACT(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states
'''


def is_moe_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds ``gate_up_proj`` / ``down_proj`` as 3-D Parameters (one slice per expert), so a
    policy should try :meth:`MoEExperts.from_module` on it and report why when it fails."""
    if isinstance(module, MoEExperts):
        return False
    params = module._parameters
    return any(isinstance(params.get(n), torch.Tensor) and len(_shape(params[n])) == 3
               for n in ("gate_up_proj", "down_proj"))


def _shape(param: torch.Tensor) -> torch.Size:
    """The full shape, also of a ZeRO-3 Parameter partitioned away (its ``ds_shape``; its data is empty)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


class MoEExperts(nn.Module):
    """``forward(hidden_states [T, h], top_k_index [T, K], top_k_weights [T, K])`` as HF's experts module,
    keeping only the routed gate_up outputs [T*K, 2i] for backward (HF keeps ``2h + 4i`` values a routed
    slot, this ``2i``). Build it with :meth:`from_module`."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module, activation: str,
                 implementation: str) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.act_fn = act_fn  # kept for introspection; the op computes the activation
        self.activation, self.implementation = activation, implementation

    @classmethod
    def from_module(cls, experts: nn.Module) -> "MoEExperts":
        """The lean twin of a HF experts module, holding its Parameter objects; ``TypeError`` naming the reason
        when ``experts`` is not one this module reproduces exactly."""
        from tempo_ds.nn.gated_mlp import gated_activation

        name = type(experts).__name__
        params, children = dict(experts._parameters), dict(experts.named_children())
        if set(params) != {"gate_up_proj", "down_proj"} or any(p is None for p in params.values()):
            raise TypeError(f"{name} has parameters {sorted(params)}; gated experts have exactly gate_up_proj and "
                            "down_proj (biased experts, e.g. GPT-OSS, are not supported)")
        gu, down = params["gate_up_proj"], params["down_proj"]
        gu_shape, down_shape = _shape(gu), _shape(down)
        if len(gu_shape) != 3 or len(down_shape) != 3 or gu_shape[1] != 2 * down_shape[2] \
                or gu_shape[0] != down_shape[0] or gu_shape[2] != down_shape[1]:
            raise TypeError(f"{name}: gate_up_proj {tuple(gu_shape)} and down_proj {tuple(down_shape)} are not "
                            "[E, 2i, h] and [E, h, i] (transposed or ungated experts are not supported)")
        if list(experts._buffers):
            raise TypeError(f"{name} holds buffers {sorted(experts._buffers)}")
        if set(children) != {"act_fn"}:
            raise TypeError(f"{name} has children {sorted(children)}; gated experts have only act_fn")
        flags = {k: getattr(experts, k, None) for k in _FLAGS}
        wrong = {k: v for k, v in flags.items() if v != _FLAGS[k]}
        if wrong:
            raise TypeError(f"{name}: experts flags {wrong} (supported: {_FLAGS}); only concatenated, untransposed, "
                            "unbiased gated experts without a post-expert norm or expert parallelism are taken")
        from transformers.integrations import moe as hf_moe

        if getattr(type(experts), "_apply_gate", None) is not hf_moe._default_apply_gate:
            raise TypeError(f"{name} has its own _apply_gate (not act(gate) * up)")
        if experts._forward_hooks or experts._forward_pre_hooks or children["act_fn"]._forward_hooks \
                or children["act_fn"]._forward_pre_hooks:
            raise TypeError(f"{name} (or its act_fn) has forward hooks that the lean module would not run")
        activation = gated_activation(children["act_fn"])
        if activation is None:
            raise TypeError(f"{name}.act_fn is {type(children['act_fn']).__name__}, which is not exactly SiLU or "
                            "tanh-GELU (F.silu / F.gelu(approximate='tanh'))")
        if not _loop_matches(type(experts)):
            raise TypeError(f"{name}.forward is not transformers' experts dispatch over the per-expert loop "
                            "down_proj[e](act_fn(gate) * up) * top_k_weights")
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
        if impl not in IMPLEMENTATIONS:
            raise TypeError(f"{name}: experts implementation {impl!r} is not one of {IMPLEMENTATIONS}")
        if getattr(experts, "num_experts", gu_shape[0]) != gu_shape[0]:
            raise TypeError(f"{name}.num_experts = {experts.num_experts} but gate_up_proj holds {gu_shape[0]} experts")
        new = cls(gu, down, children["act_fn"], activation, impl)
        for attr in _PLAIN_ATTRS:
            if attr in experts.__dict__:
                setattr(new, attr, experts.__dict__[attr])
        return new.train(experts.training)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # HF's grouped_mm casts to the weights' dtype whatever autocast says; its eager loop and bmm autocast
        compute = None if self.implementation == "grouped_mm" else autocast_dtype(hidden_states)
        return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                           self.activation, compute)

    def extra_repr(self) -> str:
        e, two_i, h = _shape(self.gate_up_proj)
        return (f"num_experts={e}, hidden={h}, intermediate={two_i // 2}, activation={self.activation!r}, "
                f"implementation={self.implementation!r}")


def _loop_matches(cls: type) -> bool:
    """``cls.forward`` is transformers' experts dispatch wrapped around the per-expert loop ``_LOOP``."""
    return _forward_matches_loop(cls.forward)


@functools.lru_cache(maxsize=None)  # keyed on the function object: a patched forward is a new key
def _forward_matches_loop(forward) -> bool:
    fn = getattr(forward, "__wrapped__", None)
    code = getattr(forward, "__code__", None)
    if fn is None or code is None or not code.co_qualname.startswith("use_experts_implementation."):
        return False
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return _canonical(source, "act_fn") == _canonical(_LOOP, "ACT")


def _canonical(source: str, act_name: str) -> str | None:
    from tempo_ds.nn.gated_mlp import _Canonical

    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    return ast.dump(_Canonical(act_name).visit(tree))

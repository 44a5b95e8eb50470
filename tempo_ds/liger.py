"""Composing with Liger-Kernel: what tempo_ds does with the modules and forwards Liger patched into a model.

Liger patches a transformers family by rebinding names in ``transformers.models.<family>.modeling_<family>``
(``LlamaRMSNorm`` becomes ``LigerRMSNorm``, ``LlamaMLP`` becomes ``LigerSwiGLUMLP``, ``LlamaForCausalLM.forward``
becomes its fused linear cross-entropy forward), or swaps the modules of one instance. A module is Liger's
when its class is defined in ``liger_kernel``; no check compares against a name Liger may have rebound.

Each Liger module is replaced only where its maths is tempo_ds's op's (read from Liger 0.8's code; the
replacement computes transformers' original arithmetic, which Liger's Triton kernels reproduce up to rounding):

===============================================  ==============================================================
Liger module                                     tempo_ds replacement
===============================================  ==============================================================
``LigerRMSNorm``, casting "llama", offset 0      ``InplaceRMSNorm(casting="llama")``: (x * rstd) rounded, then * w
``LigerRMSNorm``, casting "gemma", offset 1      ``InplaceGemmaRMSNorm``: x * rstd * (1 + w) in float32
``LigerRMSNorm``, casting "gemma", offset 0      ``InplaceRMSNorm(casting="torch")``: x * rstd * w in float32
``LigerLayerNorm``                               ``InplaceLayerNorm``
``LigerSwiGLUMLP``, ``LigerPhi3SwiGLUMLP``       ``GatedMLP`` (SiLU), keeping gate and up only
``LigerGEGLUMLP``                                ``GatedMLP`` (tanh-GELU)
===============================================  ==============================================================

Anything else of Liger's (casting "none", other offsets, its MoE experts, RoPE functions) is left alone and
reported with the reason. A forward Liger installed on the model class (its fused linear cross-entropy) is
Liger's loss, not transformers': tempo_ds does not replace it and says so (:func:`forward_reason`).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_liger", "is_liger_norm", "is_liger_mlp", "norm_from_liger", "mlp_from_liger", "forward_reason"]

_MLPS = {"LigerSwiGLUMLP": ("silu", ("gate_proj", "up_proj")), "LigerPhi3SwiGLUMLP": ("silu", ("gate_up_proj",)),
         "LigerGEGLUMLP": ("gelu_tanh", ("gate_proj", "up_proj"))}


def is_liger(obj) -> bool:
    """Whether ``obj`` (a module, or a function) is defined by Liger-Kernel."""
    module = obj.__module__ if callable(obj) and not isinstance(obj, nn.Module) else type(obj).__module__
    return (module or "").startswith("liger_kernel")


def is_liger_norm(module: nn.Module) -> bool:
    return is_liger(module) and any(base.__name__ in ("LigerRMSNorm", "LigerLayerNorm") for base in type(module).__mro__)


def is_liger_mlp(module: nn.Module) -> bool:
    return is_liger(module) and (type(module).__name__ in _MLPS or type(module).__name__.endswith("MLP"))


def _weight_width(weight: torch.Tensor) -> int:
    return int((getattr(weight, "ds_shape", None) or weight.shape)[-1])


def norm_from_liger(module: nn.Module) -> nn.Module:
    """The in-place norm equal in maths to a Liger norm, holding its Parameters; ``TypeError`` with the reason."""
    from .nn.layer_norm import InplaceLayerNorm
    from .nn.rms_norm import InplaceGemmaRMSNorm, InplaceRMSNorm

    name = type(module).__name__
    if any(base.__name__ == "LigerLayerNorm" for base in type(module).__mro__):
        new = InplaceLayerNorm.__new__(InplaceLayerNorm)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = (_weight_width(module.weight),), module.eps, True
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        return new.train(module.training)
    weight = module.weight
    if weight is None:
        raise TypeError(f"{name} without a weight: tempo_ds's in-place norms rebuild x from y / w")
    mode, offset = str(module.casting_mode).lower(), float(module.offset)
    if mode == "llama" and offset == 0.0:
        new = InplaceRMSNorm(1, module.variance_epsilon, casting="llama", device="meta")
        new.hidden_size = _weight_width(weight)
    elif mode == "gemma" and offset == 1.0:
        new = InplaceGemmaRMSNorm(1, module.variance_epsilon, device="meta")
        new.dim = _weight_width(weight)
    elif mode == "gemma" and offset == 0.0:
        new = InplaceRMSNorm(1, module.variance_epsilon, casting="torch", device="meta")
        new.hidden_size = _weight_width(weight)
    else:
        raise TypeError(f"{name} with casting_mode={mode!r} and offset={offset:g} has no exact tempo_ds equivalent "
                        "(supported: 'llama' with offset 0, 'gemma' with offset 0 or 1)")
    new.register_parameter("weight", weight)
    return new.train(module.training)


def mlp_from_liger(module: nn.Module) -> nn.Module:
    """The ``GatedMLP`` equal in maths to a Liger gated MLP, holding its Parameters; ``TypeError`` with the reason."""
    from .nn.gated_mlp import GatedDownProjection, GatedMLP

    name = type(module).__name__
    if name not in _MLPS:
        raise TypeError(f"{name} is Liger-Kernel's and not one whose maths tempo_ds has verified "
                        f"({', '.join(_MLPS)})")
    activation, inputs = _MLPS[name]
    children = dict(module.named_children())
    for child in (*inputs, "down_proj"):
        if type(children.get(child)) is not nn.Linear:
            raise TypeError(f"{name}.{child} is not an nn.Linear")
    down = GatedDownProjection.from_linear(children["down_proj"], activation)
    act = nn.SiLU() if activation == "silu" else nn.GELU(approximate="tanh")
    return GatedMLP({n: children[n] for n in inputs}, down, "act_fn", act).train(module.training)


def forward_reason(model: nn.Module) -> str | None:
    """Why tempo_ds leaves a model's loss alone when Liger replaced the model class's forward, else None."""
    forward = getattr(type(model).forward, "__wrapped__", type(model).forward)
    if not is_liger(forward):
        return None
    return (f"{type(model).__name__}.forward is Liger-Kernel's {forward.__module__}.{forward.__name__} (its fused "
            "linear cross-entropy keeps the LM head's V x h weight gradient from the forward); tempo_ds leaves "
            "Liger's loss in place. Patch with fused_linear_cross_entropy=False to let lm_loss=chunked keep no "
            "logits and no weight gradient instead")

"""Which norm modules tempo_ds replaces exactly: recognised by the code they run, not by their class name.

``inplace_norm(module)`` returns the in-place module for a norm whose arithmetic tempo_ds reproduces (the
forward equal to the original's bit for bit in float32) and raises ``TypeError`` naming the arithmetic it
lacks otherwise. ``is_norm(module)`` says whether a module is a norm at all (for reports of what was left alone).

Arithmetic (reference class) -> replacement; families in transformers 5.x:

* ``torch.nn.LayerNorm`` -> InplaceLayerNorm: BERT, GPT-2, OPT, StableLM (not its per-head q/k lists, see
  ``not_worth_replacing``), ...
* ``torch.nn.RMSNorm`` (one dimension) -> InplaceRMSNorm (``casting="torch"``).
* ``LlamaRMSNorm`` -> InplaceRMSNorm (``"llama"``): Llama, Mistral, Qwen2, Qwen3 (also its per-head q/k
  norms), Phi-3, Mixtral, Granite, and other verbatim copies.
* ``Olmo2RMSNorm`` -> InplaceRMSNorm (``"torch"``): OLMo 2/3 (post-norms, q/k norms over the projection).
* ``GemmaRMSNorm`` (``1 + w``) -> InplaceGemmaRMSNorm: Gemma, Gemma 2, Gemma 3 (also q/k), Qwen3-Next.
* ``CohereLayerNorm`` -> InplaceCohereLayerNorm: Cohere, Cohere 2 (also per-head q/k).

A class matches a reference when its methods have the reference's bytecode, constants and attribute names
(transformers' "Copied from" classes do); T5's ``T5LayerNorm`` (casts to the weight's dtype) or a LayerNorm
subclass with its own ``forward`` does not, and is left alone. References are the classes transformers itself
defines, never a name a patcher rebound (``rms_norm.transformers_class``); Liger-Kernel's norms are taken by
their own rules (``tempo_ds.liger``).
"""
from __future__ import annotations

from torch import nn

from .layer_norm import InplaceCohereLayerNorm, InplaceLayerNorm
from .rms_norm import InplaceGemmaRMSNorm, InplaceRMSNorm, _computes_like_gemma, _computes_like_llama, \
    _computes_like_olmo2

__all__ = ["inplace_norm", "is_norm", "not_worth_replacing", "KNOWN"]

KNOWN = ("torch.nn.LayerNorm", "torch.nn.RMSNorm (one dimension)", "LlamaRMSNorm (round, then scale by w)",
         "Olmo2RMSNorm (scale by w in float32, round once)", "GemmaRMSNorm (scale by 1 + w in float32)",
         "CohereLayerNorm (bias-free, float32)")


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm by type or by class name (``*LayerNorm``, ``*RMSNorm``)."""
    from ..liger import is_liger_norm

    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm")) or \
        is_liger_norm(module)


def not_worth_replacing(module: nn.Module) -> str | None:
    """Why the norms inside ``module`` are better left alone although each is recognised, or None.

    StableLM's per-head q/k LayerNorms (``StableLmLayerNormPerHead``: one ``nn.LayerNorm`` per head, each fed
    a view of the same q or k tensor): HF's LayerNorms keep that one tensor between them, and RoPE after them
    keeps nothing, so keeping each head's output instead saves nothing and adds the op's side buffers.
    """
    norms = getattr(module, "norms", None)
    if (type(module).__name__.endswith("LayerNormPerHead") and isinstance(norms, nn.ModuleList)
            and all(isinstance(n, nn.LayerNorm) for n in norms)):
        return ("its per-head LayerNorms read views of one q/k tensor, which they keep once between them; keeping "
                "each head's output instead would save nothing and add the side buffers")
    return None


def inplace_norm(module: nn.Module) -> nn.Module:
    """The in-place replacement of ``module``, holding its Parameter objects; ``TypeError`` with the reason
    when its arithmetic is not one tempo_ds reproduces exactly. Liger-Kernel's norms: ``tempo_ds.liger``."""
    from ..liger import is_liger_norm, norm_from_liger

    if is_liger_norm(module):
        return norm_from_liger(module)
    if isinstance(module, nn.LayerNorm):
        return InplaceLayerNorm.from_module(module)
    if isinstance(module, nn.RMSNorm):
        return InplaceRMSNorm.from_module(module)
    if hasattr(module, "variance_epsilon") and (_computes_like_llama(module) or _computes_like_olmo2(module)):
        return InplaceRMSNorm.from_module(module)
    if hasattr(module, "eps") and _computes_like_gemma(module):
        return InplaceGemmaRMSNorm.from_module(module)
    try:
        return InplaceCohereLayerNorm.from_module(module)
    except TypeError:
        pass
    raise TypeError(f"{type(module).__name__} runs none of the norm arithmetics tempo_ds reproduces exactly "
                    f"({'; '.join(KNOWN)})")

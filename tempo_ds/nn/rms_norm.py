"""RMSNorm modules over ``tempo_ds.ops.inplace_rms_norm``: each keeps its output and one float32 ``rstd`` per row.

Three arithmetics, each equal bit for bit in float32 to the HuggingFace module it replaces (``rstd`` =
``rsqrt(mean(x^2) + eps)``, computed in float32 from the input cast to float32)::

    LlamaRMSNorm  (Llama, Mistral, Qwen2/3, Phi-3, Mixtral, Granite, ...)  y = w * (x * rstd).to(x.dtype)
    Olmo2RMSNorm  (OLMo 2/3; and torch.nn.RMSNorm)                          y = (w * x * rstd).to(x.dtype)
    GemmaRMSNorm  (Gemma 1/2/3, Qwen3-Next)                                 y = (x * rstd * (1 + w)).to(x.dtype)

The first two are ``InplaceRMSNorm`` with ``casting="llama"`` and ``casting="torch"``; Gemma's is
``InplaceGemmaRMSNorm``, which hands the op the float32 scale ``1 + w`` (autograd carries its gradient back to
``w`` through the addition, which keeps nothing). The op rebuilds ``x * rstd = y / scale`` in backward; a
scale with a zero entry (Gemma's ``w = -1``) or a tiny one makes the op keep ``x`` instead for that call
(``tempo_ds.ops.layer_norm.output_is_invertible``), so gradients stay HF's.

Bytes kept for ``M`` rows of ``N``, with HF's eager modules for comparison (``e`` = bytes of the input dtype):

* ours: ``M*N*e`` (the output) + ``4*M`` + the op's side buffer ``M*K*e + 8*K`` (``x * rstd`` of the ``K``
  worst-conditioned columns and their indices; ``K = side_columns(N)``: 8 up to ``N = 512``, ``N/64`` above);
  Gemma also ``4*N`` (the float32 scale, which HF keeps too).
* HF Llama-style: ``M*N*(4 + e)`` + ``4*M`` (float32 ``x`` and the rounded ``x * rstd``);
  OLMo 2 and Gemma: ``M*N*8`` + ``4*M`` (float32 ``x`` and ``x * rstd``).

The output is free when the next module keeps it anyway (a pre-norm feeding q/k/v or gate/up Linears, or
the final norm feeding the LM head). A post-norm (OLMo 2, Gemma 2/3 ``post_*_layernorm``, whose output goes
to a residual add) and a q/k norm (output goes to RoPE, which keeps only its tables) keep it alone:
``M*N*e`` plus the statistics, still less than HF's module.
"""
from __future__ import annotations

import torch
from torch import nn

from tempo_ds.ops.rms_norm import CASTINGS, inplace_rms_norm

__all__ = ["InplaceRMSNorm", "InplaceGemmaRMSNorm", "computes_like"]


def _code_key(function):
    code = getattr(function, "__code__", None)
    return None if code is None else (code.co_code, code.co_consts, code.co_names)


def computes_like(module: nn.Module, reference: type, methods: tuple[str, ...] = ("forward",)) -> bool:
    """Whether ``module``'s class runs ``reference``'s code for each of ``methods`` (the same bytecode,
    constants and attribute names, so the same arithmetic on the same attributes). transformers' "Copied
    from" classes (Mistral's RMSNorm is Llama's) qualify; anything else, Liger's patches included, does not."""
    if reference is None:
        return False
    for method in methods:
        ours = _code_key(getattr(type(module), method, None))
        if ours is None or ours != _code_key(getattr(reference, method, None)):
            return False
    return True


def transformers_class(*candidates: tuple[str, str]) -> type | None:
    """The first of ``(family, class name)`` that transformers itself defines, e.g. ``("llama", "LlamaRMSNorm")``.

    Liger-Kernel (and other patchers) rebind ``modeling_<family>.<name>`` to their own classes; a reference read
    from a rebound name would recognise the patch as the original. A class whose ``__module__`` is not its
    ``modeling_<family>`` module has been rebound, so the next verbatim copy in another family is used."""
    import importlib

    for family, name in candidates:
        path = f"transformers.models.{family}.modeling_{family}"
        try:
            cls = getattr(importlib.import_module(path), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls.__module__ == path:
            return cls
    return None


def _llama_reference():
    return transformers_class(("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
                              ("granite", "GraniteRMSNorm"), ("mixtral", "MixtralRMSNorm"))


def _olmo2_reference():
    return transformers_class(("olmo2", "Olmo2RMSNorm"), ("olmo3", "Olmo3RMSNorm"))


def _gemma_reference():
    return transformers_class(("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"))


def _computes_like_llama(module: nn.Module) -> bool:
    """HuggingFace's ``LlamaRMSNorm.forward`` or a verbatim copy (Mistral, Qwen2/3, Phi-3, Mixtral, Granite...)."""
    return computes_like(module, _llama_reference())


def _computes_like_olmo2(module: nn.Module) -> bool:
    """HuggingFace's ``Olmo2RMSNorm.forward`` (scale in float32, round once) or a verbatim copy (OLMo 3)."""
    return computes_like(module, _olmo2_reference())


def _computes_like_gemma(module: nn.Module) -> bool:
    """HuggingFace's ``GemmaRMSNorm`` (``forward`` and ``_norm``) or a verbatim copy (Gemma 2/3, Qwen3-Next)."""
    return computes_like(module, _gemma_reference(), ("forward", "_norm"))


def _adopt(new: nn.Module, module: nn.Module) -> nn.Module:
    new.register_parameter("weight", module.weight)
    new.train(module.training)
    return new


class InplaceRMSNorm(nn.Module):
    """RMSNorm over the last dimension running ``tempo_ds.ops.inplace_rms_norm``.

    Drop-in for HuggingFace's ``LlamaRMSNorm(hidden_size, eps)`` (parameter ``weight``, attribute
    ``variance_epsilon``) with the default ``casting="llama"``; with ``casting="torch"`` for
    ``Olmo2RMSNorm`` and ``torch.nn.RMSNorm`` (whose ``eps=None`` it keeps). ``from_module`` picks the casting.
    """

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, *, elementwise_affine: bool = True,
                 casting: str = "llama", device=None, dtype=None):
        super().__init__()
        if casting not in CASTINGS:
            raise ValueError(f"casting={casting!r}: expected one of {CASTINGS}")
        self.hidden_size, self.eps, self.casting = hidden_size, eps, casting
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def variance_epsilon(self) -> float | None:
        """HuggingFace's name for ``eps``."""
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float | None) -> None:
        self.eps = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return inplace_rms_norm(hidden_states, self.weight, self.eps, casting=self.casting)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, casting={self.casting!r}"

    @classmethod
    def from_module(cls, module: nn.Module) -> "InplaceRMSNorm":
        """A new ``InplaceRMSNorm`` holding ``module``'s own ``weight`` Parameter (nothing copied).

        Accepts HuggingFace ``LlamaRMSNorm`` and ``Olmo2RMSNorm`` and their verbatim copies, and
        ``torch.nn.RMSNorm`` over one dimension; anything else (Gemma's ``1 + w``, T5's cast to the weight
        dtype) raises ``TypeError`` rather than silently changing the maths.
        """
        if isinstance(module, nn.RMSNorm):
            if len(module.normalized_shape) != 1:
                raise TypeError(f"InplaceRMSNorm normalises one dimension; got {module.normalized_shape}")
            hidden, eps, casting = module.normalized_shape[0], module.eps, "torch"
        elif isinstance(module, cls):
            hidden, eps, casting = module.hidden_size, module.eps, module.casting
        elif hasattr(module, "variance_epsilon") and _computes_like_llama(module):
            hidden, eps, casting = _width(module.weight), module.variance_epsilon, "llama"
        elif hasattr(module, "variance_epsilon") and _computes_like_olmo2(module):
            hidden, eps, casting = _width(module.weight), module.variance_epsilon, "torch"
        else:
            raise TypeError(f"{type(module).__name__} computes neither like LlamaRMSNorm, Olmo2RMSNorm "
                            "nor torch.nn.RMSNorm")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.hidden_size, new.eps, new.casting = hidden, eps, casting
        return _adopt(new, module)


class InplaceGemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm, ``y = (x * rstd * (1 + w)).to(x.dtype)`` computed in float32, keeping its output.

    Drop-in for HuggingFace's ``GemmaRMSNorm(dim, eps)`` (``weight`` initialised to zeros, attribute ``eps``):
    the op gets the scale ``1 + w.float()``, exactly the tensor HF multiplies by, so the forward is HF's bit
    for bit. A float64 weight stays float64 (HF would round it to float32) so that gradcheck sees float64 maths.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def scale(self) -> torch.Tensor:
        """``1 + w`` in float32 (float64 for a float64 weight): HF's ``1.0 + self.weight.float()``."""
        w = self.weight
        return 1.0 + (w if w.dtype == torch.float64 else w.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inplace_rms_norm(x, self.scale(), self.eps, casting="torch")

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, scale=1+weight"

    @classmethod
    def from_module(cls, module: nn.Module) -> "InplaceGemmaRMSNorm":
        """A new ``InplaceGemmaRMSNorm`` holding ``module``'s own ``weight`` Parameter. Accepts HuggingFace
        ``GemmaRMSNorm`` and its verbatim copies (Gemma 2/3, Qwen3-Next); anything else raises ``TypeError``."""
        if isinstance(module, cls):
            dim, eps = module.dim, module.eps
        elif hasattr(module, "eps") and _computes_like_gemma(module):
            dim, eps = _width(module.weight), module.eps
        else:
            raise TypeError(f"{type(module).__name__} does not compute like GemmaRMSNorm (x * rstd * (1 + w))")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.eps = dim, eps
        return _adopt(new, module)


def _width(weight: torch.Tensor) -> int:
    """The normalised width of a 1-D weight, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    shape = getattr(weight, "ds_shape", None) or weight.shape
    return int(shape[-1])

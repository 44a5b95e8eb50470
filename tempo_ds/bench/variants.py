"""The runs ``tempo-ds bench`` puts side by side: HF eager (the baseline), HF sdpa, each tempo_ds technique
alone, all exact techniques together and Liger-Kernel (where it runs), and how one of them is applied to a model
and taken off again."""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..config import TempoConfig
from ..inject import InjectionReport, inject, revert
from ..profile import ALL_OFF, TECHNIQUES


@dataclass(frozen=True)
class Variant:
    """One run: ``name`` is what ``--variants`` takes, ``label`` what tables show; ``tempo`` is the full
    TempoConfig dict injected into the model (None: the untouched HF model with attention ``attn``)."""

    name: str
    label: str
    attn: str = "eager"
    tempo: dict | None = None
    liger: bool = False  # Liger-Kernel's every option, patched into the model instance (CUDA only)

    @property
    def kind(self) -> str:
        return "peer" if self.liger else "baseline" if self.tempo is None else "tempo_ds"


def _technique_name(cfg: dict) -> str:
    (key, value), = cfg.items()
    return f"{key}={value}"


BASELINE = Variant("eager", "HF eager")
VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        BASELINE,
        Variant("sdpa", "HF sdpa", attn="sdpa"),
        *(Variant(_technique_name(cfg), f"tempo_ds {label}", tempo=TempoConfig.build({**ALL_OFF, **cfg}).model_dump())
          for label, cfg in TECHNIQUES.items()),
        Variant("all", "tempo_ds (all)", tempo=TempoConfig().model_dump()),
        Variant("liger", "Liger-Kernel (all)", attn="sdpa", liger=True),
    )
}


def select(names: list[str] | None) -> list[Variant]:
    """The variants named (all when None), baseline first and always included, in the registry's order."""
    if names is None:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS.values() if v is BASELINE or v.name in names]


@contextmanager
def applied(model, variant: Variant):
    """``variant`` applied to ``model`` for the duration of the block (yields the InjectionReport, or None for
    the HF and Liger variants); the model's modules and attention implementation are restored afterwards."""
    before = model.config._attn_implementation
    try:
        if variant.attn != before:
            model.set_attn_implementation(variant.attn)
        with liger_patched(model) if variant.liger else nullcontext():
            yield None if variant.tempo is None else inject(model, variant.tempo)
    finally:
        revert(model)
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


@contextmanager
def liger_patched(model):
    """Liger-Kernel's patch of ``model`` for the duration of the block, taken off completely afterwards: besides the
    instance, Liger rebinds names in the family's ``modeling_*`` module (its RMSNorm, MLP and RoPE classes and
    functions) and model classes' ``forward``, which would otherwise leak into every model built later."""
    import sys

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    family = sys.modules[type(model).__module__]
    names = dict(vars(family))
    forwards = {cls: cls.__dict__["forward"] for cls in names.values()
                if isinstance(cls, type) and "forward" in cls.__dict__}
    saved = _module_state(model)
    try:
        _apply_liger_kernel_to_instance(model=model)
        yield model
    finally:
        _restore_module_state(saved)
        for key in set(vars(family)) - set(names):
            delattr(family, key)
        for key, value in names.items():
            setattr(family, key, value)
        for cls, forward in forwards.items():
            cls.forward = forward


def liger_reason(model, device: torch.device) -> str | None:
    """Why the Liger-Kernel variant cannot run here, or None. Its Triton kernels need CUDA: on the CPU they do
    not run, not even under Triton's interpreter (float scalars arrive as Python floats, ``libdevice.rsqrt`` is a
    stub); its instance patch covers only the families Liger knows."""
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA; they do not run on the CPU, not even under Triton's interpreter"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger-Kernel has no patch for model_type {model.config.model_type!r}"
    return None


def _module_state(model) -> list:
    """Each module's attribute dict (and its parameter, buffer and child dicts), shallow-copied: what Liger's
    instance patch rebinds (``forward`` methods, norm attributes, submodules)."""
    return [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in model.modules()]


def _restore_module_state(saved: list) -> None:
    for module, attrs, modules, params, buffers in saved:
        module.__dict__.clear()
        module.__dict__.update(attrs)
        for target, source in ((module._modules, modules), (module._parameters, params), (module._buffers, buffers)):
            target.clear()
            target.update(source)


def applies(report: InjectionReport | None) -> bool:
    """Whether an injection changed anything: a technique that replaces nothing does not apply to the model."""
    return report is None or bool(report.replaced) or report.attention is not None


def not_applied_reason(report: InjectionReport) -> str:
    """Why a technique does not apply, for the "not applicable" lines of the report."""
    reasons = sorted({skip.reason for skip in report.skipped})
    return "injection replaced nothing in this model" + (f" ({'; '.join(reasons)})" if reasons else "")

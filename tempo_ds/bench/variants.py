"""The runs ``tempo-ds bench`` puts side by side: HF eager (the baseline), HF sdpa, each tempo_ds technique
alone and all exact techniques together, and how one of them is applied to a model and taken off again."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

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

    @property
    def kind(self) -> str:
        return "baseline" if self.tempo is None else "tempo_ds"


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
    the HF variants); the model's modules and attention implementation are restored afterwards."""
    before = model.config._attn_implementation
    try:
        if variant.attn != before:
            model.set_attn_implementation(variant.attn)
        yield None if variant.tempo is None else inject(model, variant.tempo)
    finally:
        revert(model)
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def applies(report: InjectionReport | None) -> bool:
    """Whether an injection changed anything: a technique that replaces nothing does not apply to the model."""
    return report is None or bool(report.replaced) or report.attention is not None


def not_applied_reason(report: InjectionReport) -> str:
    """Why a technique does not apply, for the "not applicable" lines of the report."""
    reasons = sorted({skip.reason for skip in report.skipped})
    return "injection replaced nothing in this model" + (f" ({'; '.join(reasons)})" if reasons else "")

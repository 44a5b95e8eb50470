"""``TempoConfig``: which memory-lean techniques are on. Strict, like DeepSpeed's own config sections.

The same schema is built from keyword arguments, a dict, a JSON file, or the top-level ``"tempo"`` section
of a DeepSpeed JSON config. DeepSpeed ignores unknown top-level keys, so this module validates the section
itself — a pydantic model that forbids extra keys, as DeepSpeed's ``DeepSpeedConfigModel`` does — and every
error names the key and the values it allows.
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["TempoConfig", "FewBitConfig", "TempoConfigError", "SECTION"]

SECTION = "tempo"
FEWBIT_FUNCTIONS = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "softplus", "elu", "celu", "selu", "mish",
                    "logsigmoid", "softsign", "tanhshrink", "hardswish")
FewBitName = Literal[FEWBIT_FUNCTIONS]  # type: ignore[valid-type]
Bits = Literal[1, 2, 3, 4]


class TempoConfigError(ValueError):
    """A bad ``tempo`` config: the message names each offending key and what it allows."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class FewBitConfig(_Strict):
    """Few-bit activations: ``bits`` for every function, ``functions`` to override it per function."""

    bits: Bits = 2
    functions: dict[FewBitName, Bits] = Field(default_factory=dict)

    def bits_for(self, name: str) -> int:
        return self.functions.get(name, self.bits)


class TempoConfig(_Strict):
    """Which techniques ``tempo_ds.inject`` applies.

    gelu       inplace   save GELU's output + a 1-bit branch mask (the next Linear saves the output anyway)
               recompute fuse GELU into the next Linear, save its input, recompute GELU in backward (exact)
               fewbit    keep a b-bit code per element (approximate gradient; see ``fewbit``)
               off       leave GELU alone
    silu       fewbit | off  (SiLU/SwiGLU, LLaMA family)
    mlp        recompute  gated MLPs (SwiGLU/GeGLU: ``down(act(gate(x)) * up(x))``, Phi-3's fused gate_up too)
                          fused into the down projection: keep the gate and up outputs only and recompute
                          ``act(gate) * up`` in backward (exact; 2 MLP-wide tensors kept instead of 4)
               off        leave gated MLPs alone
               With ``silu="fewbit"`` (or ``gelu="fewbit"`` for GeGLU) and ``mlp="recompute"``, the fused MLP
               wins inside every gated MLP it replaces: it keeps fewer bytes than a few-bit code plus the
               activation output, the up output and their product, and it is exact. The report lists
               those activations as left alone with that reason; few-bit still applies to activations
               outside recognised gated MLPs. Set ``mlp="off"`` to put few-bit SiLU inside gated MLPs.
    norm       inplace | off  LayerNorm/RMSNorm that save their output and row statistics, not the input
    qk_norm    rope      with norm="inplace": q/k RMSNorms that feed RoPE (Qwen3, Gemma 3, OLMo 2 attention)
                         run fused with the rotation and keep only the rotated q/k, which attention keeps
                         anyway, plus row statistics (exact; ``tempo_ds.nn.qk_norm_rope``)
               separate  those norms become plain in-place norms, keeping outputs nobody else holds
    attention  lean      save q, k, v, output and log-sum-exp; recompute probabilities in blocks
               tempo     Tempo's dropout recomputation: save the softmax output and a 1-bit mask
               off       the model's own attention
    dropout    seed | off  dropout that regenerates its mask from a seed instead of storing it
    lm_loss    chunked   LM head + cross-entropy in tiles of tokens x vocabulary, logits recomputed in backward:
                         keeps a float32 log-sum-exp per token instead of the float32 log-softmax (exact;
                         causal LMs and BERT/RoBERTa MLM, see ``tempo_ds.lm_loss``). In training mode with
                         labels ``outputs.logits`` is None; ``with tempo_ds.lm_loss.full_logits(model):``
                         gives a forward with logits
               off       transformers' own head and loss
    mask_check host      transformers models: an all-ones padding ``attention_mask`` is checked once per forward
                         (``bool(padding.all())``, a host read, outside tracing only, never per layer), as
                         transformers' own ``sdpa_mask`` does, and dropped: unpadded batches then run without a
                         mask (on CUDA, SDPA's flash backend can take them)
               never     never read the mask on the host: the [b, 1, 1, s] padding row is always passed
                         (same results, no device sync; on CUDA an all-ones mask then runs SDPA's
                         memory-efficient backend instead of flash). An encoder given ``attention_mask=None``
                         for unpadded batches gets flash without a read; a causal LM without a mask has
                         transformers read its position_ids (packed-sequence detection), so pass it the mask
    skip       module-name patterns (fnmatch) that injection leaves alone
    """

    enabled: bool = True
    gelu: Literal["inplace", "recompute", "fewbit", "off"] = "recompute"
    silu: Literal["fewbit", "off"] = "off"
    mlp: Literal["recompute", "off"] = "recompute"
    norm: Literal["inplace", "off"] = "inplace"
    qk_norm: Literal["rope", "separate"] = "rope"
    attention: Literal["lean", "tempo", "off"] = "lean"
    dropout: Literal["seed", "off"] = "seed"
    lm_loss: Literal["chunked", "off"] = "chunked"
    attention_block_size: int | None = Field(default=None, ge=1)
    mask_check: Literal["host", "never"] = "host"
    fewbit: FewBitConfig = Field(default_factory=FewBitConfig)
    skip: list[str] = Field(default_factory=list)

    @classmethod
    def build(cls, config: "TempoConfig | dict | str | os.PathLike | None" = None, **overrides: Any) -> "TempoConfig":
        """A validated config from None (defaults), a TempoConfig, a dict, a JSON file path, or inline
        JSON text. A dict or file that is a whole DeepSpeed config contributes its ``"tempo"`` section.
        ``overrides`` win over the config's values."""
        if isinstance(config, TempoConfig):
            data = config.model_dump()
        elif config is None:
            data = {}
        elif isinstance(config, dict):
            data = dict(config)
        elif isinstance(config, (str, os.PathLike)):
            data = _read_json(config)
        else:
            raise TempoConfigError(f"tempo config must be a TempoConfig, dict, JSON file path or JSON text, "
                                   f"not {type(config).__name__}")
        if _looks_like_deepspeed(data) or set(data) == {SECTION}:
            data = data.get(SECTION) or {}  # a DeepSpeed config without a "tempo" section: the defaults
        if not isinstance(data, dict):
            raise TempoConfigError(f"the '{SECTION}' section must be a JSON object, got {type(data).__name__}")
        return cls.validate_dict({**data, **overrides})

    @classmethod
    def validate_dict(cls, data: dict) -> "TempoConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise TempoConfigError(_explain(exc)) from None

    def techniques(self) -> dict[str, str]:
        """The technique switches, for reports."""
        return {k: getattr(self, k) for k in ("gelu", "silu", "mlp", "norm", "attention", "dropout", "lm_loss")}


def deepspeed_section(ds_config: dict | str | os.PathLike | None) -> dict | None:
    """The raw ``"tempo"`` section of a DeepSpeed config (dict, path, or JSON text), or None if absent."""
    if ds_config is None:
        return None
    data = ds_config if isinstance(ds_config, dict) else _read_json(ds_config)
    return data.get(SECTION)


def _looks_like_deepspeed(data: dict) -> bool:
    return any(k in data for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization",
                                   "optimizer", "bf16", "fp16", "gradient_accumulation_steps"))


def _read_json(source: str | os.PathLike) -> dict:
    text = str(source)
    if text.lstrip().startswith("{"):
        where, raw = "inline JSON", text
    else:
        if not os.path.isfile(text):
            raise TempoConfigError(f"tempo config file {text!r} does not exist")
        where = text
        with open(text, encoding="utf-8") as f:
            raw = f.read()
    try:
        data = _loads(raw)
    except ValueError as exc:
        raise TempoConfigError(f"tempo config {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TempoConfigError(f"tempo config {where} must hold a JSON object")
    return data


def _loads(text: str):
    """JSON, or HJSON (comments allowed) as DeepSpeed reads its config files, when hjson is installed."""
    try:
        import hjson
    except ImportError:
        return json.loads(text)
    return hjson.loads(text)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _explain(exc: ValidationError) -> str:
    lines = [f"{exc.error_count()} invalid value(s) in the '{SECTION}' config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(TempoConfig, err["loc"]))
            lines.append(f"  {key}: unknown key; allowed keys: {allowed}")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)

"""Activation-memory profile of a preset model: bytes saved for backward, in total and per layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from . import presets
from .config import TempoConfig
from .memory import SavedTensorMeter


@dataclass
class Profile:
    """What one training-mode forward pass of a model keeps for backward."""

    arch: str
    size: str
    seq: int
    batch: int
    dtype: str
    attn: str
    layers: int
    hidden: int
    heads: int
    total_bytes: int
    per_layer_bytes: list[int]
    layer_by_op: dict[str, int] = field(default_factory=dict)
    variant: str = "baseline"
    tempo: dict | None = None  # the TempoConfig applied, None for the untouched model

    @property
    def bytes_per_layer(self) -> int:
        """Bytes of the middle layer. The first layer is also charged for storages every layer shares
        (e.g. Llama's rotary tables), because the meter charges a storage to its first saver."""
        return self.per_layer_bytes[len(self.per_layer_bytes) // 2] if self.per_layer_bytes else 0

    @property
    def sbh_per_layer(self) -> float:
        """Bytes per layer in units of sequence x micro-batch x hidden (DESIGN.md section 4)."""
        return self.bytes_per_layer / (self.seq * self.batch * self.hidden)

    @property
    def outside_layers_bytes(self) -> int:
        return self.total_bytes - sum(self.per_layer_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_layer": self.bytes_per_layer, "sbh_per_layer": self.sbh_per_layer,
                "outside_layers_bytes": self.outside_layers_bytes}

    def summary(self) -> str:
        mib = 2.0**20
        lines = [
            f"{self.variant}: {self.arch}-{self.size} seq={self.seq} batch={self.batch} dtype={self.dtype} "
            f"attn={self.attn} layers={self.layers} hidden={self.hidden} heads={self.heads}",
            f"  saved for backward, total     {self.total_bytes / mib:12.2f} MiB",
            f"  per layer (middle layer)      {self.bytes_per_layer / mib:12.2f} MiB  = "
            f"{self.sbh_per_layer:.2f} sbh",
            f"  outside the layers            {self.outside_layers_bytes / mib:12.2f} MiB",
            "  per layer by op:",
        ]
        for op, nbytes in sorted(self.layer_by_op.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {op:<36} {nbytes / (self.seq * self.batch * self.hidden):8.2f} sbh")
        return "\n".join(lines)


def measure(model, batch: dict) -> SavedTensorMeter:
    """Run one training-mode forward pass of ``model`` on ``batch`` under the meter, then free the graph."""
    model.train()
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    return meter


BASELINE = "baseline"
TECHNIQUES = {  # each technique alone, the others off
    "gelu=recompute": {"gelu": "recompute"},
    "gelu=inplace": {"gelu": "inplace"},
    "gelu=fewbit (2 bit)": {"gelu": "fewbit"},
    "silu=fewbit (2 bit)": {"silu": "fewbit"},
    "mlp=recompute": {"mlp": "recompute"},
    "norm=inplace": {"norm": "inplace"},
    "attention=lean": {"attention": "lean"},
    "attention=tempo": {"attention": "tempo"},
    "dropout=seed": {"dropout": "seed"},
}
ALL_OFF = {"gelu": "off", "silu": "off", "mlp": "off", "norm": "off", "attention": "off", "dropout": "off",
           "lm_loss": "off"}


def variants(tempo: dict | None = None, techniques: bool = False) -> dict[str, dict | None]:
    """The runs of a comparison: the untouched model, tempo_ds (``tempo``: a config dict, defaults if
    empty) and, with ``techniques``, each technique alone."""
    out: dict[str, dict | None] = {BASELINE: None}
    if tempo is not None:
        out["tempo_ds"] = tempo
    if techniques:
        out.update({f"only {name}": {**ALL_OFF, **cfg} for name, cfg in TECHNIQUES.items()})
    return out


def profile(arch: str = "bert", size: str = "tiny", *, seq: int = 128, batch: int = 2, dtype: str = "bf16",
            attn: str = "eager", layers: int | None = None, data: str | None = None,
            tokenizer: str | None = None, seed: int = 0, tempo: dict | None = None) -> Profile:
    """One profile: the preset with ``tempo`` injected (a config dict), or untouched when None."""
    runs = {BASELINE if tempo is None else "tempo_ds": tempo}
    return compare(arch, size, seq=seq, batch=batch, dtype=dtype, attn=attn, layers=layers, data=data,
                   tokenizer=tokenizer, seed=seed, runs=runs)[0]


def compare(arch: str = "bert", size: str = "tiny", *, seq: int = 128, batch: int = 2, dtype: str = "bf16",
            attn: str = "eager", layers: int | None = None, data: str | None = None,
            tokenizer: str | None = None, seed: int = 0, runs: dict[str, dict | None] | None = None,
            device: str | torch.device = "cpu") -> list[Profile]:
    """Build the preset once (random weights) on ``device``, feed it one batch of real text, and meter a forward
    pass per run: ``runs`` maps a label to a TempoConfig dict (injected, then reverted) or None (untouched)."""
    from .data import lm_batches, load_texts, load_tokenizer, sample_batch, token_stream
    from .inject import inject, revert

    if seq < 1 or batch < 1:
        raise ValueError(f"seq={seq} and batch={batch} must both be >= 1")
    runs = runs if runs is not None else {BASELINE: None}
    configs = {label: None if cfg is None else TempoConfig.build(cfg) for label, cfg in runs.items()}
    tok = load_tokenizer(tokenizer)
    model = presets.build_model(arch, size, dtype=dtype, vocab_size=len(tok), max_seq=seq, attn=attn,
                                layers=layers, seed=seed).to(device)
    if data is None:
        inputs = sample_batch(arch, tok, seq, batch, seed=seed)
    else:
        ids = token_stream(load_texts(data), tok)
        inputs = next(lm_batches(ids, seq, batch, mlm=arch in presets.MLM_ARCHS, tokenizer=tok, seed=seed))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    d = presets.dims(model.config)
    results = []
    for label, cfg in configs.items():
        if cfg is not None:
            inject(model, cfg)
        torch.manual_seed(seed)
        meter = measure(model, inputs)
        revert(model)
        per_layer = meter.per_layer
        by_op: dict[str, int] = {}
        for record in meter.layer_records(len(per_layer) // 2):
            by_op[record.op or "<unlabelled>"] = by_op.get(record.op or "<unlabelled>", 0) + record.nbytes
        results.append(Profile(arch, size, seq, batch, dtype, attn, d["layers"], d["hidden"], d["heads"],
                               meter.total_bytes, per_layer, by_op, label,
                               None if cfg is None else cfg.model_dump()))
    return results


def comparison_table(profiles: list[Profile]) -> str:
    """Markdown: bytes and sbh per layer of each run, and the ratio to the first (the baseline)."""
    base = profiles[0].bytes_per_layer or 1
    lines = ["| run | bytes per layer | sbh per layer | vs " + profiles[0].variant + " |", "|---|---|---|---|"]
    for p in profiles:
        lines.append(f"| {p.variant} | {p.bytes_per_layer:,} | {p.sbh_per_layer:.2f} | {p.bytes_per_layer / base:.3f} |")
    return "\n".join(lines)


def dump_json(profiles: list[Profile], path: str) -> None:
    text = json.dumps([p.to_dict() for p in profiles], indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

"""Activation-memory profile of a preset model: bytes saved for backward, in total and per layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from . import presets
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
            f"{self.arch}-{self.size} seq={self.seq} batch={self.batch} dtype={self.dtype} attn={self.attn} "
            f"layers={self.layers} hidden={self.hidden} heads={self.heads}",
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


def profile(arch: str = "bert", size: str = "tiny", *, seq: int = 128, batch: int = 2, dtype: str = "bf16",
            attn: str = "eager", layers: int | None = None, data: str | None = None,
            tokenizer: str | None = None, seed: int = 0) -> Profile:
    """Build the preset (random weights), feed it one batch of real text, and meter the forward pass."""
    from .data import lm_batches, load_texts, load_tokenizer, sample_batch, token_stream

    if seq < 1 or batch < 1:
        raise ValueError(f"seq={seq} and batch={batch} must both be >= 1")
    tok = load_tokenizer(tokenizer)
    model = presets.build_model(arch, size, dtype=dtype, vocab_size=len(tok), max_seq=seq, attn=attn,
                                layers=layers, seed=seed)
    if data is None:
        inputs = sample_batch(arch, tok, seq, batch, seed=seed)
    else:
        ids = token_stream(load_texts(data), tok)
        inputs = next(lm_batches(ids, seq, batch, mlm=arch in presets.MLM_ARCHS, tokenizer=tok, seed=seed))
    torch.manual_seed(seed)
    meter = measure(model, inputs)
    d = presets.dims(model.config)
    per_layer = meter.per_layer
    middle = len(per_layer) // 2
    by_op: dict[str, int] = {}
    for record in meter.layer_records(middle):
        by_op[record.op or "<unlabelled>"] = by_op.get(record.op or "<unlabelled>", 0) + record.nbytes
    return Profile(arch, size, seq, batch, dtype, attn, d["layers"], d["hidden"], d["heads"],
                   meter.total_bytes, per_layer, by_op)


def dump_json(profiles: list[Profile], path: str) -> None:
    text = json.dumps([p.to_dict() for p in profiles], indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

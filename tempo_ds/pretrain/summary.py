"""What a pretraining run reports at its end: loss at the start and end, throughput, and the activation bytes
saved per layer with and without tempo_ds."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

MIB = 2.0**20
WINDOW = 10  # steps averaged for the start and end losses


@dataclass
class LayerMemory:
    """Bytes one transformer layer saves for backward at the run's micro-batch, sequence length, dtype and
    device, measured by the meter on a 2-layer copy of the preset, untouched and with tempo_ds injected (the
    run's settings, or tempo_ds's defaults when the run has it off), plus the figure metered in the run itself
    (its first micro-step)."""

    without_tempo: int
    with_tempo: int
    in_run: int | None
    tokens_x_hidden: int  # seq x micro-batch x hidden: the unit of "sbh"

    def sbh(self, nbytes: int | None) -> float | None:
        """``nbytes`` in units of seq x micro-batch x hidden."""
        return None if nbytes is None else nbytes / self.tokens_x_hidden


def layer_memory(arch: str, size: str, *, seq: int, batch: int, dtype: str, device, tempo: dict,
                 tokenizer: str | None, seed: int) -> LayerMemory:
    """Meter one layer of the preset without and with tempo_ds (see :class:`LayerMemory`)."""
    from ..profile import compare

    base, lean = compare(arch, size, seq=seq, batch=batch, dtype=dtype, layers=2, tokenizer=tokenizer, seed=seed,
                         runs={"without tempo_ds": None, "with tempo_ds": tempo}, device=device)
    return LayerMemory(base.bytes_per_layer, lean.bytes_per_layer, None, seq * batch * base.hidden)


@dataclass
class Summary:
    run: str  # e.g. "bert-tiny MLM, 2 ranks (cpu), bf16, ZeRO-1, micro-batch 16 x 128 tokens"
    tempo_enabled: bool
    steps: list[int]  # first and last optimizer step of this process's run (a resumed run starts later)
    losses: list[float]  # per step, from step 1 (a resumed run carries the earlier ones)
    tokens_per_s: float | None
    memory: LayerMemory
    peak_memory_bytes: int
    checkpoint: str | None
    monitor: list[str] = field(default_factory=list)
    interrupted: bool = False
    peak_kind: str = "max_memory_allocated"  # on CPU: the process's resident set size as DeepSpeed samples it

    def loss_start(self) -> float:
        """Mean loss of the first WINDOW steps of the run (a resumed run's earlier steps included)."""
        head = self.losses[:WINDOW]
        return sum(head) / len(head)

    def loss_end(self) -> float:
        """Mean loss of the last WINDOW steps."""
        tail = self.losses[-WINDOW:]
        return sum(tail) / len(tail)

    def text(self) -> str:
        """The summary printed at the end of the run."""
        m = self.memory
        ratio = m.with_tempo / m.without_tempo if m.without_tempo else float("nan")
        state = "on" if self.tempo_enabled else "off in this run; its defaults measured"
        lines = [
            f"tempo-ds pretrain: {self.run}" + (" — interrupted" if self.interrupted else ""),
            f"  steps          {self.steps[0]}..{self.steps[1]}",
            f"  loss           {self.loss_start():.4f} (mean of steps 1-{min(WINDOW, len(self.losses))}) -> "
            f"{self.loss_end():.4f} (mean of the last {min(WINDOW, len(self.losses))})",
            f"  tokens/s       {self.tokens_per_s:,.0f} (all ranks, after the first step)" if self.tokens_per_s
            else "  tokens/s       n/a (fewer than two steps)",
            f"  saved for backward per layer ({m.tokens_x_hidden:,} = seq x micro-batch x hidden elements):",
            f"    without tempo_ds {m.without_tempo / MIB:10.2f} MiB  {m.sbh(m.without_tempo):6.2f} sbh",
            f"    with tempo_ds    {m.with_tempo / MIB:10.2f} MiB  {m.sbh(m.with_tempo):6.2f} sbh  "
            f"{ratio:.2f}x  (tempo_ds {state})",
        ]
        if m.in_run is not None:
            lines.append(f"    this run         {m.in_run / MIB:10.2f} MiB  {m.sbh(m.in_run):6.2f} sbh  "
                         "(metered in its first step)")
        lines.append(f"  peak memory    {self.peak_memory_bytes / MIB:,.0f} MiB (rank 0; {self.peak_kind})")
        if self.checkpoint:
            lines.append(f"  checkpoint     {self.checkpoint}")
        for path in self.monitor:
            lines.append(f"  metrics        {path}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Every field plus the derived losses and sbh figures, for summary.json."""
        out = asdict(self)
        out.update(loss_start=self.loss_start(), loss_end=self.loss_end(),
                   sbh_without_tempo=self.memory.sbh(self.memory.without_tempo),
                   sbh_with_tempo=self.memory.sbh(self.memory.with_tempo), sbh_in_run=self.memory.sbh(self.memory.in_run))
        return out

    def write(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` atomically."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

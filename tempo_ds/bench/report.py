"""The bench's outputs: ``bench.json`` (every figure, the settings and the environment), ``bench.md`` (the
table) and ``bench.png`` (memory per layer and largest micro-batch per variant)."""
from __future__ import annotations

import json
import os

COLOURS = {"baseline": "#7f7f7f", "tempo_ds": "#d95f02"}


def _title(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    return f"{s['arch']}-{s['size']}, s={s['seq']}, {s['dtype']}, {env['device']}"


def describe(result: dict) -> list[str]:
    """Sentences stating how each column was obtained (reduced depth, derived or measured batch, ...)."""
    s, env = result["settings"], result["environment"]
    lines = [f"tempo-ds bench: {_title(result)} ({env['device_name']}, {env['threads']} threads), "
             f"torch {env['torch']}, transformers {env['transformers']}, {env['date']}.",
             f"Saved bytes, step time and loss measured on {s['layers']} of the preset's {s['full_layers']} layers "
             f"(the per-layer figure does not depend on depth), micro-batch {s['batch']}; sbh/layer = saved bytes "
             f"of the middle layer / (seq x micro-batch x hidden); outside sbh = what the embeddings, the final "
             f"norm, the LM head and the loss keep, in the same unit.",
             f"Step time: forward+backward, best of {s['reps']} interleaved rounds, divided by HF eager's."]
    if s["max_micro_batch_method"] == "derived":
        lines.append(f"Max micro-batch: DERIVED from the meter, not measured: floor((budget - 16 B x "
                     f"{s['params']:,} parameters) / bytes per sample) for the full {s['full_layers']}-layer "
                     f"model and a {s['memory_budget_gb']:g} GiB budget, bytes per sample = (bytes outside the "
                     f"layers + {s['full_layers']} x bytes per layer) / {s['batch']}; it counts what autograd "
                     f"saves, not transient buffers, so it is an upper bound.")
    else:
        lines.append(f"Max micro-batch: MEASURED on the GPU for the full {s['full_layers']}-layer model within "
                     f"{s['memory_budget_gb']:g} GiB (binary search, one subprocess per trial, full training step, "
                     f"torch.cuda.max_memory_allocated). Those trials keep fp32 master weights and run the "
                     f"forward under {s['dtype']} autocast, as mixed-precision training does; the other columns "
                     f"come from the model held in {s['dtype']}.")
    lines.append(f"Loss: mean of the last {s['loss_last_steps']} of {s['steps']} AdamW steps (lr {s['lr']:g}) on "
                 f"the embedded corpus, same initial weights, batches and dropout seed for every variant; "
                 f"delta relative to HF eager.")
    return lines


def markdown(result: dict) -> str:
    """The Markdown table, one row per variant, preceded by how it was measured and followed by the variants
    that do not apply to this model."""
    s = result["settings"]
    lines = [*describe(result), "",
             f"| variant | sbh/layer | vs baseline | outside sbh | step time ratio "
             f"| max micro-batch ({s['max_micro_batch_method']}) | loss after {s['steps']} | Δloss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["variants"]:
        m, mb, loss = row["memory"], row["max_micro_batch"], row["loss"]
        lines.append(f"| {row['label']} | {m['sbh_per_layer']:.2f} | {m['vs_baseline']:.3f} | "
                     f"{m['outside_layers_sbh']:.1f} | {row['time']['ratio']:.2f} | {_batch(mb)} | {loss['final']:.4f} | "
                     f"{100 * loss['delta_rel']:+.2f} % |")
    for skip in result["skipped"]:
        lines.append(f"\nNot applicable: {skip['label']}: {skip['reason']}.")
    return "\n".join(lines)


def _batch(mb: dict) -> str:
    """A micro-batch cell: the figure, ">= n" for a search stopped early, "failed" for a failed one."""
    if mb["batch"] is None:
        return "failed (see bench.json)"
    return (">= " if mb.get("complete") is False else "") + f"{mb['batch']:,}"


def plot(result: dict, path: str) -> None:
    """Two horizontal bar panels, baseline and tempo_ds variants coloured apart: saved bytes per layer (sbh)
    and the largest micro-batch within the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s, rows = result["settings"], result["variants"][::-1]
    labels = [r["label"] for r in rows]
    colours = [COLOURS[r["kind"]] for r in rows]
    fig, (ax_mem, ax_batch) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.42 * len(rows)), sharey=True)
    for ax, values, xlabel in (
            (ax_mem, [r["memory"]["sbh_per_layer"] for r in rows], "saved activations per layer (sbh)"),
            (ax_batch, [r["max_micro_batch"]["batch"] or 0 for r in rows],
             f"largest micro-batch in {s['memory_budget_gb']:g} GiB ({s['max_micro_batch_method']})")):
        bars = ax.barh(labels, values, color=colours)
        ax.bar_label(bars, labels=[f"{v:.1f}" if isinstance(v, float) else f"{v:,}" for v in values], padding=3,
                     fontsize=8)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="upper right", ncol=2)
    fig.suptitle(f"tempo-ds bench: {_title(result)} ({s['layers']} of {s['full_layers']} layers measured)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str) -> dict[str, str]:
    """Write bench.json, bench.md and bench.png into ``out_dir`` (created if missing); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"bench.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    plot(result, paths["png"])
    return paths

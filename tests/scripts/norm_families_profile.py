"""Per-layer bytes of every decoder family tempo_ds's norm rules cover, at one shape (not part of the suite).

    .venv/bin/python tests/scripts/norm_families_profile.py [--seq 512] [--families gemma2,olmo2] [--json out.json]

Each family's own HF class at the ``small`` preset shape (h=512, 8 query / 2 KV heads, head_dim 64, MLP 1536,
Mixtral 8 experts top-2), 3 layers, bf16, micro-batch 1, random token ids, a 4096-token vocabulary (the
per-layer figure does not depend on it). Per family: the middle layer's bytes in sbh for HF eager, HF sdpa,
tempo_ds with its defaults and tempo_ds with only norm=inplace; then, per norm of that layer, what HF's module
keeps and what the replacement keeps (the replacement's output is charged to it even where the next Linear
shares it). The layer is summed by module name, not ``meter.per_layer``: StableLM's per-head norm lists are
longer ModuleLists than a 3-layer model's, and ``find_layers`` takes the longest.
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch
import transformers as t

import tempo_ds
from tempo_ds.memory import SavedTensorMeter

H, A, KV, HD, I, LAYERS, VOCAB = 512, 8, 2, 64, 1536, 3, 4096
FAMILIES = {
    "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
    "mistral": (t.MistralConfig, t.MistralForCausalLM, {}),
    "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
    "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {"head_dim": HD}),
    "gemma": (t.GemmaConfig, t.GemmaForCausalLM, {"head_dim": HD}),
    "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {"head_dim": HD}),
    "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, {"head_dim": HD}),
    "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
    "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM, {}),
    "granite": (t.GraniteConfig, t.GraniteForCausalLM, {}),
    "cohere": (t.CohereConfig, t.CohereForCausalLM, {"use_qk_norm": True}),
    "stablelm": (t.StableLmConfig, t.StableLmForCausalLM, {"qk_layernorm": True}),
}
NORM_ONLY = {**{k: "off" for k in tempo_ds.TempoConfig().techniques()}, "norm": "inplace"}


def build(family: str, attn: str):
    cfg_cls, cls, extra = FAMILIES[family]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=A,
                  num_key_value_heads=KV, intermediate_size=I, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, **extra)
    cfg._attn_implementation, cfg.use_cache = attn, False
    torch.manual_seed(0)
    return cls(cfg).to(torch.bfloat16).train()


def layer_bytes(model, batch) -> dict[str, int]:
    """{module path inside the middle layer: bytes first saved there} for one training forward."""
    torch.manual_seed(0)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    head = f"model.layers.{LAYERS // 2}."
    return {n[len(head):]: b for n, b in meter.by_module.items() if n.startswith(head)}


def is_norm_path(path: str) -> bool:
    leaf = path.split(".")[-1]
    return leaf.endswith(("norm", "layernorm")) or ".norms." in path or path.endswith("_layernorm")


def profile(family: str, seq: int) -> dict:
    batch = {"input_ids": torch.randint(3, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"]
    sbh = seq * H
    runs = {}
    for label, attn, tempo in (("HF eager", "eager", None), ("HF sdpa", "sdpa", None),
                               ("tempo_ds", "eager", {}), ("tempo_ds norm only", "eager", NORM_ONLY)):
        try:
            model = build(family, attn)
        except ValueError as exc:  # Gemma 2 refuses sdpa (its attention soft-caps the scores)
            print(f"{family} {label}: {str(exc).split('.')[0]}")
            continue
        if tempo is not None:
            tempo_ds.inject(model, **tempo)
        runs[label] = layer_bytes(model, batch)
    hf, ours = runs["HF eager"], runs["tempo_ds norm only"]
    norms = {}
    for path in sorted(p for p in set(hf) | set(ours) if is_norm_path(p)):
        top = path.split(".norms.")[0]          # StableLM: sum a per-head list under its owner
        h, o = norms.get(top, (0, 0))
        norms[top] = (h + hf.get(path, 0), o + ours.get(path, 0))
    return {"family": family, "seq": seq,
            "sbh_per_layer": {label: round(sum(runs[label].values()) / sbh, 2) if label in runs else None
                              for label in ("HF eager", "HF sdpa", "tempo_ds", "tempo_ds norm only")},
            "norms_sbh": {p: (round(h / sbh, 3), round(o / sbh, 3)) for p, (h, o) in norms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = [profile(f, args.seq) for f in args.families.split(",")]
    labels = list(results[0]["sbh_per_layer"])
    print(f"per layer, sbh (bf16, s={args.seq}, b=1, h={H}, {A}/{KV} heads, MLP {I})")
    print("| family | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for r in results:
        cells = ("n/a" if r["sbh_per_layer"][k] is None else f"{r['sbh_per_layer'][k]:.2f}" for k in labels)
        print(f"| {r['family']} | " + " | ".join(cells) + " |")
    print("\nper norm of the layer, sbh kept: HF's module -> tempo_ds's (its output included, shared or not)")
    for r in results:
        print(f"{r['family']}: " + "; ".join(f"{p} {h:.3f} -> {o:.3f}" for p, (h, o) in r["norms_sbh"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

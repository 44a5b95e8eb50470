"""Bytes kept outside the layers (LM head + loss) and CPU step time, Llama-3-shaped model, bf16 (issue 13 item 2).

    .venv/bin/python tests/scripts/lm_loss_bytes.py [--layers 2] [--seq 512] [--repeats 3]

h=512, 8 heads / 2 KV heads, MLP 1536, vocabulary 128256, batch 1, random token ids. Variants: HF sdpa untouched,
tempo_ds with lm_loss="off" (the head and loss as HF's), tempo_ds defaults (lm_loss="chunked"). Bytes from
tempo_ds.memory.SavedTensorMeter in sbh (s x b x h bytes); step time = forward + backward, variants interleaved,
best of ``--repeats`` kept, ratio to HF sdpa: wall time and process CPU time (all threads; steadier than wall time
on a shared machine).
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
import transformers

import tempo_ds
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops import linear_cross_entropy


def build(layers: int, seq: int):
    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                                   intermediate_size=1536, vocab_size=128256, num_hidden_layers=layers,
                                   max_position_embeddings=seq, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).train()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = build(args.layers, args.seq)
    models = {"HF sdpa": base}
    for label, lm_loss in (("tempo_ds lm_loss=off", "off"), ("tempo_ds lm_loss=chunked", "chunked")):
        m = copy.deepcopy(base)
        tempo_ds.inject(m, lm_loss=lm_loss)
        models[label] = m
    ids = torch.randint(0, 128256, (1, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    sbh = args.seq * 1 * 512
    rows = {}
    for label, m in models.items():
        with SavedTensorMeter(m) as meter:
            out = m(**batch)
        outside = sum(r.nbytes for r in meter.saved if meter.layer_of(r.module) is None)
        rows[label] = {"outside": outside, "per_layer": meter.per_layer[len(meter.per_layer) // 2]}
        del out
    times = {label: float("inf") for label in models}
    cpu = {label: float("inf") for label in models}
    for _ in range(args.repeats):
        for label, m in models.items():
            m.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            m(**batch).loss.backward()
            times[label] = min(times[label], time.perf_counter() - t0)
            cpu[label] = min(cpu[label], time.process_time() - c0)
    hf = rows["HF sdpa"]["outside"]
    print(f"Llama-3-shaped, {args.layers} layers, s={args.seq}, b=1, bf16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| variant | outside the layers (bytes) | sbh | vs HF | per layer (sbh) | fwd+bwd wall s | vs HF | "
          "fwd+bwd CPU s | vs HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['outside']:,} | {r['outside'] / sbh:.2f} | {r['outside'] / hf:.4f} | "
              f"{r['per_layer'] / sbh:.2f} | {times[label]:.3f} | {times[label] / times['HF sdpa']:.2f} | "
              f"{cpu[label]:.3f} | {cpu[label] / cpu['HF sdpa']:.2f} |")

    op_level(args.seq, args.repeats)


def op_level(n: int, repeats: int):
    """The head + loss alone, one thread (steadier than two on a shared machine): F.linear then
    F.cross_entropy(logits.float()) against linear_cross_entropy, forward + backward, best of 8 or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, 512, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(128256, 512, generator=gen) / 22).bfloat16().requires_grad_()
    y = torch.randint(0, 128256, (n,), generator=gen)
    variants = {"F.linear + F.cross_entropy(logits.float())": lambda: F.cross_entropy(F.linear(h, w).float(), y),
                "tempo_ds.ops.linear_cross_entropy": lambda: linear_cross_entropy(h, w, y)}
    best = {k: [float("inf")] * 2 for k in variants}
    for _ in range(max(repeats, 8)):
        for label, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn().backward()
            best[label] = [min(best[label][0], time.perf_counter() - t0), min(best[label][1], time.process_time() - c0)]
            h.grad = w.grad = None
    torch.set_num_threads(threads)
    base = best["F.linear + F.cross_entropy(logits.float())"]
    print(f"\nhead + loss alone: N={n}, H=512, V=128256, bf16, 1 thread, forward + backward")
    print("| op | wall s | vs HF | CPU s | vs HF |\n|---|---|---|---|---|")
    for label, (wall, cpu) in best.items():
        print(f"| {label} | {wall:.3f} | {wall / base[0]:.2f} | {cpu:.3f} | {cpu / base[1]:.2f} |")


if __name__ == "__main__":
    main()

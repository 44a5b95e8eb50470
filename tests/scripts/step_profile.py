"""One training step of the tiny BERT preset (bf16, s=128, micro-batch 16, one thread), plain vs tempo_ds and tempo_ds
with each technique off, best of 5 interleaved: where the CPU time goes. Run from the repository root:
    .venv/bin/python tests/scripts/step_profile.py [CHECKOUT]
"""
import sys, time, copy, torch
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
import tempo_ds
from tempo_ds import presets
from tempo_ds.data import load_tokenizer, sample_batch
torch.set_num_threads(1)
tok = load_tokenizer()
base = presets.build_model("bert", "tiny", vocab_size=len(tok), max_seq=128, dtype="bf16").train()
batch = sample_batch("bert", tok, 128, 16, seed=0)
variants = {"plain": None, "all": {}}
for k in ("attention", "dropout", "norm", "gelu", "lm_loss"):
    variants[f"-{k}"] = {k: "off"}
models = {}
for name, cfg in variants.items():
    m = copy.deepcopy(base)
    if cfg is not None: tempo_ds.inject(m, cfg)
    models[name] = m
best = {n: 1e9 for n in models}
for r in range(5):
    for n, m in models.items():
        t = time.perf_counter(); m(**batch).loss.backward(); best[n] = min(best[n], time.perf_counter() - t)
for n, t in best.items(): print(f"{n:12s} {1000*t:7.1f} ms  {t/best['plain']:.2f}x")

"""CPU step time of tempo_ds's fused gated MLP vs HF's LlamaMLP / GemmaMLP, side by side in one run.

Llama-3-shaped MLP (h=512, i=1536), s=512, batch 1; forward + backward of the module (input and every
parameter gradient), best of --reps interleaved repetitions after a warm-up, one thread. Timed with the calling
thread's CPU time (time.thread_time: with one intra-op thread, forward and CPU backward both run on it), which a
shared, loaded machine disturbs far less than wall time. Also prints the bytes each keeps for backward (meter).
Run:
    .venv/bin/python tests/scripts/gated_mlp_bench.py [--reps 15]
"""
import argparse
import copy
import json
import time

import torch
import transformers
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from tempo_ds.memory import SavedTensorMeter
from tempo_ds.nn import GatedMLP

p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=15)
p.add_argument("--seq", type=int, default=512)
args = p.parse_args()
torch.set_num_threads(1)
H, I = 512, 1536


def step(module, x, dout):
    module.zero_grad(set_to_none=True)
    xx = x.detach().requires_grad_()
    t0 = time.thread_time()
    module(xx).backward(dout)
    return time.thread_time() - t0


def saved(module, x):
    with SavedTensorMeter() as m:
        out = module(x.detach().requires_grad_())
    del out
    return m.total_bytes


results = []
for family, cls, act in (("llama", LlamaMLP, "silu"), ("gemma", GemmaMLP, "gelu_pytorch_tanh")):
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act=act, num_attention_heads=8)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        hf = cls(cfg).to(dtype)
        fused = GatedMLP.from_module(copy.deepcopy(hf))
        x = torch.randn(1, args.seq, H, dtype=dtype)
        dout = torch.randn(1, args.seq, H, dtype=dtype)
        for m in (hf, fused):
            step(m, x, dout)
        best = {"hf": float("inf"), "tempo": float("inf")}
        for _ in range(args.reps):
            best["hf"] = min(best["hf"], step(hf, x, dout))
            best["tempo"] = min(best["tempo"], step(fused, x, dout))
        results.append({"mlp": f"{family} ({act})", "dtype": str(dtype).replace("torch.", ""),
                        "hf_ms": round(best["hf"] * 1e3, 2), "tempo_ms": round(best["tempo"] * 1e3, 2),
                        "ratio": round(best["tempo"] / best["hf"], 3),
                        "hf_saved_sbh": round(saved(hf, x) / (args.seq * H), 2),
                        "tempo_saved_sbh": round(saved(fused, x) / (args.seq * H), 2)})
print(json.dumps({"threads": 1, "clock": "thread_time", "seq": args.seq, "torch": torch.__version__, "results": results}, indent=1))

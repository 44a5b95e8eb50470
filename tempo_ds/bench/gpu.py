"""GPU benchmark of tempo_ds: one script, under 8 minutes on one H200, to run whenever a GPU is available.

    tempo-ds bench-gpu --out $OUT           # CUDA; writes gpu.json and gpu.md, prints the Markdown
    tempo-ds bench-gpu --smoke --out DIR    # tiny sizes on the CPU (Triton's interpreter): the test

(``python -m tempo_ds.bench.gpu`` is the same; docs/gpu-bench.md says how to run it on a lent GPU machine.)

Before anything runs, triton and the kernel modules of ``tempo_ds.kernels`` must import.

Phase 1, kernels (issues 13 and 14): each tempo_ds op on its Triton kernel (``TEMPO_DS_TRITON=1``) and on its
PyTorch path (``TEMPO_DS_TRITON=0``), and the plain PyTorch op it replaces (for the gated MLP HF's
``down(act(gate) * up)``, for ``moe_experts`` HF's ``grouped_mm_experts_forward``, for
``linear_cross_entropy`` HF's logits + ``F.cross_entropy``), on the same inputs:
the largest error of the output and of the gradients against a float64 reference, which kernel launchers of
``tempo_ds.kernels`` each path called, and the median forward+backward time (``passes`` passes queued between
one pair of CUDA events, so one launch's latency is not what is timed; ``perf_counter`` on the CPU). Lean
attention's row runs our own kernel (the SDPA backends refused). Then: the gated MLP's kernel against its
PyTorch path bit for bit (fp32/bf16/fp16 x SiLU/tanh-GELU x separate/fused gate_up); lean attention through
its dispatch (SDPA flash / memory-efficient, ``plan_for``) vs our Triton kernel forced vs F.sdpa as HF calls
it, with a padding mask, dropout, causality and GQA: backend taken, error vs float64, time; the kernels phase 1
launched, with the registers, spills and shared memory the driver loaded; and ``tempo_ds.kernels.aot`` for the
device's own arch (in the background during phases 2 and 3). An op that fails is a note; the others still run.

Phase 2, sync check (issue 14): one training step of BERT-Large (2 layers) and the Llama-3-shaped preset, HF
sdpa and tempo_ds (default config) without an attention mask, and tempo_ds with ``mask_check="never"`` on the
batch's all-ones mask (the default config and HF's sdpa_mask read an all-ones mask on the host once per
forward, by design; without a mask, transformers reads a causal LM's position_ids instead, to detect packed
sequences, so the causal-LM rows (Llama, Mixtral) without a mask are expected to fail there), under
``torch.cuda.set_sync_debug_mode("error")`` after a warm-up step outside it: forward+backward and the
optimizer step pass or fail (first synchronizing call and where it came from).

Phase 3, compiled vs eager (issue 14): tempo_ds injected into a 2-layer Llama-3-shaped model, one
forward+backward eager and under ``torch.compile(fullgraph=True)`` (Inductor): Dynamo graphs, graph breaks,
compile time, tokens/s ratio, largest gradient difference.

Phase 4, models: BERT-Large and GPT-2 Large at s=512 in bf16 (fp32 master weights, AdamW), HF eager,
HF sdpa and tempo_ds (defaults); the Llama-3-shaped preset (``llama small``, vocabulary 128256), HF sdpa,
tempo_ds and Liger-Kernel (``apply_liger_kernel_to_llama``, when liger_kernel imports; one trial at the equal
micro-batch): peak memory and tokens/s at an equal micro-batch, the largest micro-batch within the memory
budget (``tempo_ds.bench.max_batch.largest_micro_batch``: one process per trial, peak =
``torch.cuda.max_memory_allocated``) and tokens/s at each run's largest micro-batch, with ratios to the
model's baseline (HF eager; HF sdpa for Llama). The Tempo paper reports up to 2x the batch and +16%
throughput on BERT-Large. Order: the baseline and tempo_ds of Llama, BERT-Large, GPT-2 Large, then Liger, then
HF sdpa of BERT and GPT-2, so a short budget drops the least important runs.

Every phase checks the clock: what would run past ``--budget_s`` is skipped with a note, a search that the
deadline cuts short keeps the trials it finished, and both files are rewritten after every measurement, so a
run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GIB = 2**30
KERNEL_SHARE = 0.3         # of --budget_s, at most, for phase 1 (the op table alone: OP_TABLE_SHARE)
OP_TABLE_SHARE = 0.2       # of --budget_s, at most, for phase 1's op table; the gated MLP and attention checks follow
TRIAL_ESTIMATE_S = 20      # wall time of one CUDA trial until one is measured: new interpreter, imports, model, steps
SEARCH_RESERVE_TRIALS = 5  # a largest-batch search is not started with less than this many trials' time left

# Sizes: kernels on rows x hidden / rows x inter activations and [B, H, S, D] attention; models at seq, the
# equal micro-batch first. Triton's interpreter has no bfloat16 tl.dot (it multiplies the raw bits), so the
# smoke kernels run in fp16; its trials run in this process (derived figures depend on no allocator state).
GPU = {"kernel_dtype": "bf16", "rows": 16384, "hidden": 1024, "inter": 4096, "attn": (16, 16, 512, 64),
       "lce": (4096, 128256), "mlp_check": (4096, 512, 1536), "gqa": 4, "gated_dtypes": ("fp32", "bf16", "fp16"),
       "warmup": 2, "reps": 20, "passes": 10,
       "models": [("Llama-3 small (V=128256)", "llama", "small", ("HF sdpa", "tempo_ds", "Liger")),
                  ("BERT-Large", "bert", "large", ("HF eager", "tempo_ds", "HF sdpa")),
                  ("GPT-2 Large", "gpt2", "large", ("HF eager", "tempo_ds", "HF sdpa"))],
       "sync_models": [("BERT-Large, 2 layers", "bert", "large", 2), ("Llama-3 small", "llama", "small", None),
                       ("Mixtral small, 2 layers", "mixtral", "small", 2)],
       "sync_batch": 4, "compile_model": ("Llama-3 small, 2 layers", "llama", "small", 2), "compile_seq": 512,
       "compile_batch": 8, "compile_steps": 10,
       "seq": 512, "equal_batch": 8, "max_batch": 4096, "warmup_steps": 2, "steps": 2}
SMOKE = {"kernel_dtype": "fp16", "rows": 32, "hidden": 128, "inter": 256, "attn": (1, 2, 64, 32),
         "lce": (32, 512), "mlp_check": (16, 32, 48), "gqa": 2, "gated_dtypes": ("fp32", "fp16"),
         "warmup": 0, "reps": 1, "passes": 1,
         "models": [("Llama tiny", "llama", "tiny", ("HF sdpa", "tempo_ds", "Liger")),  # HF sdpa runs here
                    ("BERT tiny", "bert", "tiny", ("HF eager", "tempo_ds")),
                    ("GPT-2 tiny", "gpt2", "tiny", ("HF eager", "tempo_ds"))],
         "sync_models": [], "sync_batch": 1, "compile_model": ("Llama tiny, 1 layer", "llama", "tiny", 1),
         "compile_seq": 16, "compile_batch": 1, "compile_steps": 1,
         "seq": 64, "equal_batch": 2, "max_batch": 256, "warmup_steps": 1, "steps": 1}
SMOKE_BUDGET_GIB = 0.045  # Llama tiny (2.5M parameters: 0.04 GiB of model states at 16 B each) must fit
DROPOUT_P = 0.1
# (attn, tempo); Liger: HF sdpa with liger_kernel's Llama patches (RoPE, RMSNorm, SwiGLU, fused linear CE)
VARIANTS = {"HF eager": ("eager", None), "HF sdpa": ("sdpa", None), "tempo_ds": ("eager", {}), "Liger": ("sdpa", None)}
# Each model lists its runs: the first is the baseline of its ratios, the first two run for every model before
# the others (the comparison that matters most).
RUN_FIRST = 2
SYNC_SHARE = 0.15          # of --budget_s, at most, for the sync-debug phase
COMPILE_SHARE = 0.15       # of --budget_s, at most, for the compiled vs eager phase
AOT_TIMEOUT_S = 150        # the ahead-of-time compile check (in the background during phases 2-3), at most
# The Python launchers of the Triton kernels in tempo_ds.kernels, which the ops call on their kernel path
KERNEL_ENTRY_POINTS = {"gelu": ("forward", "backward"), "layer_norm": ("norm_forward", "norm_backward"),
                       "attention": ("attention_forward", "attention_backward"), "dropout": ("apply_seed_mask",),
                       "fewbit": ("forward", "backward"), "gated_mlp": ("forward", "backward")}
INSTALL_HINT = ("the repository's kernels/ folder becomes tempo_ds.kernels only once installed: run "
                "`pip install --no-deps --no-build-isolation -e .` in the repository first (docs/gpu-bench.md)")


def parse_args(argv=None) -> argparse.Namespace:
    """The script's options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out-gpu",
                   help="output folder for gpu.json and gpu.md (default: $OUT, else ./bench-out-gpu)")
    p.add_argument("--budget_s", type=float, default=450, help="wall-clock budget in seconds (default 450)")
    p.add_argument("--budget_gb", type=float, default=None,
                   help="memory budget per trial in GiB (default: the card's memory minus --margin_gb)")
    p.add_argument("--margin_gb", type=float, default=4.0,
                   help="GiB of the card left out of the default budget: CUDA contexts (this process keeps "
                        "its own), fragmentation (default 4)")
    p.add_argument("--aot", choices=("ci", "full", "off"), default="ci",
                   help="the ahead-of-time compile check for the device's arch: the CI subset (default), the "
                        "full matrix (minutes), or off")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the script in < 60 s")
    return p.parse_args(argv)


def preflight() -> str | None:
    """None when triton and every module of ``KERNEL_ENTRY_POINTS`` import with their entry points; else the
    error to print."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton does not import ({_brief(e)}): the kernels need it; install the triton that matches torch"
    for name, entry_points in KERNEL_ENTRY_POINTS.items():
        try:
            module = importlib.import_module(f"tempo_ds.kernels.{name}")
        except Exception as e:
            return f"tempo_ds.kernels.{name} does not import ({_brief(e)}); if the module is missing, {INSTALL_HINT}"
        missing = [f for f in entry_points if not callable(getattr(module, f, None))]
        if missing:
            return f"tempo_ds.kernels.{name} has no {', '.join(missing)}: KERNEL_ENTRY_POINTS is out of date"
    return None


# ------------------------------------------------------------------------------------------------
# Phase 1: kernels
# ------------------------------------------------------------------------------------------------
@dataclass
class KernelCase:
    op: str                     # the tempo_ds op
    torch_op: str               # the plain PyTorch op it replaces
    inputs: list                # leaf tensors in the benchmark dtype, all requiring grad
    ours: Callable
    plain: Callable
    reference: Callable         # (float64 inputs, float64 cotangent) -> (output, [input gradients])
    has_kernel: bool = True
    comparable: bool = True     # False when the plain op draws other dropout masks: its error means nothing


@contextlib.contextmanager
def triton_flag(value: str | None):
    """``TEMPO_DS_TRITON`` set to ``value`` (read by the ops at call time; None: left as it is), restored
    afterwards."""
    if value is None:
        yield
        return
    old = os.environ.get("TEMPO_DS_TRITON")
    os.environ["TEMPO_DS_TRITON"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["TEMPO_DS_TRITON"]
        else:
            os.environ["TEMPO_DS_TRITON"] = old


@contextlib.contextmanager
def kernel_calls():
    """The list of the ``KERNEL_ENTRY_POINTS`` (as ``"module.function"``) called inside the block, in order:
    each is wrapped in a counter for the block and restored afterwards."""
    calls: list[str] = []
    originals = []
    for name, entry_points in KERNEL_ENTRY_POINTS.items():
        module = importlib.import_module(f"tempo_ds.kernels.{name}")
        for fn_name in entry_points:
            fn = getattr(module, fn_name)

            def counted(*args, _fn=fn, _name=f"{name}.{fn_name}", **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)
            originals.append((module, fn_name, fn))
            setattr(module, fn_name, counted)
    try:
        yield calls
    finally:
        for module, fn_name, fn in originals:
            setattr(module, fn_name, fn)


def _autograd_reference(fn: Callable) -> Callable:
    def reference(inputs, cot):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(cot)
        return out.detach(), [t.grad for t in leaves]
    return reference


def kernel_cases(cfg: dict, dtype, device, seed: int) -> list[KernelCase]:
    """The ops at the sizes of ``cfg``. Dropout cases call ``torch.manual_seed(seed)`` before each run
    (see ``run_case``), so our op and the reference draw the same mask seed."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tempo_ds import ops
    from tempo_ds.ops._library import draw_seed
    from tempo_ds.ops.dropout import fill_keep_mask
    from tempo_ds.ops.fewbit import reference_backward, resolve

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype) \
            .requires_grad_()

    rows, h, inter = cfg["rows"], cfg["hidden"], cfg["inter"]
    lce_rows, vocab = cfg["lce"]
    B, H, S, D = cfg["attn"]
    labels = torch.randint(0, vocab, (lce_rows,), generator=gen).to(device)
    labels[::7] = -100  # HF's ignore_index, as padding gives it
    eps = 1e-5
    rms = LlamaRMSNorm(h, eps=eps).to(device, dtype)
    with torch.no_grad():
        rms.weight.copy_(randn(h, scale=0.1, shift=1.0))

    def keep_mask(shape, device):
        torch.manual_seed(seed)  # the seed our op draws (from its device's generator) after the same manual_seed
        flat = torch.empty(math.prod(shape), dtype=torch.bool, device=device)
        return fill_keep_mask(flat, draw_seed(device), DROPOUT_P, 0).view(shape)

    def dropout_ref(inputs, cot):
        (x,) = inputs
        leaf = x.detach().requires_grad_()
        out = leaf * keep_mask(x.shape, x.device) / (1 - DROPOUT_P)
        out.backward(cot)
        return out.detach(), [leaf.grad]

    def attention_ref(inputs, cot):
        leaves = [t.detach().requires_grad_() for t in inputs]
        q, k, v = leaves
        probs = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
        out = (probs * keep_mask(probs.shape, q.device) / (1 - DROPOUT_P)) @ v
        out.backward(cot)
        return out.detach(), [t.grad for t in leaves]

    spec = resolve("gelu", 2)

    def fewbit_ref(inputs, cot):
        (x,) = inputs
        return F.gelu(x), [reference_backward(cot, x, spec)]

    def rms_ref(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ln = [randn(rows, h), randn(h, scale=0.1, shift=1.0), randn(h, scale=0.1)]
    return [
        KernelCase("inplace_gelu", "F.gelu", [randn(rows, inter)], ops.inplace_gelu, F.gelu,
                   _autograd_reference(F.gelu)),
        KernelCase("inplace_gelu tanh", "F.gelu tanh", [randn(rows, inter)],
                   lambda x: ops.inplace_gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"),
                   _autograd_reference(lambda x: F.gelu(x, approximate="tanh"))),
        KernelCase("gelu_linear", "F.linear(F.gelu)",
                   [randn(rows, inter), randn(h, inter, scale=inter**-0.5), randn(h, scale=0.1)],
                   ops.gelu_linear, lambda x, w, b: F.linear(F.gelu(x), w, b),
                   _autograd_reference(lambda x, w, b: F.linear(F.gelu(x), w, b)), has_kernel=False),
        KernelCase("inplace_layer_norm", "F.layer_norm", ln,
                   lambda x, w, b: ops.inplace_layer_norm(x, (h,), w, b, eps),
                   lambda x, w, b: F.layer_norm(x, (h,), w, b, eps),
                   _autograd_reference(lambda x, w, b: F.layer_norm(x, (h,), w, b, eps))),
        KernelCase("inplace_rms_norm", "HF LlamaRMSNorm", [randn(rows, h), rms.weight],
                   lambda x, w: ops.inplace_rms_norm(x, w, eps),
                   lambda x, w: rms(x),  # w is rms.weight itself: no parameter to bind per call
                   _autograd_reference(rms_ref)),
        _qk_norm_rope_case(randn, cfg["attn"], device),
        KernelCase(f"attention (lean), dropout {DROPOUT_P}", f"F.sdpa, dropout {DROPOUT_P}",
                   [randn(B, H, S, D) for _ in range(3)],
                   lambda q, k, v: _our_attention(q, k, v, dropout_p=DROPOUT_P),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT_P),
                   attention_ref, comparable=False),
        KernelCase(f"seed_dropout p={DROPOUT_P}", "F.dropout", [randn(rows, h)],
                   lambda x: ops.seed_dropout(x, DROPOUT_P), lambda x: F.dropout(x, DROPOUT_P),
                   dropout_ref, comparable=False),
        KernelCase("fewbit gelu 2-bit", "F.gelu", [randn(rows, inter)], lambda x: ops.fewbit(x, "gelu", 2),
                   F.gelu, fewbit_ref, comparable=False),
        KernelCase("gated_mlp silu", "HF down(act(gate) * up)",
                   [randn(rows, inter, scale=2.0), randn(rows, inter), randn(h, inter, scale=inter**-0.5)],
                   lambda g, u, w: ops.gated_mlp(g, u, w, activation="silu"),
                   lambda g, u, w: _unfused_mlp(g, u, w, "silu"),
                   _autograd_reference(lambda g, u, w: _unfused_mlp(g, u, w, "silu"))),
        KernelCase("gated_mlp gelu_tanh, fused gate_up", "HF down(act(gate) * up)",
                   [randn(rows, 2 * inter, scale=2.0), randn(h, inter, scale=inter**-0.5)],
                   lambda gu, w: ops.gated_mlp(gu, None, w, activation="gelu_tanh"),
                   lambda gu, w: _unfused_mlp(gu, None, w, "gelu_tanh"),
                   _autograd_reference(lambda gu, w: _unfused_mlp(gu, None, w, "gelu_tanh"))),
        _moe_case(randn, gen, rows, h, inter, device),
        KernelCase(f"linear_cross_entropy V={vocab}", "HF F.cross_entropy(lm_head(x).float())",
                   [randn(lce_rows, h), randn(vocab, h, scale=h**-0.5)],
                   lambda x, w: ops.linear_cross_entropy(x, w, labels),
                   lambda x, w: F.cross_entropy(F.linear(x, w).float(), labels),
                   _autograd_reference(lambda x, w: F.cross_entropy(F.linear(x, w), labels)), has_kernel=False),
    ]


def _qk_norm_rope_case(randn, attn: tuple, device) -> KernelCase:
    """``qk_norm_rope`` (Qwen3's per-head q norm and RoPE: [B, S, H, D] -> [B, H, S, D]) against HF's Qwen3RMSNorm
    and ``apply_rotary_pos_emb``; the float64 reference computes the same formula in float64."""
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    from tempo_ds import ops

    B, H, S, D = attn
    eps = 1e-6
    angles = torch.arange(S, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.cat((angles, angles), -1)[None]

    def tables(x):
        return angles.cos().to(device, x.dtype), angles.sin().to(device, x.dtype)

    def hf(x, w):
        norm = Qwen3RMSNorm(D, eps=eps)
        del norm.weight
        norm.weight = w  # the input leaf, so that its gradient is measured
        return apply_rotary_pos_emb(norm(x).transpose(1, 2), x.new_zeros(1), *tables(x))[0]

    def reference(x, w):
        y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w).transpose(1, 2)
        cos, sin = (t[:, None] for t in tables(x))
        return y * cos + torch.cat((-y[..., D // 2:], y[..., :D // 2]), -1) * sin

    return KernelCase("qk_norm_rope (Qwen3 q)", "HF Qwen3RMSNorm + apply_rotary_pos_emb",
                      [randn(B, S, H, D), randn(D, scale=0.1, shift=1.0)],
                      lambda x, w: ops.qk_norm_rope(x, w, *tables(x), eps), hf, _autograd_reference(reference))


def _moe_case(randn, gen, rows: int, h: int, inter: int, device) -> KernelCase:
    """``moe_experts`` (Mixtral's 8 experts, 2 a token; rows/4 tokens, i = inter/2) against HF's default experts
    forward (``grouped_mm_experts_forward``); the float64 reference is HF's per-expert loop."""
    import types

    import torch
    import torch.nn.functional as F
    from transformers.integrations.moe import grouped_mm_experts_forward

    from tempo_ds import ops

    tokens, experts, k, i = max(rows // 4, 8), 8, 2, max(inter // 2, 16)
    idx = torch.rand(tokens, experts, generator=gen).argsort(-1)[:, :k].to(device)

    def gate(gate_up):
        g, u = gate_up.chunk(2, -1)
        return F.silu(g) * u

    def hf(x, w, gu, down):
        module = types.SimpleNamespace(num_experts=experts, has_gate=True, has_bias=False, is_transposed=False,
                                       has_post_expert_norm=False, _is_expert_parallel=False, gate_up_proj=gu,
                                       down_proj=down, _apply_gate=gate)
        return grouped_mm_experts_forward(module, x, idx, w)

    def loop(x, w, gu, down):
        out = torch.zeros_like(x)
        for e in range(experts):
            tok, slot = torch.where(idx == e)
            g, u = F.linear(x[tok], gu[e]).chunk(2, -1)
            out = out.index_add(0, tok, F.linear(F.silu(g) * u, down[e]) * w[tok, slot, None])
        return out

    inputs = [randn(tokens, h), randn(tokens, k, scale=0.5, shift=0.5), randn(experts, 2 * i, h, scale=h**-0.5),
              randn(experts, h, i, scale=i**-0.5)]
    return KernelCase(f"moe_experts E={experts} k={k}", "HF grouped_mm experts", inputs,
                      lambda x, w, gu, down: ops.moe_experts(x, idx, w, gu, down), hf, _autograd_reference(loop),
                      has_kernel=False)


def _unfused_mlp(g, u, w, activation: str):
    """What HF's gated MLP computes after its gate and up projections: ``down(act(gate) * up)``."""
    import torch.nn.functional as F

    if u is None:
        g, u = g.chunk(2, -1)
    return F.linear((F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")) * u, w)


@contextlib.contextmanager
def our_attention_kernel():
    """Lean attention forced onto our own code: where the dispatch (``choose_backend``) would pick an SDPA
    backend, the Triton kernel when it may run (``TEMPO_DS_TRITON`` not 0), else the blocked PyTorch path.
    ``tempo_ds.ops.attention`` looks ``choose_backend`` up at each call, so patching it there is enough."""
    from tempo_ds.ops.attention_dispatch import Plan, saved_set

    module = importlib.import_module("tempo_ds.ops.attention")
    original = module.choose_backend

    def forced(call):
        plan = original(call)
        if not plan.backend.startswith("sdpa"):
            return plan
        backend = "triton" if call.triton else "pytorch"
        return Plan(backend, saved_set(backend, call), plan.reasons + (f"{plan.backend} refused by bench-gpu",))
    module.choose_backend = forced
    try:
        yield
    finally:
        module.choose_backend = original


def _our_attention(*args, **kwargs):
    from tempo_ds import ops

    with our_attention_kernel():
        return ops.attention(*args, **kwargs)


def _fwd_bwd(fn, flag, inputs, cot, seed):
    """Output and input gradients of ``fn`` (forward and backward under ``TEMPO_DS_TRITON=flag``)."""
    import torch

    with triton_flag(flag):
        torch.manual_seed(seed)
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, cot)
    return out.detach(), list(grads)


def _max_err(results, ref) -> tuple[float, float]:
    out, grads = results
    ref_out, ref_grads = ref
    out_err = (out.double() - ref_out).abs().max().item()
    grad_err = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return out_err, grad_err


def _timed_ms(fn, flag, inputs, cot, seed, passes: int, device) -> float:
    """Milliseconds per forward+backward: ``passes`` of them queued between one pair of CUDA events
    (``perf_counter`` on the CPU). The gradients are returned, not accumulated, and dropped at once."""
    import torch

    with triton_flag(flag):
        torch.manual_seed(seed)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(passes):
                torch.autograd.grad(fn(*inputs), inputs, cot)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / passes
        start_s = time.perf_counter()
        for _ in range(passes):
            torch.autograd.grad(fn(*inputs), inputs, cot)
        return (time.perf_counter() - start_s) * 1e3 / passes


def run_case(case: KernelCase, cfg: dict, device, seed: int) -> dict:
    """Errors against float64, the kernel launchers called (``{path}_kernels``) and the median fwd+bwd ms of
    the Triton path, the PyTorch path and the plain op."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        out_shape = case.plain(*case.inputs).shape
    cot = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device, case.inputs[0].dtype)
    ref = case.reference([t.detach().double() for t in case.inputs], cot.double())
    paths = {"triton": (case.ours, "1")} if case.has_kernel else {}
    paths.update(pytorch=(case.ours, "0"), torch=(case.plain, None))
    row: dict = {"op": case.op, "torch_op": case.torch_op}
    for name in ("triton", "pytorch", "torch"):
        row[f"{name}_out_err"] = row[f"{name}_grad_err"] = row[f"{name}_kernels"] = None
        if name in paths:
            fn, flag = paths[name]
            with kernel_calls() as calls:
                result = _fwd_bwd(fn, flag, case.inputs, cot, seed)
            row[f"{name}_kernels"] = sorted(set(calls))
            if name != "torch" or case.comparable:
                row[f"{name}_out_err"], row[f"{name}_grad_err"] = _max_err(result, ref)
            del result
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(cfg["warmup"] + cfg["reps"]):
        for name, (fn, flag) in paths.items():  # interleaved: clock and load changes hit every path alike
            ms = _timed_ms(fn, flag, case.inputs, cot, seed, cfg["passes"], device)
            if rep >= cfg["warmup"]:
                times[name].append(ms)
    for name in ("triton", "pytorch", "torch"):
        row[f"{name}_ms"] = statistics.median(times[name]) if name in times else None
    return row


def kernel_phase(cases: list[KernelCase], cfg: dict, device, deadline: float, notes: list, rows: list,
                 save: Callable) -> None:
    """Phase 1: one row per case (see ``run_case``) appended to ``rows``; a case that raises is a note
    naming it and its error, and one that would start after ``deadline`` is skipped with a note."""
    for case in cases:
        if time.monotonic() > deadline:
            notes.append(f"kernels: {case.op} skipped, the kernel phase's share of --budget_s was spent")
            continue
        try:
            rows.append(run_case(case, cfg, device, seed=0))
            _log(f"kernel {case.op}: done")
        except Exception as e:
            notes.append(f"kernels: {case.op} failed: {_brief(e)}")
            _log(f"kernel {case.op} failed:\n{traceback.format_exc()}")
        save()


# ------------------------------------------------------------------------------------------------
# Phase 1, continued: gated MLP kernel vs its PyTorch path, bit for bit
# ------------------------------------------------------------------------------------------------
def gated_mlp_bitwise(cfg: dict, device, seed: int = 0) -> list[dict]:
    """The gated MLP's Triton kernel against its PyTorch path (which runs exactly HF's unfused ops) on the same
    inputs, for each dtype, activation and layout (separate gate/up or a fused gate_up): ``kernel_equals_pytorch``
    (``torch.equal`` on the output and every gradient), the largest difference in units of the dtype's eps times
    the tensor's largest magnitude, and the kernel's error against float64 over HF's (must be <= 2)."""
    import torch

    from tempo_ds import ops
    from tempo_ds.presets import DTYPES

    T, H, I = cfg["mlp_check"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for dtype_name in cfg["gated_dtypes"]:
        dtype = DTYPES[dtype_name]
        for act in ("silu", "gelu_tanh"):
            for fused in (False, True):
                def rand(*shape, scale=1.0):
                    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

                full = [rand(T, 2 * I if fused else I, scale=2.0)] + ([] if fused else [rand(T, I)]) \
                    + [rand(H, I, scale=I**-0.5)]
                dout = rand(T, H)
                low = [t.to(device, dtype).requires_grad_() for t in full]
                ref_in = [t.to(device).requires_grad_() for t in full]

                def ours(*a):
                    return ops.gated_mlp(a[0], None if fused else a[1], a[-1], activation=act)

                def hf(*a):
                    return _unfused_mlp(a[0], None if fused else a[1], a[-1], act)

                with kernel_calls() as calls:
                    kern = _fwd_bwd(ours, "1", low, dout.to(device, dtype), seed)
                path = _fwd_bwd(ours, "0", low, dout.to(device, dtype), seed)
                plain = _fwd_bwd(hf, "0", low, dout.to(device, dtype), seed)
                ref = _fwd_bwd(hf, "0", ref_in, dout.to(device), seed)
                k_all, p_all, h_all, r_all = ([r[0]] + r[1] for r in (kern, path, plain, ref))
                eps = torch.finfo(dtype).eps
                ulps = max(((a.double() - b.double()).abs().max() / (eps * b.double().abs().max().clamp_min(1e-30)))
                           .item() for a, b in zip(k_all, p_all))
                err_x = max((a.double() - r).abs().max().item() / max((h.double() - r).abs().max().item(), 1e-30)
                            for a, h, r in zip(k_all, h_all, r_all))
                rows.append({"dtype": dtype_name, "activation": act, "fused_gate_up": fused,
                             "kernels": sorted(set(calls)),
                             "kernel_equals_pytorch": all(torch.equal(a, b) for a, b in zip(k_all, p_all)),
                             "pytorch_equals_hf": all(torch.equal(a, b) for a, b in zip(p_all, h_all)),
                             "max_diff_eps": ulps, "err_vs_hf_x": err_x})
    return rows


# ------------------------------------------------------------------------------------------------
# Phase 1, continued: attention dispatch (SDPA backends) vs our Triton kernel vs HF sdpa
# ------------------------------------------------------------------------------------------------
# (name, padding mask, dropout, causal, query heads per k/v head: 1 or cfg["gqa"])
ATTENTION_CASES = (("padding mask", True, 0.0, False, False), (f"padding mask, dropout {DROPOUT_P}", True, DROPOUT_P,
                   False, False), (f"causal, dropout {DROPOUT_P}", False, DROPOUT_P, True, False),
                   (f"GQA, padding mask, dropout {DROPOUT_P}", True, DROPOUT_P, False, True))
ATTENTION_IMPLS = ("tempo_ds dispatch", "tempo_ds Triton (forced)", "HF sdpa (F.sdpa)")


def _attention_reference(q, k, v, mask, p, causal, cot, keep):
    """Float64 attention with repeated k/v heads, the boolean mask, causality and (``keep``) our dropout mask."""
    import torch

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lq, lk, lv = leaves
    group = lq.shape[1] // lk.shape[1]
    kk, vv = lk.repeat_interleave(group, 1), lv.repeat_interleave(group, 1)
    scores = lq @ kk.transpose(-1, -2) * lq.shape[-1] ** -0.5
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if mask is not None:
        visible = visible & mask
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    if keep is not None:
        probs = probs * keep(probs.shape) / (1 - p)
    out = probs @ vv
    out.backward(cot.double())
    return out.detach(), [t.grad for t in leaves]


def attention_dispatch(cfg: dict, dtype, device, seed: int, deadline: float, notes: list, rows: list,
                       save: Callable) -> None:
    """One row per case of ``ATTENTION_CASES`` and implementation of ``ATTENTION_IMPLS``: the backend the call
    took (``plan_for``; F.sdpa picks its own), the kernel launchers called, the error against float64 (None where
    the backend draws dropout masks we cannot reproduce: SDPA's Philox) and the median forward+backward time."""
    import torch
    import torch.nn.functional as F

    from tempo_ds import ops
    from tempo_ds.ops._library import draw_seed
    from tempo_ds.ops.attention import plan_for
    from tempo_ds.ops.dropout import fill_keep_mask

    B, H, S, D = cfg["attn"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, masked, p, causal, gqa in ATTENTION_CASES:
        if time.monotonic() > deadline:
            notes.append(f"attention: {name} skipped, the kernel phase's share of --budget_s was spent")
            continue
        try:
            hkv = H // cfg["gqa"] if gqa else H

            def randn(*shape):
                return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()

            q, k, v = randn(B, H, S, D), randn(B, hkv, S, D), randn(B, hkv, S, D)
            cot = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).to(device, dtype)
            mask = None
            if masked:  # odd batch rows: the last quarter of the keys is padding
                lengths = torch.tensor([S - (S // 4) * (b % 2) for b in range(B)], device=device)
                mask = (torch.arange(S, device=device) < lengths[:, None])[:, None, None, :]

            def keep_mask(shape):
                torch.manual_seed(seed)
                flat = torch.empty(math.prod(shape), dtype=torch.bool, device=device)
                return fill_keep_mask(flat, draw_seed(device), p, 0).view(shape)

            def dispatch(q_, k_, v_):
                return ops.attention(q_, k_, v_, mask, p, causal)

            def forced(q_, k_, v_):
                return _our_attention(q_, k_, v_, mask, p, causal)

            def hf(q_, k_, v_):
                extra = {"enable_gqa": True} if gqa else {}
                return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                      **extra)
            impls = {"tempo_ds dispatch": (dispatch, "1"), "tempo_ds Triton (forced)": (forced, "1"),
                     "HF sdpa (F.sdpa)": (hf, None)}
            results = {}
            for impl, (fn, flag) in impls.items():
                with triton_flag(flag):
                    if impl == "HF sdpa (F.sdpa)":
                        backend = "F.sdpa (its own choice)"
                        reasons = ()
                    else:
                        ctx = our_attention_kernel() if impl.endswith("(forced)") else contextlib.nullcontext()
                        with ctx:
                            plan = plan_for(q, k, v, mask, p, causal)
                        backend, reasons = plan.backend, plan.reasons
                with kernel_calls() as calls:
                    result = _fwd_bwd(fn, flag, [q, k, v], cot, seed)
                ours_mask = backend in ("triton", "pytorch")
                out_err = grad_err = None
                if p == 0 or ours_mask:
                    ref = _attention_reference(q, k, v, mask, p, causal, cot, keep_mask if p else None)
                    out_err, grad_err = _max_err(result, ref)
                    del ref
                del result
                results[impl] = {"case": name, "impl": impl, "backend": backend, "refused": list(reasons),
                                 "kernels": sorted(set(calls)), "out_err": out_err, "grad_err": grad_err,
                                 "heads": H, "kv_heads": hkv, "dropout": p, "causal": causal, "padding_mask": masked}
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            for rep in range(cfg["warmup"] + cfg["reps"]):
                for impl, (fn, flag) in impls.items():
                    ms = _timed_ms(fn, flag, [q, k, v], cot, seed, cfg["passes"], device)
                    if rep >= cfg["warmup"]:
                        times[impl].append(ms)
            for impl in impls:
                results[impl]["ms"] = statistics.median(times[impl])
                rows.append(results[impl])
            _log(f"attention {name}: done")
        except Exception as e:
            notes.append(f"attention: {name} failed: {_brief(e)}")
            _log(f"attention {name} failed:\n{traceback.format_exc()}")
        save()


# ------------------------------------------------------------------------------------------------
# Phase 1, continued: the ahead-of-time compile check for this device's architecture
# ------------------------------------------------------------------------------------------------
def launched_kernels() -> list[dict]:
    """Every Triton kernel of ``tempo_ds.kernels`` that this process compiled and launched (phase 1), read from
    Triton's in-memory cache: kernel, warps, stages, shared memory, registers and spills per thread, as the
    device's driver loaded it: the resource figures of real launches beside the AOT compile's."""
    from triton.runtime.jit import JITFunction

    rows = []
    for name in KERNEL_ENTRY_POINTS:
        module = importlib.import_module(f"tempo_ds.kernels.{name}")
        for attr, obj in sorted(vars(module).items()):
            fn = obj if isinstance(obj, JITFunction) else getattr(obj, "fn", None)  # an Autotuner wraps one
            if not isinstance(fn, JITFunction):
                continue
            for device, cache in getattr(fn, "device_caches", {}).items():
                entries = cache if isinstance(cache, tuple) else (cache,)
                seen = set()
                for table in (e for e in entries if isinstance(e, dict)):  # Triton's layout of this tuple varies
                    for key, compiled in table.items():
                        meta = getattr(compiled, "metadata", None)
                        if meta is None or id(compiled) in seen:
                            continue
                        seen.add(id(compiled))
                        rows.append({"module": name, "kernel": attr, "device": str(device),
                                     "specialization": str(key)[:300],
                                     "num_warps": getattr(meta, "num_warps", None),
                                     "num_stages": getattr(meta, "num_stages", None),
                                     "shared": getattr(meta, "shared", None),
                                     "regs": getattr(compiled, "n_regs", None),
                                     "spills": getattr(compiled, "n_spills", None)})
    return rows


def aot_start(device, matrix: str = "ci", jobs: int | None = None):
    """Start ``tempo_ds.kernels.aot`` (the CI subset of every kernel module's ``aot_specializations``) for the
    device's own architecture in a background process, with ``TRITON_INTERPRET`` unset; on the CPU (smoke) only
    the gated MLP's, for sm_90. Returns ``(process or None, result dict)``; :func:`aot_finish` collects it. It
    runs on the CPU cores beside phases 2 and 3 (which time nothing that matters to the CPU but compiles)."""
    import subprocess

    import torch

    from tempo_ds.kernels._launch import SHARED_MEMORY

    only = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = major * 10 + minor
        if arch not in SHARED_MEMORY:
            return None, {"status": f"skipped: sm_{arch} is not one of {sorted(SHARED_MEMORY)} "
                                    "(tempo_ds.kernels._launch.SHARED_MEMORY)"}
    else:
        arch, only = 90, ("gated_mlp",)
    jobs = jobs or max(1, (os.cpu_count() or 2) - 2)
    cmd = [sys.executable, "-m", "tempo_ds.kernels.aot", "--json", "-", "--arch", str(arch), "--jobs", str(jobs)]
    if only:
        cmd += ["--only", ",".join(only)]
    if matrix == "full":
        cmd.append("--full")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, {"status": "running", "arch": arch, "matrix": matrix, "only": list(only) if only else None,
                  "jobs": jobs,
                  "started": time.monotonic()}


def aot_finish(proc, result: dict, deadline: float) -> None:
    """Wait for :func:`aot_start`'s process until ``deadline`` (then kill it) and fill ``result``: status,
    specializations, failures (name, error, shared memory and limit), the summary table and every row."""
    import subprocess

    from tempo_ds.kernels import aot

    if proc is None:
        return
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        result["status"] = "failed: still compiling at its deadline (killed)"
        return
    result["seconds"] = time.monotonic() - result.pop("started")
    if proc.returncode not in (0, 1):
        result["status"] = f"failed: exit {proc.returncode}: {' '.join(err[-400:].split())}"
        return
    rows = json.loads(out)
    bad = aot.failures(rows)
    result.update(status="ran", specializations=len(rows), summary=aot.summary(rows), rows=rows,
                  failures=[{k: r[k] for k in ("name", "error", "shared", "limit")} for r in bad])


# ------------------------------------------------------------------------------------------------
# Phases 2 and 3: sync debug mode, torch.compile vs eager, on injected models
# ------------------------------------------------------------------------------------------------
def _training_setup(arch: str, size: str, layers: int | None, seq: int, batch: int, tempo: dict | None,
                    device, attn: str = "sdpa"):
    """A preset model (fp32 master weights, train mode), tempo_ds injected when ``tempo`` is a dict, AdamW and a
    batch of the embedded corpus."""
    import torch

    from tempo_ds import presets
    from tempo_ds.bench.trial import trial_batch
    from tempo_ds.data import load_tokenizer
    from tempo_ds.inject import inject

    with device:
        model = presets.build_model(arch, size, dtype="fp32", vocab_size=len(load_tokenizer()), max_seq=seq,
                                    attn=attn, layers=layers)
        if tempo is not None:
            inject(model, tempo)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    inputs = {k: t.to(device) for k, t in trial_batch(arch, seq, batch).items()}
    return model, opt, inputs


def _offending_frame(e: BaseException) -> str | None:
    """Where a synchronizing call came from: ``file:line in function: source`` of the innermost frame outside
    torch, and of the innermost tempo_ds frame when that is another one."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]

    def show(f):
        return f"{f.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno} in {f.name}: {f.line}"
    if not frames:
        return None
    ours = [f for f in frames if "tempo_ds" in f.filename]
    text = show(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        text += f" (innermost tempo_ds frame: {show(ours[-1])})"
    return text


def sync_phase(cfg: dict, device, deadline: float, rows: list, result: dict, save: Callable) -> None:
    """Each model of ``cfg["sync_models"]``, HF sdpa and tempo_ds without an attention mask and tempo_ds with
    ``mask_check="never"`` on an all-ones mask, one warm-up step, then forward+backward and the optimizer step
    each under ``torch.cuda.set_sync_debug_mode("error")``: passed, or the first synchronizing call's message
    and the frame it came from."""
    import torch

    if device.type != "cuda":
        result["status"] = "skipped: needs CUDA"
        return
    result["status"] = "ran"
    for label, arch, size, layers in cfg["sync_models"]:
        for variant, tempo, keep_mask in (("HF sdpa", None, False), ("tempo_ds", {}, False),
                                          ("tempo_ds, mask_check=never", {"mask_check": "never"}, True)):
            row = {"model": label, "arch": arch, "size": size, "layers": layers, "variant": variant}
            if time.monotonic() > deadline:
                row["status"] = "skipped: its share of --budget_s was spent"
                rows.append(row)
                continue
            try:
                model, opt, inputs = _training_setup(arch, size, layers, cfg["seq"], cfg["sync_batch"], tempo, device)
                if not keep_mask:
                    inputs.pop("attention_mask", None)  # all ones: reading it is what mask_check="host" does

                def forward_backward():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(**inputs).loss
                    loss.backward()

                def optimizer_step():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                forward_backward()
                optimizer_step()
                torch.cuda.synchronize(device)
                for part, fn in (("forward_backward", forward_backward), ("optimizer_step", optimizer_step)):
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        fn()
                        row[part] = "passed"
                    except RuntimeError as e:
                        row[part] = "failed"
                        row[f"{part}_error"] = _brief(e)
                        row[f"{part}_where"] = _offending_frame(e)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize(device)
                    if part == "forward_backward" and row[part] == "failed":
                        opt.zero_grad(set_to_none=True)  # the optimizer step is checked on a full set of
                        forward_backward()               # gradients, computed outside the debug mode
                row["status"] = "ran"
                del model, opt, inputs
            except Exception as e:
                row["status"] = f"failed: {_brief(e)}"
                _log(traceback.format_exc())
            finally:
                torch.cuda.set_sync_debug_mode(0)
            rows.append(row)
            torch.cuda.empty_cache()
            save()


def compile_phase(cfg: dict, device, deadline: float, result: dict, save: Callable) -> None:
    """tempo_ds injected into ``cfg["compile_model"]``: one training step (forward, backward) eager and under
    ``torch.compile(fullgraph=True)`` (Inductor on CUDA, aot_eager on the CPU): the graphs Dynamo captured, the
    graph breaks, the compile time, tokens/s of each and their ratio, and the largest gradient difference."""
    import torch

    label, arch, size, layers = cfg["compile_model"]
    seq, batch, steps = cfg["compile_seq"], cfg["compile_batch"], cfg["compile_steps"]
    result.update(model=label, arch=arch, size=size, layers=layers, seq=seq, batch=batch, fullgraph=True,
                  backend="inductor" if device.type == "cuda" else "aot_eager")
    if time.monotonic() > deadline:
        result["status"] = "skipped: its share of --budget_s was spent"
        return
    import torch._dynamo

    model, _, inputs = _training_setup(arch, size, layers, seq, batch, {}, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    graphs: list[int] = []
    inner = torch._dynamo.lookup_backend(result["backend"])

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    def step(m, keep: bool = True) -> list:
        torch.manual_seed(0)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = m(**inputs).loss
        loss.backward()
        grads = [None if q.grad is None else q.grad.detach().clone() for q in model.parameters()] if keep else []
        model.zero_grad(set_to_none=True)
        return grads

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    try:
        eager_grads = step(model)
        sync()
        start = time.perf_counter()
        compiled_grads = step(compiled)
        sync()
        result["compile_s"] = time.perf_counter() - start
    except Exception as e:
        result["status"] = f"failed: {_brief(e)}"
        _log(traceback.format_exc())
        return
    pairs = [(a, b) for a, b in zip(eager_grads, compiled_grads) if a is not None or b is not None]
    result["grads_missing"] = sum(1 for a, b in pairs if a is None or b is None)  # one side has no gradient
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in pairs if a is not None and b is not None]
    result["max_abs_grad"] = max(a.abs().max().item() for a, _ in pairs if a is not None)
    result["max_grad_diff"] = max(diffs)
    result["graphs"] = len(graphs)
    result["graph_nodes"] = graphs
    result["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    del eager_grads, compiled_grads
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for name, m in (("eager", model), ("compiled", compiled)):
            sync()
            start = time.perf_counter()
            step(m, keep=False)
            sync()
            times[name].append(time.perf_counter() - start)
    result["graphs_after_timing"] = len(graphs)  # more than ``graphs``: the timed steps recompiled
    for name in times:
        result[f"{name}_tokens_per_s"] = batch * seq / statistics.median(times[name])
    result["compiled_over_eager"] = result["compiled_tokens_per_s"] / result["eager_tokens_per_s"]
    result["status"] = "ran"
    torch._dynamo.reset()
    save()


# ------------------------------------------------------------------------------------------------
# Phase 4: models
# ------------------------------------------------------------------------------------------------
def model_phase(cfg: dict, dtype: str, budget_bytes: int, device, deadline: float, trial_estimate_s: float,
                notes: list, rows: list, save: Callable, skipped: list) -> None:
    """Phase 4: for each model and run, the largest micro-batch search, starting at the equal micro-batch
    (whose trial gives the equal-batch figures); trials in fresh processes on CUDA, in this one on the CPU.
    Liger runs one trial, at the equal micro-batch only (CUDA and liger_kernel needed; else an entry of
    ``skipped`` with the reason). The first two runs of every model go first. A search starts only with
    ``SEARCH_RESERVE_TRIALS``
    trials' time left, a trial taking the longest one measured so far (``trial_estimate_s`` before any)."""
    from tempo_ds.bench.max_batch import largest_micro_batch

    order = [(m, v) for m in cfg["models"] for v in m[3][:RUN_FIRST]]
    rest = [(m, v) for m in cfg["models"] for v in m[3][RUN_FIRST:]]
    order += sorted(rest, key=lambda mv: mv[1] != "Liger")  # one trial: before the remaining searches
    walls: list[float] = []
    for (label, arch, size, _), variant in order:
        attn, tempo = VARIANTS[variant]
        trial_s = max(walls, default=trial_estimate_s)
        left = deadline - time.monotonic()
        spec = {"arch": arch, "size": size, "seq": cfg["seq"], "dtype": dtype, "attn": attn, "layers": None,
                "tempo": tempo}
        if variant == "Liger":
            missing = liger_missing(device)
            if missing:
                skipped.append({"model": label, "variant": variant, "reason": missing})
                continue
            if left <= 0 or left < trial_s:
                notes.append(f"models: {label} {variant} skipped, {max(left, 0):.0f} s of --budget_s left")
                continue
            try:
                trial = liger_trial_subprocess(spec, cfg["equal_batch"], cfg, timeout_s=left)
            except Exception as e:
                notes.append(f"models: {label} {variant} failed: {_brief(e)}")
                continue
            walls.append(trial["wall_s"])
            rows.append(_model_row(label, arch, size, variant, attn, tempo, cfg, [trial], None))
            save()
            continue
        if left <= 0 or left < SEARCH_RESERVE_TRIALS * trial_s:
            notes.append(f"models: {label} {variant} skipped, {max(left, 0):.0f} s of --budget_s left "
                         f"(a search needs about {SEARCH_RESERVE_TRIALS} x {trial_s:.0f} s)")
            continue
        try:
            found = largest_micro_batch(spec, budget_bytes, max_batch=cfg["max_batch"], start=cfg["equal_batch"],
                                        warmup=cfg["warmup_steps"], steps=cfg["steps"],
                                        isolate=device.type == "cuda", device=device.type, deadline=deadline,
                                        trial_s=trial_s)
        except Exception as e:  # a trial that crashed, or hung past its own timeout
            notes.append(f"models: {label} {variant} failed: {_brief(e)}")
            _log(traceback.format_exc())
            continue
        trials = found["trials"]
        walls += [t["wall_s"] for t in trials]
        if not found["complete"]:
            notes.append(f"models: {label} {variant}: search stopped after {len(trials)} trials, {found['stopped']}; "
                         "its largest micro-batch is the largest that fitted so far, a lower bound")
        if not trials:
            continue
        rows.append(_model_row(label, arch, size, variant, attn, tempo, cfg, trials, found))
        _log(f"model {label} {variant}: largest micro-batch {found['batch']} ({len(trials)} trials, "
             f"{'complete' if found['complete'] else 'stopped'})")
        save()


def _model_row(label, arch, size, variant, attn, tempo, cfg, trials: list[dict], found: dict | None) -> dict:
    """A model table row from a search's trials (``found``: its result; None: one trial at the equal batch)."""
    by_batch = {t["batch"]: t for t in trials}
    equal = by_batch[cfg["equal_batch"]]  # the first trial
    found = found or {"method": equal.get("method"), "complete": True, "batch": None, "peak_bytes": None,
                      "tokens_per_s": None}
    largest = by_batch.get(found["batch"], {})  # 0 or None: none
    baseline = next(m[3][0] for m in cfg["models"] if m[0] == label)
    return {"model": label, "arch": arch, "size": size, "variant": variant, "baseline": baseline, "attn": attn,
            "tempo": tempo,
            "params": next((t["params"] for t in trials if t.get("params")), None),
            "method": found["method"], "complete": found["complete"], "searched": found["batch"] is not None,
            "equal_batch": cfg["equal_batch"], "equal_fits": equal["fits"], "equal_peak_bytes": equal["peak_bytes"],
            "equal_reserved_bytes": equal.get("reserved_bytes"), "equal_tokens_per_s": equal.get("tokens_per_s"),
            "equal_alloc_retries": equal.get("alloc_retries"), "largest_batch": found["batch"],
            "largest_peak_bytes": found["peak_bytes"], "largest_tokens_per_s": found["tokens_per_s"],
            "largest_alloc_retries": largest.get("alloc_retries"),
            "search_s": sum(t["wall_s"] for t in trials), "trials": trials}


def liger_missing(device) -> str | None:
    """Why the Liger run cannot run here (None: it can): its kernels need CUDA, and liger_kernel must import."""
    if device.type != "cuda":
        return "skipped: needs CUDA (Liger-Kernel's Triton kernels do not run on the CPU)"
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception as e:
        return f"skipped: liger_kernel does not import ({_brief(e)})"
    return None


def liger_trial(spec: dict, batch: int, warmup: int, steps: int) -> dict:
    """One ``tempo_ds.bench.trial`` run of the untouched preset after ``apply_liger_kernel_to_llama`` patched
    transformers' Llama classes (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy: all its memory options), so
    the fresh model the trial builds is Liger's. Meant for a fresh process (the patch is global)."""
    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    from tempo_ds.bench.trial import allocator_counts, run_trial

    if spec["arch"] != "llama":
        raise ValueError(f"the Liger run patches Llama classes; arch={spec['arch']!r} is not llama")
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    try:
        return run_trial({**spec, "tempo": None}, batch, warmup=warmup, steps=steps, device="cuda")
    except torch.OutOfMemoryError:
        return {"batch": batch, "fits": False, "oom": True, "method": "measured", "peak_bytes": None,
                **allocator_counts(torch.device("cuda"))}


def liger_trial_subprocess(spec: dict, batch: int, cfg: dict, timeout_s: float) -> dict:
    """:func:`liger_trial` in a fresh process (its peak alone, and Liger's patches kept out of this one)."""
    import subprocess

    code = ("import json, sys; from tempo_ds.bench.gpu import liger_trial; "
            "print(json.dumps(liger_trial(json.loads(sys.argv[1]), *map(int, sys.argv[2:]))))")
    cmd = [sys.executable, "-c", code, json.dumps(spec), str(batch), str(cfg["warmup_steps"]), str(cfg["steps"])]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the Liger trial failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    trial = json.loads(lines[-1])
    trial["wall_s"] = time.monotonic() - began
    return trial


def ratios(rows: list[dict]) -> list[dict]:
    """Each run against its model's baseline (the first run of its list: HF eager, HF sdpa for Llama): largest
    batch and tokens/s there (None unless both searches completed), tokens/s and peak at the equal batch."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    base = {r["model"]: r for r in rows if r["variant"] == r["baseline"]}
    out = []
    for r in rows:
        b = base.get(r["model"])
        if b is None or r is b:
            continue
        # a stopped search's largest batch is only a lower bound; an unsearched run has none
        both = r["complete"] and b["complete"] and r["searched"] and b["searched"]
        out.append({"model": r["model"], "variant": r["variant"], "baseline": r["baseline"],
                    "largest_batch": ratio(r["largest_batch"], b["largest_batch"]) if both else None,
                    "equal_tokens_per_s": ratio(r["equal_tokens_per_s"], b["equal_tokens_per_s"]),
                    "largest_tokens_per_s":
                        ratio(r["largest_tokens_per_s"], b["largest_tokens_per_s"]) if both else None,
                    "equal_peak_bytes": ratio(r["equal_peak_bytes"], b["equal_peak_bytes"])})
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.3g}"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _retried(text: str, retries) -> str:
    return f"{text}*" if retries else text


def _kernels(names) -> str:
    if names is None:
        return "-"
    return ", ".join(names) if names else "NONE"


def _display_order(rows: list[dict]) -> list[dict]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(rows, key=lambda r: (models.index(r["model"]), list(VARIANTS).index(r["variant"])))


def markdown(doc: dict) -> str:
    """The Markdown report: header, kernel table, model table, ratio table, notes."""
    k, m = doc["kernels"], doc["models"]
    eq, sizes = m["equal_batch"], k["sizes"]
    shapes = (f"activations {sizes['rows']} x {sizes['hidden']} and {sizes['rows']} x {sizes['inter']}, attention "
              + " x ".join(map(str, sizes["attn"])) + " (batch, heads, seq, head dim)")
    lines = [f"# tempo_ds GPU benchmark{' (smoke)' if doc['smoke'] else ''}", "",
             f"Date: {doc['date']}. Card: {doc['card']}. Python {doc['python']}, torch {doc['torch']} "
             f"(CUDA {doc['cuda'] or 'none'}), triton {doc['triton']}, transformers {doc['transformers']}. "
             f"TEMPO_DS_TRITON: {doc['tempo_ds_triton'] or 'unset'} (the tempo_ds trials inherit it). "
             f"Command: `{doc['command']}`; {doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget.", "",
             f"## Kernels ({k['dtype']}; {shapes})", "",
             "Max |error| against a float64 reference on the same inputs (output; input gradients), the median "
             f"forward+backward time (each timing over {k['passes']} queued passes) and the Triton kernel launchers "
             "the Triton "
             "path called (NONE: no kernel ran). Triton = the op's Triton kernel, PyTorch path = the same op with "
             "`TEMPO_DS_TRITON=0`, torch = the PyTorch op it replaces (its error is left out where it draws other "
             "dropout masks; few-bit's reference is its own table).", "",
             "| op | replaces | out err Triton | out err PyTorch path | out err torch | grad err Triton | "
             "grad err PyTorch path | grad err torch | ms Triton | ms PyTorch path | ms torch | Triton / torch time "
             "| kernels run by the Triton path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
        speed = r["triton_ms"] / r["torch_ms"] if r["triton_ms"] is not None and r["torch_ms"] else None
        lines.append(f"| {r['op']} | {r['torch_op']} | {_fmt(r['triton_out_err'])} | {_fmt(r['pytorch_out_err'])} | "
                     f"{_fmt(r['torch_out_err'])} | {_fmt(r['triton_grad_err'])} | {_fmt(r['pytorch_grad_err'])} | "
                     f"{_fmt(r['torch_grad_err'])} | {_fmt(r['triton_ms'], '.3f')} | {_fmt(r['pytorch_ms'], '.3f')} | "
                     f"{_fmt(r['torch_ms'], '.3f')} | {_fmt(speed, '.2f')} | {_kernels(r['triton_kernels'])} |")
    lines += _gated_lines(k["gated_mlp_bitwise"], sizes) + _attention_lines(k["attention"], k) \
        + _aot_lines(doc["aot"], k["launched"]) + _sync_lines(doc["sync"]) + _compile_lines(doc["compile"])
    lines += ["", f"## Models (s={m['seq']}, {m['dtype']} autocast, fp32 master weights, AdamW)", "",
              f"Vocabulary {m['vocab']} (the embedded corpus' tokenizer, not the original models' own, so the "
              "parameter counts are below theirs). "
              f"Memory budget per trial: {m['budget_bytes'] / GIB:.2f} GiB ({m['budget_source']}). Peak = "
              + ("`torch.cuda.max_memory_allocated` over the warm-up and timed steps, one process per trial. "
                 "`*`: the caching allocator had to free its cache and retry an allocation in that trial "
                 "(memory nearly full; its time includes the retries)."
                 if m["method"] == "measured" else
                 "derived on the CPU: 16 B/parameter of model states + bytes saved for backward (meter).")
              + ("" if all(r["complete"] for r in m["rows"]) else
                 " `>=`: a search stopped by the deadline, its largest batch so far (see the notes)."), "",
              f"| model | params | run | peak GiB at batch {eq} | reserved GiB at batch {eq} | "
              f"tokens/s at batch {eq} | largest micro-batch | peak GiB there | tokens/s there | trials (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _display_order(m["rows"]):
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        largest = "- (equal batch only)" if not r.get("searched", True) else (
            f"{r['largest_batch']}" if r["complete"] else f">= {r['largest_batch']}")
        lines.append(f"| {r['model']} | {params} | {r['variant']} | "
                     f"{_retried(_gib(r['equal_peak_bytes']), r['equal_alloc_retries'])} | "
                     f"{_gib(r['equal_reserved_bytes'])} | "
                     f"{_retried(_fmt(r['equal_tokens_per_s'], ',.0f'), r['equal_alloc_retries'])} | {largest} | "
                     f"{_retried(_gib(r['largest_peak_bytes']), r['largest_alloc_retries'])} | "
                     f"{_retried(_fmt(r['largest_tokens_per_s'], ',.0f'), r['largest_alloc_retries'])} | "
                     f"{len(r['trials'])} ({r['search_s']:.0f}) |")
    lines += [f"- {r['model']} {r['variant']}: {r['reason']}" for r in m.get("skipped", [])]
    lines += ["", "Ratios to the baseline of the same model (HF eager; HF sdpa for Llama) (the Tempo paper: up to "
              "2x batch, +16% throughput on BERT-Large; `-`: not computable, e.g. a search stopped by the "
              "deadline, or a run measured at the equal batch only):", "",
              "| model | run | baseline | largest micro-batch | tokens/s at equal batch | "
              "tokens/s at each largest batch | "
              "peak memory at equal batch |", "|---|---|---|---|---|---|---|"]
    for r in _display_order(m["ratios"]):
        lines.append(f"| {r['model']} | {r['variant']} | {r['baseline']} | {_times(r['largest_batch'])} | "
                     f"{_times(r['equal_tokens_per_s'])} | {_times(r['largest_tokens_per_s'])} | "
                     f"{_times(r['equal_peak_bytes'])} |")
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _gated_lines(section: dict, sizes: dict) -> list[str]:
    T, H, I = sizes["mlp_check"]
    lines = ["", f"### Gated MLP: Triton kernel vs its PyTorch path, bit for bit ({T} tokens, h={H}, i={I})", "",
             f"Status: {section['status']}. `kernel == PyTorch path`: `torch.equal` on the output and every gradient "
             "(expected on CUDA: same rounding points, libdevice expf/tanhf, IEEE division; under the CPU "
             "interpreter NumPy's exp replaces libdevice's). `diff`: the largest difference in eps x the "
             "tensor's largest magnitude. `err / HF err`: error against float64 over HF's (exactness target <= 2)."]
    if section["rows"]:
        lines += ["", "| dtype | activation | fused gate_up | kernel == PyTorch path | PyTorch path == HF | diff (eps) "
                  "| err / HF err | kernels run |", "|---|---|---|---|---|---|---|---|"]
        for r in section["rows"]:
            lines.append(f"| {r['dtype']} | {r['activation']} | {r['fused_gate_up']} | {r['kernel_equals_pytorch']} | "
                         f"{r['pytorch_equals_hf']} | {_fmt(r['max_diff_eps'])} | {_fmt(r['err_vs_hf_x'])} | "
                         f"{_kernels(r['kernels'])} |")
    return lines


def _attention_lines(rows: list[dict], k: dict) -> list[str]:
    B, H, S, D = k["sizes"]["attn"]
    lines = ["", f"### Attention: SDPA dispatch vs our Triton kernel vs HF sdpa ({k['dtype']}; batch {B}, {H} heads, "
             f"seq {S}, head dim {D}; GQA: {H // k['sizes']['gqa']} k/v heads)", "",
             "Backend = what `tempo_ds.ops.attention.plan_for` chose (forced: SDPA backends refused, so our Triton "
             "kernel). Padding mask: odd batch rows have their last quarter of keys masked. Errors against float64 "
             "are `-` where the backend draws SDPA's Philox dropout mask, which the reference cannot reproduce. "
             "Time: median forward+backward."]
    if rows:
        lines += ["", "| case | implementation | backend | out err | grad err | ms | kernels run |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['impl']} | {r['backend']} | {_fmt(r['out_err'])} | "
                         f"{_fmt(r['grad_err'])} | {_fmt(r['ms'], '.3f')} | {_kernels(r['kernels'])} |")
    return lines


def _aot_lines(aot: dict, launched: dict) -> list[str]:
    lines = ["", "### Ahead-of-time compile (`tempo_ds.kernels.aot`) for this device's arch, and the kernels "
             "launched", "", f"AOT status: {aot['status']}."]
    if aot["status"] == "ran":
        scope = f" (modules: {', '.join(aot['only'])})" if aot.get("only") else ""
        lines += [f"sm_{aot['arch']}{scope}, {aot.get('matrix', 'ci')} matrix: {aot['specializations']} "
                  f"specializations, {len(aot['failures'])} failures, {aot['seconds']:.0f} s.", "", aot["summary"]]
        lines += [f"- failed: {f['name']}: {f['error'] or 'exceeds shared memory'}" for f in aot["failures"]]
    lines += ["", f"Kernels this run launched on the device in phase 1 (Triton's cache, as the driver loaded them): "
              f"{launched['status']}."]
    if launched["rows"]:
        lines += ["", "| module | kernel | warps | stages | shared KB | regs | spills |",
                  "|---|---|---|---|---|---|---|"]
        for r in launched["rows"]:
            shared = "-" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
            lines.append(f"| {r['module']} | {r['kernel']} | {_fmt(r['num_warps'], '')} | {_fmt(r['num_stages'], '')} "
                         f"| {shared} | {_fmt(r['regs'], '')} | {_fmt(r['spills'], '')} |")
    return lines


def _sync_lines(sync: dict) -> list[str]:
    lines = ["", "## Sync check: a training step under `torch.cuda.set_sync_debug_mode(\"error\")`", "",
             f"Status: {sync['status']}. After one warm-up step, forward+backward (bf16 autocast) and the fused "
             "AdamW step each ran in sync-debug mode \"error\": any device-to-host synchronization raises. HF "
             "sdpa and tempo_ds (default config) run without an attention mask (given an all-ones mask, both "
             "read it on the host once per forward, by design; without one, transformers reads a causal LM's "
             "position_ids to detect packed sequences); tempo_ds with `mask_check=\"never\"` runs on the "
             "batch's all-ones mask."]
    if sync["rows"]:
        lines += ["", "| model | run | forward+backward | optimizer step | first offending call |",
                  "|---|---|---|---|---|"]
        for r in sync["rows"]:
            where = "; ".join(f"{r.get(f'{p}_error')} at {r.get(f'{p}_where')}"
                              for p in ("forward_backward", "optimizer_step") if r.get(p) == "failed") or "-"
            lines.append(f"| {r['model']} | {r['variant']} | {r.get('forward_backward', r['status'])} | "
                         f"{r.get('optimizer_step', '-')} | {where} |")
    return lines


def _compile_lines(c: dict) -> list[str]:
    lines = ["", "## torch.compile(fullgraph=True) vs eager, tempo_ds injected", "", f"Status: {c['status']}."]
    if c["status"] == "ran":
        lines += [f"{c['model']}, seq {c['seq']}, batch {c['batch']}, backend {c['backend']}: "
                  f"{c['graphs']} Dynamo graph(s) ({c['graphs_after_timing']} after the timed steps), "
                  f"{c['graph_breaks']} graph break(s), {c['grads_missing']} gradient(s) missing on one side, "
                  "first compiled step "
                  f"{c['compile_s']:.1f} s; forward+backward tokens/s eager {c['eager_tokens_per_s']:,.0f}, "
                  f"compiled {c['compiled_tokens_per_s']:,.0f} ({c['compiled_over_eager']:.2f}x); "
                  f"max |grad compiled - grad eager| {c['max_grad_diff']:.3g} (max |grad| {c['max_abs_grad']:.3g})."]
    return lines


def write(doc: dict, out: Path) -> str:
    """Write gpu.json and gpu.md into ``out``; return the Markdown."""
    text = markdown(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "gpu.md").write_text(text, encoding="utf-8")
    return text


def _brief(e: BaseException) -> str:
    """``Type: message`` on one line, at most 400 characters (Triton's compile errors run to pages)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 400 else text[:397] + "..."


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    """Run the phases within --budget_s and write gpu.json and gpu.md; 2 when the kernels cannot be imported."""
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: no CUDA device; on a CPU only --smoke runs", file=sys.stderr)
        return 2
    if cuda and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 runs the Triton kernels in Python on the CPU: on a GPU their timings "
              "would mean nothing; unset it", file=sys.stderr)
        return 2
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (by the preflight)
    problem = preflight()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from tempo_ds.data import embedded_token_stream, load_tokenizer
    from tempo_ds.presets import DTYPES

    cfg = SMOKE if args.smoke else GPU
    device = torch.device("cuda" if cuda else "cpu")
    if args.budget_gb is not None:
        budget, source = int(args.budget_gb * GIB), "--budget_gb"
    elif cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        budget, source = int(total - args.margin_gb * GIB), f"card total {total / GIB:.2f} GiB - {args.margin_gb} GiB"
    else:
        budget, source = int(SMOKE_BUDGET_GIB * GIB), "smoke default"
    tok = load_tokenizer()
    embedded_token_stream(tok)  # tokenizer and corpus ids cached on disk here, not by the first trial
    out = Path(args.out)
    notes: list[str] = []
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    doc = {"date": datetime.date.today().isoformat(), "card": card, "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
           "transformers": _version("transformers"), "tempo_ds_triton": os.environ.get("TEMPO_DS_TRITON"),
           "smoke": args.smoke, "budget_s": args.budget_s,
           "command": "tempo-ds bench-gpu " + " ".join(sys.argv[1:] if argv is None else argv),
           "elapsed_s": 0.0, "notes": notes,
           "kernels": {"dtype": cfg["kernel_dtype"], "passes": cfg["passes"], "rows": [],
                       "sizes": {k: cfg[k] for k in ("rows", "hidden", "inter", "attn", "lce", "mlp_check", "gqa")},
                       "gated_mlp_bitwise": {"status": "not run", "rows": []}, "attention": [],
                       "launched": {"status": "not run", "rows": []}},
           "aot": {"status": "not run"}, "sync": {"status": "not run", "rows": []}, "compile": {"status": "not run"},
           "models": {"seq": cfg["seq"], "dtype": "bf16", "vocab": len(tok), "equal_batch": cfg["equal_batch"],
                      "method": "measured" if cuda else "derived", "budget_bytes": budget,
                      "budget_source": source, "rows": [], "ratios": [], "skipped": []}}

    def save() -> None:
        doc["elapsed_s"] = time.monotonic() - started
        doc["models"]["ratios"] = ratios(doc["models"]["rows"])
        write(doc, out)

    kernel_deadline = min(deadline, started + KERNEL_SHARE * args.budget_s)
    kernel_phase(kernel_cases(cfg, DTYPES[cfg["kernel_dtype"]], device, seed=0), cfg, device,
                 min(kernel_deadline, started + OP_TABLE_SHARE * args.budget_s), notes, doc["kernels"]["rows"], save)
    bitwise = doc["kernels"]["gated_mlp_bitwise"]
    if time.monotonic() > kernel_deadline:
        bitwise["status"] = "skipped: the kernel phase's share of --budget_s was spent"
    else:
        try:
            bitwise["rows"] = gated_mlp_bitwise(cfg, device)
            bitwise["status"] = "ran"
        except Exception as e:
            bitwise["status"] = f"failed: {_brief(e)}"
            _log(traceback.format_exc())
        save()
    attention_dispatch(cfg, DTYPES[cfg["kernel_dtype"]], device, 0, kernel_deadline, notes,
                       doc["kernels"]["attention"], save)
    launched = doc["kernels"]["launched"]
    if cuda:
        try:
            launched["rows"] = launched_kernels()
            launched["status"] = "ran"
        except Exception as e:
            launched["status"] = f"failed: {_brief(e)}"
    else:
        launched["status"] = "skipped: needs CUDA (the interpreter compiles nothing)"
    if cuda:
        try:
            torch.cuda.empty_cache()  # the inputs of phase 1 are gone; the trials of phase 4 run in other processes
        except RuntimeError as e:  # a kernel that faulted leaves this process's CUDA context unusable
            notes.append(f"kernels: torch.cuda.empty_cache() failed after phase 1 ({_brief(e)})")
    if args.aot == "off":
        aot_proc, doc["aot"] = None, {"status": "skipped: --aot off"}
    elif time.monotonic() >= deadline:
        aot_proc, doc["aot"] = None, {"status": "skipped: --budget_s was spent"}
    else:
        aot_proc, doc["aot"] = aot_start(device, args.aot)
    aot_deadline = deadline if args.aot == "full" else min(deadline, time.monotonic() + AOT_TIMEOUT_S)
    phase_deadline = min(deadline, time.monotonic() + SYNC_SHARE * args.budget_s)
    try:
        sync_phase(cfg, device, phase_deadline, doc["sync"]["rows"], doc["sync"], save)
    except Exception as e:
        doc["sync"]["status"] = f"failed: {_brief(e)}"
        _log(traceback.format_exc())
    phase_deadline = min(deadline, time.monotonic() + COMPILE_SHARE * args.budget_s)
    try:
        compile_phase(cfg, device, phase_deadline, doc["compile"], save)
    except Exception as e:
        doc["compile"]["status"] = f"failed: {_brief(e)}"
        _log(traceback.format_exc())
    aot_finish(aot_proc, doc["aot"], aot_deadline)
    if cuda:
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
    save()
    model_phase(cfg, "bf16", budget, device, deadline, TRIAL_ESTIMATE_S if cuda else 0.0, notes,
                doc["models"]["rows"], save, doc["models"]["skipped"])
    save()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

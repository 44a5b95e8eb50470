"""Injected models under torch.compile(fullgraph=True) and torch.export; DeepSpeed's engine.compile(); HF Trainer
with torch_compile=True. Every tempo_ds op is a custom op with a fake implementation and nothing reads a device
value on the host, so a whole training forward is one graph.

Compilation runs AOTAutograd with the ``aot_eager`` backend (functionalization, fake tensors, the joint forward
and backward graph, our register_autograd formulas) but no code generation, which would cost minutes on CPU;
dropout then draws from the same generator in the same order as eager, so compiled and eager gradients agree.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import tempo_ds

EXACT = dict(gelu="recompute", norm="inplace", attention="lean", dropout="seed")
GRAPHS = []


def counting_backend(gm, example_inputs):
    """aot_eager, counting the graphs dynamo hands over (one per graph break + 1)."""
    from torch._dynamo.backends.debugging import aot_eager

    GRAPHS.append(gm)
    return aot_eager(gm, example_inputs)


torch._dynamo.register_backend(counting_backend, name="tempo_counting")


def build(family: str):
    """Tiny 2-layer model, dropout 0.1 wherever the family has it, injected with every exact technique."""
    common = dict(vocab_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **common))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1,
            attn_pdrop=0.1, vocab_size=128, bos_token_id=1, eos_token_id=2))
    else:  # qwen3: Llama's layout plus per-head q/k norms, fused with RoPE by qk_norm="rope"
        decoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, attention_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       **common)
        model = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder)) if family == "llama" else
                 transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **decoder)))
    model.config.use_cache = False  # training: no KV cache among the outputs (torch.export returns only tensors)
    tempo_ds.inject(model, **EXACT)
    return model.train()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_and_grads(model, step, b):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = step(**b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _targets(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen3"])
def test_fullgraph_compile_and_export(family):
    """One graph (zero breaks) holding our attention op; loss and every gradient equal the uncompiled injected
    model's; torch.export of the training forward succeeds and holds the same ops."""
    model, b = build(family), batch()
    ref_loss, ref_grads = loss_and_grads(model, lambda **kw: model(**kw).loss, b)
    torch._dynamo.reset()
    GRAPHS.clear()
    compiled = torch.compile(lambda **kw: model(**kw).loss, backend="tempo_counting", fullgraph=True)
    loss, grads = loss_and_grads(model, compiled, b)
    assert len(GRAPHS) == 1
    assert "tempo_ds.attention_lean_fwd.default" in _targets(GRAPHS[0].graph)
    assert ("tempo_ds.qk_norm_rope_fwd.default" in _targets(GRAPHS[0].graph)) == (family == "qwen3")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    exported = torch.export.export(model, (), kwargs=b)
    targets = _targets(exported.graph)
    assert "tempo_ds.attention_lean_fwd.default" in targets
    assert ("tempo_ds.seed_dropout_fwd.default" in targets) == (family in ("bert", "gpt2"))  # decoders: no other


def test_tempo_attention_compiles_with_a_padding_mask():
    """mode="tempo" (softmax output + 1-bit mask kept) under fullgraph, with padding, dropout and causality."""
    from tempo_ds.ops import attention

    q, k, v = (torch.randn(2, 4, 12, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False

    def f(q, k, v):
        return attention(q, k, v, mask, dropout_p=0.2, is_causal=True, mode="tempo")

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(3)
        out = fn(q, k, v)
        results.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


def test_hf_trainer_with_torch_compile(tmp_path):
    """TrainingArguments(torch_compile=True) trains an injected model: the same losses as without compiling."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    data = [batch() for _ in range(4)]
    rows = [{k: v[i] for k, v in d.items()} for d in data for i in range(2)]
    from torch._dynamo.utils import counters

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = build("gpt2")
        args = TrainingArguments(output_dir=str(tmp_path / str(compiled)), per_device_train_batch_size=2,
                                 max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                                 save_strategy="no", seed=0, data_seed=0, torch_compile=compiled,
                                 torch_compile_backend="aot_eager", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if compiled:  # the Trainer compiles without fullgraph: count what dynamo did
            assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_deepspeed_engine_compile(tmp_path):
    """deepspeed.initialize on one CPU rank (gloo), engine.compile(fullgraph=True): one graph, and the loss history
    of three ZeRO-1 steps equals the uncompiled engine's."""
    out = tmp_path / "ds_compile.json"
    script = Path(__file__).parent / "scripts" / "ds_compile.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["graphs"] == 1
    assert result["compiled"] == pytest.approx(result["eager"], rel=1e-6)

"""lm_loss=chunked on every family tempo_ds.lm_loss lists (the full matrix; tests/test_lm_loss.py runs a
representative set): fp32 loss and every gradient against the untouched model, the head swapped and the
forward restored by revert, positional-free HF semantics (num_items_in_batch, gradient checkpointing).

    .venv/bin/python tests/scripts/lm_loss_families.py
"""
import copy
import sys

import torch
import transformers as tf

import tempo_ds

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=32, use_cache=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**COMMON, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None),
    "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, final_logit_softcapping=2.0),
    "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                        output_router_logits=True),
    "phi3": lambda: tf.Phi3Config(**COMMON),
    "olmo2": lambda: tf.Olmo2Config(**COMMON),
    "granite": lambda: tf.GraniteConfig(**COMMON, logits_scaling=3.0),
    "cohere": lambda: tf.CohereConfig(**COMMON, logit_scale=0.3),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                           shared_expert_intermediate_size=24, output_router_logits=True),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                           num_experts_per_tok=2, output_router_logits=True),
    "olmoe": lambda: tf.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, output_router_logits=True),
    "granitemoe": lambda: tf.GraniteMoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                              logits_scaling=3.0, output_router_logits=True),
    "olmo": lambda: tf.OlmoConfig(**COMMON),
    "stablelm": lambda: tf.StableLmConfig(**COMMON),
    "phi": lambda: tf.PhiConfig(**COMMON),
    "starcoder2": lambda: tf.Starcoder2Config(**COMMON),
    "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=32, vocab_size=96, max_position_embeddings=32, use_cache=False,
                                dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32, use_cache=False),
    "bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=96, max_position_embeddings=32),
    "roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=96, max_position_embeddings=40),
}
MASKED = ("bert", "roberta")


def build(name):
    torch.manual_seed(0)
    auto = tf.AutoModelForMaskedLM if name in MASKED else tf.AutoModelForCausalLM
    model = auto.from_config(CONFIGS[name]())
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def run(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check(name, checkpointing=False):
    plain = build(name)
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean, dropout="off", attention="off")
    assert any(s.technique == "lm_loss=chunked" for s in report.replaced), str(report)
    if checkpointing:
        for m in (plain, lean):
            m.gradient_checkpointing_enable()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if name in MASKED:
        labels[:, 1::2] = -100
    else:
        labels[0, :4] = -100
    kw = {} if name in MASKED else {"num_items_in_batch": torch.tensor(19)}
    out, grads = run(lean, {"input_ids": ids, "labels": labels}, **kw)
    ref, want = run(plain, {"input_ids": ids, "labels": labels}, **kw)
    assert out.logits is None
    loss_err = abs(out.loss.item() - ref.loss.item()) / abs(ref.loss.item())
    grad_err = max(((grads[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-3)).item() for n in want)
    assert grads.keys() == want.keys()
    tempo_ds.revert(lean)
    assert "forward" not in lean.__dict__
    ok = loss_err < 1e-6 and grad_err < 1e-5
    print(f"{name:8} checkpointing={checkpointing!s:5} loss rel err {loss_err:.1e}  worst grad rel err {grad_err:.1e}  "
          f"{'ok' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    results = [check(name) for name in CONFIGS] + [check("llama", True), check("gpt2", True)]
    sys.exit(0 if all(results) else 1)

"""inject / revert on real HF model classes built from tiny configs: same training maths, fewer bytes."""
import copy

import pytest
import torch
import transformers
from torch import nn

import tempo_ds
from tempo_ds.config import TempoConfigError
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops.layer_norm import side_columns

EXACT = dict(gelu="recompute", norm="inplace", attention="lean", dropout="seed")


def _bert(arch="bert", dropout=0.0, **kw):
    cls_cfg = transformers.BertConfig if arch == "bert" else transformers.RobertaConfig
    cfg = cls_cfg(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  max_position_embeddings=40, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                  pad_token_id=1 if arch == "roberta" else 0, **kw)
    cfg._attn_implementation = "eager"
    cls = transformers.BertForMaskedLM if arch == "bert" else transformers.RobertaForMaskedLM
    return cls(cfg)


def _gpt2(dropout=0.0):
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=40,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg)


def _llama(arch="llama"):
    cls_cfg, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = cls_cfg(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=172, max_position_embeddings=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return cls(cfg)


def _opt():
    cfg = transformers.OPTConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=256, max_position_embeddings=40, activation_function="gelu", dropout=0.0,
                                 attention_dropout=0.0, word_embed_proj_dim=64, pad_token_id=1)
    cfg._attn_implementation = "eager"
    return transformers.OPTForCausalLM(cfg)


FAMILIES = {"bert": _bert, "roberta": lambda **kw: _bert("roberta", **kw), "gpt2": _gpt2,
            "llama": lambda **kw: _llama("llama"), "mistral": lambda **kw: _llama("mistral"),
            "qwen2": lambda **kw: _llama("qwen2"), "opt": lambda **kw: _opt()}


def _batch(model, b=3, s=24, padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if padded:
        mask[0, -5:] = 0           # a padded row: exercises the padding mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def assert_same_loss_and_grads(plain, lean, batch):
    """The injected model's loss and every gradient equal the untouched model's (fp32, rtol 1e-5)."""
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(lean, batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)


def _loss_and_grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_injection_matches_the_untouched_model(family):
    torch.manual_seed(0)
    plain = FAMILIES[family]().train()
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean, silu="off", **EXACT)
    assert report.replaced, str(report)
    batch = _batch(plain)
    assert_same_loss_and_grads(plain, lean, batch)


def test_inplace_gelu_injection_matches_within_the_inversion_floor():
    torch.manual_seed(0)
    plain = _bert().train()
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean, gelu="inplace")
    assert report.counts()["gelu=inplace"] == 2
    batch = _batch(plain)
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(lean, batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)   # forward is exact
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-3, atol=1e-5, msg=name)


def _layer_bytes(model, batch, seed=0):
    model.train()
    torch.manual_seed(seed)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    return meter.per_layer


def test_bert_per_layer_bytes_drop_to_the_design_budget():
    """bf16, dropout on, s=32: HF eager keeps 36 sbh + 6as²b + 8sb per layer; all exact techniques keep the two
    LayerNorm outputs, q, k, v, the attention output (shared with the projection's input) and the GELU input
    = (5h + h + i) elements = 20 sbh at i = 4h, plus per row: 2 LayerNorm rstd (fp32) and the log-sum-exp of
    each head (fp32)."""
    torch.manual_seed(0)
    model = _bert(dropout=0.1).to(torch.bfloat16)
    b, s, h, a, i = 3, 32, 64, 4, 256
    batch = _batch(model, b, s, padded=False)
    before = _layer_bytes(model, batch)
    assert before == [2 * s * b * (10 * h + 2 * i + 3 * a * s + 4)] * 2
    tempo_ds.inject(model, **EXACT)
    after = _layer_bytes(model, batch)
    k = side_columns(h, True)  # each LayerNorm's side buffer: bf16 xhat of k columns and their int64 indices
    expected = 2 * s * b * (6 * h + i) + 4 * s * b * 2 + 4 * b * a * s + 2 * (2 * s * b * k + 8 * k)
    # layer 0 also pays for its input: the embeddings' dropout output, which only its q/k/v Linears keep
    # (every later layer's input is the previous layer's LayerNorm output, charged there)
    assert after == [expected + 2 * s * b * h, expected]
    assert expected / (s * b * h) < 21                          # the design budget: <= 21 sbh


def test_report_measure_and_table():
    torch.manual_seed(0)
    model = _bert(dropout=0.1)
    report = tempo_ds.inject(model)
    figures = report.measure(_batch(model))
    assert figures["after"]["total_bytes"] < figures["before"]["total_bytes"]
    assert tempo_ds.is_injected(model)
    text = str(report)
    assert "bert.encoder.layer.0.output.dense" in text and "GeluLinear" in text and "saved for backward" in text
    assert report.attention == ("eager", "tempo")
    assert not [n for n in report.notes if "KV cache" in n]   # BERT has no KV cache
    gpt2 = _gpt2()
    assert "use_cache" in str(tempo_ds.inject(gpt2))          # GPT-2 does, by default
    gpt2.config.use_cache = False
    assert not tempo_ds.inject(gpt2, norm="off", lm_loss="off").notes


def test_state_dict_round_trip_idempotence_and_revert():
    torch.manual_seed(0)
    model = _bert()
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    report = tempo_ds.inject(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())      # the same Parameter objects
    assert tempo_ds.inject(model) is report                                # idempotent
    plain = _bert()
    plain.load_state_dict(model.state_dict())                              # tempo checkpoint -> plain model
    model.load_state_dict(plain.state_dict())                              # and back
    batch = _batch(model)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
    tempo_ds.revert(model)
    assert not tempo_ds.is_injected(model)
    assert all(m is modules[n] for n, m in model.named_modules())
    assert model.config._attn_implementation == "eager"
    tempo_ds.revert(model)                                                 # no-op


def test_reinjecting_with_another_config_reverts_first():
    model = _bert()
    tempo_ds.inject(model, gelu="recompute")
    report = tempo_ds.inject(model, gelu="inplace", attention="off")
    assert report.counts().get("gelu=inplace") == 2 and "gelu=recompute" not in report.counts()
    assert type(model.bert.encoder.layer[0].output.dense) is nn.Linear
    assert model.config._attn_implementation == "eager"


def test_bad_config_fails_before_anything_changes():
    model = _bert()
    modules = dict(model.named_modules())
    with pytest.raises(TempoConfigError, match="gelu"):
        tempo_ds.inject(model, gelu="fast")
    with pytest.raises(TempoConfigError, match="unknown key"):
        tempo_ds.inject(model, {"tempo": {"gleu": "inplace"}})
    with pytest.raises(ValueError, match="unknown policy"):
        tempo_ds.inject(model, policy="t5")
    assert not tempo_ds.is_injected(model)
    assert all(m is modules[n] for n, m in model.named_modules())


def test_disabled_config_changes_nothing():
    model = _bert()
    report = tempo_ds.inject(model, enabled=False)
    assert not report.replaced and not tempo_ds.is_injected(model)


def test_generic_policy_on_an_architecture_without_a_dedicated_policy():
    torch.manual_seed(0)
    plain = _opt().train()
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean)
    assert report.policy == "generic"
    assert report.counts()["gelu=recompute"] == 2 and report.counts()["norm=inplace"] >= 4
    batch = _batch(plain, padded=False)
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(lean, batch)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(_layer_bytes(lean, batch)) < sum(_layer_bytes(plain, batch))


def test_unsafe_or_unknown_modules_are_left_alone_and_reported():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 32)
            self.act = nn.GELU()
            self.quick = transformers.activations.QuickGELUActivation()
            self.down = nn.Linear(32, 8)

        def forward(self, x):
            return self.down(self.act(self.up(x)) + self.quick(self.up(x)))

    model = nn.Sequential(Block(), nn.LayerNorm(8))
    report = tempo_ds.inject(model)
    skipped = {s.name: s.reason for s in report.skipped}
    assert "0.act" in skipped and "no structural rule names its consumer" in skipped["0.act"]
    tempo_ds.revert(model)
    model.dummy_inputs = {"input": torch.randn(2, 8)}  # traceable: the GELU output is added to another activation
    skipped = {s.name: s.reason for s in tempo_ds.inject(model).skipped}
    assert "traced: its output goes to no module (plain tensor code)" in skipped["0.act"]
    assert type(model[0].act) is nn.GELU and type(model[0].quick).__name__ == "QuickGELUActivation"
    assert any("AttentionInterface" in s.reason for s in report.skipped)
    assert report.counts() == {"norm=inplace": 1}


def test_skip_patterns_and_fewbit():
    model = _bert()
    report = tempo_ds.inject(model, gelu="fewbit", fewbit={"bits": 3}, skip=["*.layer.1.*"])
    # few-bit keeps only its code, so it is safe anywhere: the MLM head's GELU too
    assert report.counts()["gelu=fewbit"] == 2
    assert model.bert.encoder.layer[0].intermediate.intermediate_act_fn.spec.bits == 3
    assert type(model.cls.predictions.transform.transform_act_fn).__name__ == "FewBitGELU"
    assert type(model.bert.encoder.layer[1].intermediate.intermediate_act_fn).__name__ == "GELUActivation"
    skipped = {s.name for s in report.skipped if "skip" in s.reason}
    assert "bert.encoder.layer.1.intermediate.intermediate_act_fn" in skipped
    assert "bert.encoder.layer.1.attention.self.query" not in skipped     # only what a technique would touch


def test_register_policy_takes_precedence():
    policy = tempo_ds.register_policy(tempo_ds.Policy("my-bert", ("bert",),
                                                      (("intermediate.intermediate_act_fn", "output.dense"),)))
    try:
        assert tempo_ds.inject(_bert()).policy == "my-bert"
    finally:
        tempo_ds.policies.POLICIES.remove(policy)
    with pytest.raises(TypeError, match="Policy"):
        tempo_ds.register_policy(object())

"""The generic policy finds each GELU's consuming Linear by tracing (tempo_ds.tracing), on models no dedicated
policy knows: ELECTRA, DistilBERT, MPNet, DeBERTa-v2 and ALBERT, built from tiny configs."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

import tempo_ds

VOCAB, H, I, B, S = 96, 32, 64, 2, 12
FAMILIES = {
    "electra": (T.ElectraConfig, T.ElectraForMaskedLM, dict(embedding_size=H)),
    "distilbert": (T.DistilBertConfig, T.DistilBertForMaskedLM, dict(dim=H, hidden_dim=I, n_layers=2, n_heads=4)),
    "mpnet": (T.MPNetConfig, T.MPNetForMaskedLM, {}),
    "deberta-v2": (T.DebertaV2Config, T.DebertaV2ForMaskedLM, {}),
    "albert": (T.AlbertConfig, T.AlbertForMaskedLM, dict(embedding_size=16, hidden_act="gelu")),  # one layer, run twice
}
ONLY_GELU = dict(attention="off", norm="off", dropout="off", lm_loss="off")


def _model(family):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": I, "max_position_embeddings": 64, **extra})
    return model_cls(config)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_gelu_recompute_is_exact_and_drops_the_gelu_output(family):
    model = _model(family)
    plain = copy.deepcopy(model)
    report = tempo_ds.inject(model, **ONLY_GELU)
    assert report.policy == "generic"
    fused = [s for s in report.replaced if s.technique == "gelu=recompute"]
    layers = 1 if family == "albert" else 2
    assert len(fused) == layers, str(report)
    # the MLM head's GELU feeds a LayerNorm: left alone, with the traced reason
    assert all("not to exactly one Linear" in s.reason for s in report.skipped), str(report)

    batch = {"input_ids": torch.randint(0, VOCAB, (B, S)), "labels": torch.randint(0, VOCAB, (B, S))}
    memory = report.measure(batch)
    gelu_output = B * S * I * 4  # float32: the intermediate tensor the consuming Linear no longer keeps
    before, after = memory["before"]["per_layer_bytes"], memory["after"]["per_layer_bytes"]
    assert [b - a for b, a in zip(before, after)] == [gelu_output * (2 // len(before))] * len(before)

    model.train(), plain.train()
    loss, grads = _loss_and_grads(model, batch)
    want_loss, want = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert grads.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


class _Leaky(nn.Module):
    """GELU -> Linear, but the GELU output is also read by plain tensor code: no hook can see that read."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.dummy_inputs = {"x": torch.randn(3, 8)}

    def forward(self, x):
        h = self.act(self.up(x))
        return self.down(h) + h.mean(-1, keepdim=True)


def test_a_pair_the_hooks_propose_but_the_outputs_refute_is_left_alone():
    model = _Leaky()
    report = tempo_ds.inject(model, **ONLY_GELU)
    assert not report.replaced and type(model.act) is nn.GELU
    (skip,) = report.skipped
    assert skip.name == "act" and "changed the model's output, so something else reads its output too" in skip.reason


def test_a_model_that_cannot_run_falls_back_to_structural_rules():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    model.dummy_inputs = {"input": torch.randn(2, 8)}
    report = tempo_ds.inject(model, **ONLY_GELU)
    assert report.counts() == {"gelu=recompute (moved into the next Linear)": 1, "gelu=recompute": 1}
    with torch.device("meta"):
        lone = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    lone.dummy_inputs = model.dummy_inputs
    report = tempo_ds.inject(lone, **ONLY_GELU)
    assert "not traced (its parameters are not materialised" in report.skipped[0].reason

"""``TempoConfig.mask_check`` and the masks of transformers models (DESIGN.md section 5, rule 10).

* ``"host"`` (default) and ``"never"`` give the untouched model's loss and gradients on a tiny Llama and a tiny
  BERT (HF modules with tempo_ds attention, and the ``bert_layer`` policy's TempoTransformerLayers), with an
  all-ones mask and a padded one;
* under ``"never"`` a whole training step (forward, backward, optimizer step; dropout on) reads no tensor on
  the host - checked with ``test_ops_syncfree.NoHostReads``, which fails on every read - while ``"host"``
  reads exactly when given an all-ones mask, and not without a mask;
* the ``bert_layer`` policy's layers keep a mask once for all layers: a [B, 1, S, S] mask built outside as it
  is, a [B, S] padding mask as one boolean row.
"""
import copy

import pytest
import torch
import transformers

import tempo_ds
from tempo_ds.config import TempoConfigError
from tempo_ds.deepspeed_layer import BERT_PARAMETERS
from tempo_ds.hf_attention import implementation_name, padding_mask
from tempo_ds.memory import SavedTensorMeter
from test_ops_syncfree import NoHostReads

B, S, V = 2, 12, 128


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    monkeypatch.setenv("TEMPO_DS_TRITON", "0")


def _llama(dropout=0.0):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                   attention_dropout=dropout, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   use_cache=False)  # as for training: no cache built in forward
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def _bert(dropout=0.0):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).train()


CASES = {"llama": (_llama, None), "bert": (_bert, None), "bert_layer": (_bert, "bert_layer")}


def _batch(padded: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model, batch):
    """Loss and gradients by name; an HF BertLayer's under the ``bert_layer`` policy's names (its q, k, v
    gradients concatenated as ``attn_qkvw`` / ``attn_qkvb``), so both layouts compare."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in {n.rsplit("attention.self.", 1)[0] for n in grads if "attention.self.query" in n}:
        for name, sources in BERT_PARAMETERS.items():
            grads[prefix + name] = torch.cat([grads.pop(prefix + s) for s in sources])
    return loss.detach(), grads


def _injected(model, policy, mask_check):
    model = copy.deepcopy(model)
    report = tempo_ds.inject(model, policy=policy, mask_check=mask_check)
    assert report.attention[1] == implementation_name("lean", mask_check)
    return model


def test_mask_check_values_and_the_builder():
    with pytest.raises(TempoConfigError, match="mask_check.*'host' or 'never'"):
        tempo_ds.TempoConfig.build(mask_check="sometimes")
    with pytest.raises(ValueError, match="allowed values: 'host', 'never'"):
        implementation_name("lean", "sometimes")
    assert implementation_name("tempo", "never") == "tempo_recompute_syncfree"
    ones = torch.ones(B, S, dtype=torch.bool)
    args = dict(batch_size=B, q_length=S, kv_length=S, attention_mask=ones)
    assert padding_mask(**args) is None                                   # one host read: nothing masked
    row = padding_mask(**args, mask_check="never")                        # no read: the row itself
    assert row.shape == (B, 1, 1, S) and bool(row.all())
    with NoHostReads():
        padding_mask(**args, mask_check="never")
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        padding_mask(**args)
    with pytest.raises(ValueError, match="mask_check='x'; allowed values"):
        padding_mask(**args, mask_check="x")
    # a mask the attention cannot rebuild (sliding window) is sdpa_mask's: "never" turns off its reading skips
    from transformers.masking_utils import sdpa_mask

    sliding = dict(args, local_size=S + 4)
    assert padding_mask(**sliding) is None                                # sdpa_mask read it: all ones
    with NoHostReads():
        full = padding_mask(**sliding, mask_check="never")
    assert torch.equal(full, sdpa_mask(**sliding, allow_is_causal_skip=False))


@pytest.mark.parametrize("case", list(CASES))
def test_both_mask_checks_give_the_untouched_models_loss_and_gradients(case):
    build, policy = CASES[case]
    plain = build()
    host, never = _injected(plain, policy, "host"), _injected(plain, policy, "never")
    for padded in (False, True):
        batch = _batch(padded)
        loss0, grads0 = _loss_and_grads(plain, batch)
        for model in (host, never):
            loss, grads = _loss_and_grads(model, batch)
            torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
            assert grads.keys() == grads0.keys()
            for name, g0 in grads0.items():
                torch.testing.assert_close(grads[name], g0, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_never_reads_nothing_on_the_host_in_a_training_step(case):
    """Dropout on (seeds drawn on the device). "host" reads the all-ones mask once per forward; without a mask
    it reads nothing in BERT, while a causal LM's transformers code then reads position_ids (packed-sequence
    detection, ``masking_utils.find_packed_sequence_indices``): for a causal LM the sync-free step is
    "never" with the mask given."""
    build, policy = CASES[case]
    never = _injected(build(dropout=0.1), policy, "never")
    opt = torch.optim.SGD(never.parameters(), lr=1e-3)
    for padded in (False, True):
        batch = _batch(padded)
        with NoHostReads():
            never(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    host = _injected(build(dropout=0.1), policy, "host")
    batch = _batch(False)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        host(**batch).loss.backward()
    del batch["attention_mask"]
    if case == "llama":
        with pytest.raises(AssertionError, match="host read"), NoHostReads():
            host(**batch).loss.backward()
    else:
        with NoHostReads():
            host(**batch).loss.backward()


def test_bert_layer_masks_are_kept_once():
    """Through the encoder of a ``bert_layer``-injected BERT: a [B, 1, S, S] mask built elsewhere is used as it
    is (B*S*S*4 bytes, float32 additive, kept once, by layer 0), a [B, S] padding mask as one boolean
    [B, 1, 1, S] row (B*S bytes, once); nothing is read on the host."""
    model = _injected(_bert(), "bert_layer", "never")
    encoder = model.bert.encoder
    x = torch.randn(B, S, 32, requires_grad=True)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, -4:] = 0
    full = (1.0 - pad[:, None, None, :].float()).expand(B, 1, S, S).contiguous() * -10000.0

    def per_layer(mask):
        with SavedTensorMeter(model) as meter, NoHostReads():
            out = encoder(x, attention_mask=mask)
        del out
        return meter.per_layer

    none = per_layer(None)
    assert [a - b for a, b in zip(per_layer(full), none)] == [B * S * S * 4, 0]
    assert [a - b for a, b in zip(per_layer(pad), none)] == [B * S, 0]

"""TempoTransformerLayer: DeepSpeed's training layer API on tempo_ds ops, and the policy that puts it into HF BERT."""
import copy
import inspect
import itertools
import math
import pickle
import sys
import types
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from deepspeed.ops.transformer import DeepSpeedTransformerConfig
from helpers import CHECKPOINT_MODES, assert_within_2x_of_torch, run_checkpointed
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertLayer

import tempo_ds
from tempo_ds import policies
from tempo_ds.deepspeed_layer import (BERT_PARAMETERS, PARAMETER_ORDER, TempoBertLayer, TempoTransformerLayer,
                                      bert_layer_policy)
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops.layer_norm import side_columns

FLAGS = ("normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint")
ALL_FLAGS = [dict(zip(FLAGS, values)) for values in itertools.product([True, False], repeat=3)]


def _config(**kw):
    fields = dict(batch_size=2, hidden_size=32, intermediate_size=64, heads=4, attn_dropout_ratio=0.0,
                  hidden_dropout_ratio=0.0, num_hidden_layers=2, initializer_range=0.02)
    return DeepSpeedTransformerConfig(**{**fields, **kw})


def _perturbed(layer, scale=0.1):
    """Random, non-trivial weights (LayerNorm weights near 1, so the in-place LayerNorm keeps its output)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return layer


def _ds_mask(b, s, padded=2):
    """DeepSpeed's additive mask [b, 1, 1, s]: 0 attend, -10000 masked (the last ``padded`` keys of row 0)."""
    mask = torch.zeros(b, 1, 1, s)
    mask[0, ..., s - padded:] = -10000.0
    return mask


def _named(name):
    return lambda message: f"{name}: {message}"


def _close32(actual, expected, name=""):
    """fp32 agreement: rtol 1e-5, and an absolute floor of 1e-5 of the tensor's largest entry (sums of a few
    dozen float32 products in another order differ by that much near zero)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                               msg=_named(name))


def _hf_bert_layer(hidden_act="gelu", **kw):
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_act=hidden_act,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _perturbed(BertLayer(cfg).train()), cfg


# -- the DeepSpeed API -------------------------------------------------------------------------------------
@pytest.fixture
def deepspeed_layer_on_cpu(monkeypatch):
    """DeepSpeedTransformerLayer's own constructor with its CUDA kernel builder stubbed out (on CPU it declares
    its parameters and then fails loading the kernel)."""
    import deepspeed.ops.transformer.transformer as ds

    kernel = types.SimpleNamespace(create_transformer_layer_fp32=lambda *a: None,
                                   create_transformer_layer_fp16=lambda *a: None)
    monkeypatch.setattr(ds, "TransformerBuilder", lambda: types.SimpleNamespace(load=lambda: kernel))
    monkeypatch.setattr(ds, "transformer_cuda_module", None)
    monkeypatch.setattr(ds.DeepSpeedTransformerLayer, "layer_id", 0)
    return ds.DeepSpeedTransformerLayer


def test_parameters_and_signatures_are_deepspeeds(deepspeed_layer_on_cpu):
    theirs = deepspeed_layer_on_cpu(_config())
    ours = TempoTransformerLayer(_config())
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in theirs.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == list(PARAMETER_ORDER)
    for method in ("__init__", "forward", "init_transformer_weights"):
        ds_params = list(inspect.signature(getattr(deepspeed_layer_on_cpu, method)).parameters.values())
        our_params = list(inspect.signature(getattr(TempoTransformerLayer, method)).parameters.values())
        assert [(p.name, p.default) for p in our_params[:len(ds_params)]] == [(p.name, p.default) for p in ds_params]
        assert all(p.kind is p.KEYWORD_ONLY for p in our_params[len(ds_params):])


def test_initial_weights_and_biases_take_deepspeeds_order(deepspeed_layer_on_cpu):
    h, i = 32, 64
    shapes = [(h, h)] * 4 + [(h,), (i, h), (h, i), (h,)]
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    biases = [torch.nn.Parameter(torch.zeros(h)) for _ in range(3)] + \
             [torch.nn.Parameter(torch.randn(s)) for s in [(h,), (h,), (i,), (h,), (h,)]]
    theirs = deepspeed_layer_on_cpu(_config(), weights, biases)
    ours = TempoTransformerLayer(_config(), weights, biases)
    # weights registered before biases, as DeepSpeed does when given initial weights; inject keeps that order
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] != list(PARAMETER_ORDER)
    converted = TempoTransformerLayer.from_deepspeed_layer(theirs)
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for name in PARAMETER_ORDER:
        mine, ds = getattr(ours, name), getattr(theirs, name)
        if name in ("attn_qkvw", "attn_qkvb"):        # new, concatenated q, k, v
            assert mine is not ds and torch.equal(mine, ds)
        else:                                           # the very Parameter objects passed in
            assert mine is ds, name
    torch.testing.assert_close(ours.attn_qkvw, torch.cat(weights[:3]), rtol=0, atol=0)
    # the one deliberate difference: given q, k, v biases are used (DeepSpeed zeroes attn_qkvb)
    biased = [torch.nn.Parameter(torch.randn(h)) for _ in range(3)] + biases[3:]
    assert torch.equal(TempoTransformerLayer(_config(), weights, biased).attn_qkvb, torch.cat(biased[:3]))
    # weights only: the biases are initialised (DeepSpeed would leave them undefined)
    only = TempoTransformerLayer(_config(), [w.bfloat16() for w in weights])
    assert only.attn_ow.dtype == only.attn_ob.dtype == torch.bfloat16
    assert not any(getattr(only, n).any() for n in ("attn_qkvb", "attn_ob", "attn_nb", "inter_b", "output_b"))


def test_layer_id_counts_like_deepspeed():
    cfg = _config()
    first = TempoTransformerLayer(cfg).config.layer_id
    TempoTransformerLayer(cfg)
    assert cfg.layer_id == first + 1


@pytest.mark.parametrize("adjust", [True, False])
def test_init_transformer_weights(adjust):
    torch.manual_seed(0)
    layer = TempoTransformerLayer(_config(hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                          initializer_range=0.05, adjust_init_range=adjust))
    out_std = 0.05 / math.sqrt(2 * 8) if adjust else 0.05
    for name, std in (("attn_qkvw", 0.05), ("inter_w", 0.05), ("attn_ow", out_std), ("output_w", out_std)):
        p = getattr(layer, name)
        assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel()), name
        assert abs(p.std().item() / std - 1) < 0.03, name
    for name in ("attn_qkvb", "attn_ob", "attn_nb", "inter_b", "output_b", "norm_b"):
        assert torch.equal(getattr(layer, name), torch.zeros_like(getattr(layer, name)))
    assert torch.equal(layer.attn_nw, torch.ones(128)) and torch.equal(layer.norm_w, torch.ones(128))
    layer.init_transformer_weights()                     # DeepSpeed's default: no adjustment
    assert abs(layer.attn_ow.std().item() / 0.05 - 1) < 0.03


@pytest.mark.parametrize("fields, names", [
    (dict(hidden_size=30), "hidden_size (30) must be divisible by config.heads (4)"),
    (dict(hidden_size=-1), "config.hidden_size must be a positive integer, got -1 (-1 is"),
    (dict(heads=-1), "config.heads"),
    (dict(attn_dropout_ratio=-1), "config.attn_dropout_ratio"),
    (dict(hidden_dropout_ratio=1.5), "config.hidden_dropout_ratio"),
    (dict(initializer_range=-1), "config.initializer_range"),
    (dict(num_hidden_layers=-1), "config.num_hidden_layers"),
    (dict(layer_norm_eps=0.0), "config.layer_norm_eps"),
])
def test_bad_config_names_the_field(fields, names):
    with pytest.raises(ValueError, match=names.replace("(", r"\(").replace(")", r"\)")):
        TempoTransformerLayer(_config(**fields))


def test_bad_arguments_raise():
    cfg = _config()
    # with both initial lists given nothing is initialised, so initializer_range may stay unset
    ok = TempoTransformerLayer(_config(initializer_range=-1), *_initial_lists(cfg))
    assert ok.attn_qkvw.shape == (96, 32)
    weights, biases = _initial_lists(cfg)
    with pytest.raises(ValueError, match=r"initial_weights\[5\] \(for inter_w\) must be a tensor of shape \(64, 32\)"):
        TempoTransformerLayer(cfg, weights[:5] + [torch.zeros(32, 64)] + weights[6:], biases)
    with pytest.raises(ValueError, match="initial_biases must hold 8 tensors"):
        TempoTransformerLayer(cfg, weights, biases[:7])
    with pytest.raises(ValueError, match="config.hidden_size is missing"):
        TempoTransformerLayer(types.SimpleNamespace(heads=4))
    layer = TempoTransformerLayer(cfg)
    x = torch.randn(2, 5, 32)
    for kw in (dict(head_mask=torch.ones(4)), dict(past_key_value=()), dict(output_attentions=True)):
        with pytest.raises(ValueError, match="does not"):
            layer(x, **kw)
    with pytest.raises(ValueError, match=r"hidden_states must be \[batch, seq, 32\]"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match="config.fp16 is True but the layer computes in torch.float32"):
        TempoTransformerLayer(_config(fp16=True))(x)


def _initial_lists(cfg):
    h, i = cfg.hidden_size, cfg.intermediate_size
    weights = [torch.randn(s) for s in [(h, h)] * 4 + [(h,), (i, h), (h, i), (h,)]]
    biases = [torch.randn(s) for s in [(h,)] * 5 + [(i,), (h,), (h,)]]
    return weights, biases


def test_return_tuple_eval_and_no_grad():
    torch.manual_seed(0)
    layer = TempoTransformerLayer(_config(return_tuple=True, attn_dropout_ratio=0.3, hidden_dropout_ratio=0.3))
    x = torch.randn(2, 5, 32)
    (train_out,) = layer(x)
    layer.eval()
    (eval_out,) = layer(x)
    with torch.no_grad():
        (no_grad_out,) = layer(x)
    no_dropout = copy.deepcopy(layer)
    no_dropout.attn_dropout_ratio = no_dropout.hidden_dropout_ratio = 0.0
    (reference,) = no_dropout.train()(x)
    assert not torch.allclose(train_out, reference)               # dropout acts in training...
    torch.testing.assert_close(eval_out, reference, rtol=0, atol=0)  # ...and not in eval mode
    torch.testing.assert_close(no_grad_out, reference, rtol=0, atol=0)


def test_grads_hook_records_each_gradient_once_with_deepspeeds_names():
    """DeepSpeed's backward test passes ``grads=[]`` and reads ``[gradient, name]`` pairs back."""
    torch.manual_seed(0)
    layer = TempoTransformerLayer(_config())
    x, grads = torch.randn(2, 5, 32), []
    layer(x, grads=grads).sum().backward()
    names = sorted(n for _, n in grads)
    assert names == sorted(["V_W", "V_B", "O_W", "O_B", "N2_W", "N2_B", "int_W", "int_B", "out_W", "out_B", "norm_W",
                            "norm_B"])
    by_name = {n: g for g, n in grads}
    torch.testing.assert_close(by_name["V_W"], layer.attn_qkvw.grad[64:96], rtol=0, atol=0)
    torch.testing.assert_close(by_name["int_B"], layer.inter_b.grad, rtol=0, atol=0)
    layer(x).sum().backward()  # a later call without grads= records nothing
    assert len(grads) == 12
    with pytest.raises(ValueError, match="grads must be a list"):
        layer(x, grads=())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pre_layer_norm", [True, False], ids=["pre_ln", "post_ln"])
def test_16bit_layer_norm_gradients_without_normalize_invertible(pre_layer_norm, dtype):
    """normalize_invertible off keeps the LayerNorm inputs, and its weight/bias gradients are summed in float32:
    every gradient within 2x of a reference whose LayerNorms compute in float32 (as DeepSpeed's reference BERT
    does), against float64. PyTorch's CPU F.layer_norm sums them in 16 bits and misses this by 5x or more."""
    torch.manual_seed(0)
    layer = _perturbed(TempoTransformerLayer(_config(pre_layer_norm=pre_layer_norm, fp16=True,
                                                     **ALL_FLAGS[-1]))).double()
    assert not layer.normalize_invertible
    x, mask = torch.randn(4, 33, 32, dtype=torch.float64), _ds_mask(4, 33).double()
    ref = _grads(lambda t: _reference(layer, t, mask), layer, x)
    low = copy.deepcopy(layer).to(dtype)
    ours = _grads(lambda t: low(t, mask.to(dtype)), low, x.to(dtype))

    def fp32_norms(t):
        with unittest.mock.patch.object(F, "layer_norm", lambda y, s, w, b, eps: _f32_layer_norm(y, s, w, b, eps)):
            return _reference(low, t, mask.to(dtype))

    theirs = _grads(fp32_norms, low, x.to(dtype))
    for name in PARAMETER_ORDER:
        assert_within_2x_of_torch(ours[2][name], theirs[2][name], ref[2][name], atol=1e-4 * ref[2][name].abs().max(),
                                  what=f"{dtype} {name}")


_torch_layer_norm = F.layer_norm


def _f32_layer_norm(y, shape, w, b, eps):
    return _torch_layer_norm(y.float(), shape, w.float(), b.float(), eps).to(y.dtype)


# -- the maths -------------------------------------------------------------------------------------------
def _reference(layer, x, mask):
    """DeepSpeed's documented layer in plain PyTorch (module docstring of tempo_ds.deepspeed_layer)."""
    P = {n: getattr(layer, n) for n in PARAMETER_ORDER}
    B, S, h = x.shape
    a, d, eps = layer.heads, h // layer.heads, layer.layer_norm_eps

    def ln(t, w, b):
        return F.layer_norm(t, (h,), w, b, eps)

    u = ln(x, P["norm_w"], P["norm_b"]) if layer.pre_layer_norm else x
    q, k, v = (t.reshape(B, S, a, d).transpose(1, 2) for t in (u @ P["attn_qkvw"].T + P["attn_qkvb"]).split(h, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
    c = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, h)
    r = x + c @ P["attn_ow"].T + P["attn_ob"]
    f = ln(r, P["attn_nw"], P["attn_nb"])
    g = F.gelu(f @ P["inter_w"].T + P["inter_b"], approximate=layer.approximate) @ P["output_w"].T + P["output_b"]
    return r + g if layer.pre_layer_norm else ln(f + g, P["norm_w"], P["norm_b"])


def _grads(fn, layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
    return out.detach(), x.grad, {n: getattr(layer, n).grad.clone() for n in PARAMETER_ORDER}


@pytest.mark.parametrize("pre_layer_norm", [True, False])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_matches_deepspeeds_maths_in_float64(pre_layer_norm, approximate):
    torch.manual_seed(0)
    for flags in (ALL_FLAGS[0], ALL_FLAGS[-1]):
        layer = _perturbed(TempoTransformerLayer(_config(pre_layer_norm=pre_layer_norm, **flags),
                                                 approximate=approximate)).double()
        x, mask = torch.randn(2, 7, 32, dtype=torch.float64), _ds_mask(2, 7).double()
        ours = _grads(lambda t: layer(t, mask), layer, x)
        ref = _grads(lambda t: _reference(layer, t, mask), layer, x)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-12)
        for name in PARAMETER_ORDER:
            torch.testing.assert_close(ours[2][name], ref[2][name], rtol=1e-10, atol=1e-12, msg=_named(name))
        # float32 against the float64 reference; float16 and bfloat16 within 2x of the reference's own error
        layer32 = copy.deepcopy(layer).float()
        out32 = layer32(x.float(), mask.float())
        torch.testing.assert_close(out32.double(), ref[0], rtol=1e-5, atol=1e-5)
        for dtype in (torch.float16, torch.bfloat16):
            low = copy.deepcopy(layer).to(dtype)
            ours = _grads(lambda t: low(t, mask.to(dtype)), low, x.to(dtype))
            theirs = _grads(lambda t: _reference(low, t, mask.to(dtype)), low, x.to(dtype))
            for what, o, t, r in [("output", ours[0], theirs[0], ref[0]), ("input", ours[1], theirs[1], ref[1])] + \
                                 [(n, ours[2][n], theirs[2][n], ref[2][n]) for n in PARAMETER_ORDER]:
                assert_within_2x_of_torch(o, t, r, atol=1e-4 * r.abs().max().item(), what=f"{dtype} {what}")


@pytest.mark.parametrize("flags", [ALL_FLAGS[0], ALL_FLAGS[-1]], ids=["all_on", "all_off"])
def test_gradcheck_with_dropout(flags):
    """float64, dropout on: the seed is reset before every call, so every evaluation draws the same masks."""
    layer = _perturbed(TempoTransformerLayer(_config(hidden_size=8, intermediate_size=16, heads=2,
                                                     attn_dropout_ratio=0.3, hidden_dropout_ratio=0.3,
                                                     pre_layer_norm=False, **flags))).double()
    mask = _ds_mask(2, 3, padded=1).double()

    def fn(x):
        torch.manual_seed(7)
        return layer(x, mask)

    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=lambda f: "-".join(k[:4] + str(int(v)) for k, v in f.items()))
def test_post_ln_equals_hf_bert_layer(flags):
    """fp32, dropout off: outputs and every gradient match transformers' BertLayer, through both calling
    conventions (HF's with its 4-D eager mask, DeepSpeed's with an additive [B, 1, 1, S] mask)."""
    hf, cfg = _hf_bert_layer()
    ours = TempoBertLayer.from_bert_layer(hf, **flags)
    assert ours.approximate == "none" and not ours.pre_layer_norm
    x = torch.randn(3, 9, 32)
    padding = torch.ones(3, 9, dtype=torch.long)
    padding[0, -3:] = 0
    hf_mask = create_bidirectional_mask(config=cfg, inputs_embeds=x, attention_mask=padding)
    ds_mask = (1.0 - padding[:, None, None, :].float()) * -10000.0
    hf_params = dict(hf.named_parameters())

    def hf_grads():
        return {n: torch.cat([hf_params[s].grad for s in src]) for n, src in BERT_PARAMETERS.items()}

    hf.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_()
    ref_out = hf(x_ref, hf_mask)
    cot = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(5))
    ref_out.backward(cot)
    ref = hf_grads()
    for forward in (lambda t: ours(t, hf_mask), lambda t: TempoTransformerLayer.forward(ours, t, ds_mask)):
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
        x_ours = x.clone().requires_grad_()
        out = forward(x_ours)
        out.backward(cot)
        _close32(out, ref_out.detach(), "output")
        _close32(x_ours.grad, x_ref.grad, "input")
        for name in PARAMETER_ORDER:
            _close32(getattr(ours, name).grad, ref[name], name)


def _hf_or_ours_grads(layer, x, cot, autocast=False):
    """Output, input gradient and gradients by DeepSpeed's names (HF's q, k, v concatenated), as float64."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, None)
    out.backward(cot.to(out.dtype))
    params = dict(layer.named_parameters())
    grads = {n: torch.cat([params[s].grad for s in src]) if src[0] in params else params[n].grad
             for n, src in BERT_PARAMETERS.items()}
    return {"output": out, "input": x.grad, **{n: g.double() for n, g in grads.items()}}


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_bf16_and_autocast_within_2x_of_hf_bert_layer(precision):
    """bf16 weights and activations, or fp32 weights under CPU autocast: output and every gradient err at most
    twice as much as BertLayer's own in the same precision, against BertLayer in float64."""
    hf, _ = _hf_bert_layer()
    ours = TempoBertLayer.from_bert_layer(hf)
    x = torch.randn(3, 9, 32)
    cot = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(5))
    ref = _hf_or_ours_grads(copy.deepcopy(hf).double(), x.double(), cot.double())
    if precision == "bf16":
        got_hf = _hf_or_ours_grads(copy.deepcopy(hf).bfloat16(), x.bfloat16(), cot)
        got_ours = _hf_or_ours_grads(copy.deepcopy(ours).bfloat16(), x.bfloat16(), cot)
    else:
        got_hf = _hf_or_ours_grads(hf, x, cot, autocast=True)
        got_ours = _hf_or_ours_grads(ours, x, cot, autocast=True)
    for name in ref:
        assert_within_2x_of_torch(got_ours[name], got_hf[name], ref[name], atol=1e-6, what=name)


@pytest.mark.parametrize("attn_dropout_checkpoint", [True, False], ids=["lean", "tempo"])
@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_dropout_masks_are_the_same_under_checkpoint_recompute(mode, attn_dropout_checkpoint):
    torch.manual_seed(0)
    layer = _perturbed(TempoTransformerLayer(_config(attn_dropout_ratio=0.2, hidden_dropout_ratio=0.2,
                                                     normalize_invertible=True, gelu_checkpoint=True,
                                                     attn_dropout_checkpoint=attn_dropout_checkpoint)))
    x, mask = torch.randn(2, 6, 32, requires_grad=True), _ds_mask(2, 6)

    def run(m):
        layer.zero_grad(set_to_none=True)
        out, (dx,) = run_checkpointed(lambda t: layer(t, mask), [x], m)
        return out, dx, [getattr(layer, n).grad.clone() for n in PARAMETER_ORDER]

    want, got = run("none"), run(mode)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    layer.eval()
    assert not torch.allclose(want[0], layer(x, mask))        # dropout was on


# -- memory ----------------------------------------------------------------------------------------------
def _expected_bytes(pre_layer_norm, flags, B, S, h, a, i, e=2):
    """Bytes one standalone layer keeps in bf16 on CPU (module docstring), input x a leaf requiring grad."""
    T = B * S
    per_token = (6 * h + i) * e + 2 * 4 + 4 * a          # all switches on
    if not pre_layer_norm:
        per_token += h * e                                 # the QKV Linear keeps x itself
    if not flags["normalize_invertible"]:
        stats = 2 * 4                                      # the input-keeping LayerNorm's float32 mean and rstd
        # keeps both LayerNorm inputs instead; post-LN's own output is no longer kept (it is the layer's output)
        per_token += 2 * h * e + 2 * stats - 2 * 4 - (0 if pre_layer_norm else h * e)
    if not flags["gelu_checkpoint"]:
        per_token += i * e                                 # the GELU output, kept by the second Linear
    total = T * per_token
    if flags["normalize_invertible"]:                      # each in-place LayerNorm's side buffer
        k = side_columns(h, True)
        total += 2 * (T * k * e + 8 * k)
    if not flags["attn_dropout_checkpoint"]:
        total += B * a * S * S * e - T * 4 * a             # softmax output instead of the log-sum-exp
        total += math.ceil(B * a * S * S / 8)              # and the 1-bit attention dropout mask
    return total


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_each_switch_changes_saved_bytes_as_predicted(pre_layer_norm):
    B, S, h, a, i = 2, 8, 32, 4, 128
    x = torch.randn(B, S, h, dtype=torch.bfloat16, requires_grad=True)
    seen = {}
    for flags in ALL_FLAGS:
        torch.manual_seed(0)
        layer = TempoTransformerLayer(_config(hidden_size=h, heads=a, intermediate_size=i, attn_dropout_ratio=0.1,
                                              hidden_dropout_ratio=0.1, fp16=True, pre_layer_norm=pre_layer_norm,
                                              **flags)).bfloat16()
        with SavedTensorMeter() as meter:
            out = layer(x)
        del out
        seen[tuple(flags.values())] = meter.total_bytes
        assert meter.total_bytes == _expected_bytes(pre_layer_norm, flags, B, S, h, a, i), (flags, meter.table())
    on = seen[(True, True, True)]
    k = side_columns(h, True)
    assert on == B * S * ((6 * h + i) * 2 + 8 + 4 * a + (0 if pre_layer_norm else 2 * h)) + 2 * (B * S * k * 2 + 8 * k)
    assert all(on < seen[key] for key in seen if key != (True, True, True))   # every switch, on, saves bytes


# -- the BERT policy -------------------------------------------------------------------------------------
@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(policies, "POLICIES", policies.POLICIES + [bert_layer_policy()])


def _bert(dropout=0.0, impl="eager", **kw):
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=40, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout, **kw)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).train()


def _batch(b=3, s=24, padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if padded:
        mask[0, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model, batch, injected):
    """Loss and gradients keyed by DeepSpeed's parameter names (q, k, v gradients concatenated for HF layers)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()
    named = dict(model.named_parameters())
    grads = {n: p.grad for n, p in named.items() if ".encoder.layer." not in n}
    for layer in range(model.config.num_hidden_layers):
        base = f"bert.encoder.layer.{layer}."
        for name, sources in BERT_PARAMETERS.items():
            grads[base + name] = named[base + name].grad if injected else torch.cat([named[base + s].grad
                                                                                      for s in sources])
    return loss.detach(), grads


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_masked_lm_through_the_policy_matches_the_untouched_model(registered, impl):
    plain = _bert(impl=impl)
    lean = copy.deepcopy(plain)
    report = tempo_ds.inject(lean, policy="bert_layer")
    layers = [s for s in report.replaced if isinstance(s.new, TempoBertLayer)]
    assert [s.name for s in layers] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert report.attention == (impl, "tempo")            # for the encoder's mask: None or a [B, 1, 1, S] row
    assert "bert.encoder.layer.0.attn_qkvw" in lean.state_dict()
    batch = _batch()
    loss0, grads0 = _loss_and_grads(plain, batch, injected=False)
    loss1, grads1 = _loss_and_grads(lean, batch, injected=True)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        _close32(grads1[name], grads0[name], name)
    # HF's own activation checkpointing and hidden-state recording still see the layers
    enable = getattr(lean, "activation_checkpointing_enable", None) or lean.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in lean.bert.encoder.layer)
    loss2, grads2 = _loss_and_grads(lean, batch, injected=True)
    torch.testing.assert_close(loss2, loss0, rtol=1e-5, atol=1e-6)
    for name in grads0:
        _close32(grads2[name], grads0[name], name)
    with torch.no_grad():
        hidden = lean.eval()(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == 3


def test_policy_keeps_parameter_objects_except_qkv(registered):
    plain = _bert()
    old = plain.bert.encoder.layer[1]
    tempo_ds.inject(plain, policy="bert_layer")
    new = plain.bert.encoder.layer[1]
    for name, sources in BERT_PARAMETERS.items():
        if len(sources) == 1:
            assert getattr(new, name) is old.get_parameter(sources[0]), name
    assert all(getattr(new, n) is not old.get_parameter(s) for n in ("attn_qkvw", "attn_qkvb")
               for s in BERT_PARAMETERS[n])


def test_bert_masked_lm_bf16_within_2x_of_the_untouched_models_error(registered):
    base = _bert()
    batch = _batch()
    loss64, grads64 = _loss_and_grads(copy.deepcopy(base).double(), batch, injected=False)
    loss_hf, grads_hf = _loss_and_grads(copy.deepcopy(base).bfloat16(), batch, injected=False)
    lean = copy.deepcopy(base)
    tempo_ds.inject(lean, policy="bert_layer")
    loss_ours, grads_ours = _loss_and_grads(lean.bfloat16(), batch, injected=True)
    assert_within_2x_of_torch(loss_ours, loss_hf, loss64, atol=1e-6, what="loss")
    for name in grads64:
        assert_within_2x_of_torch(grads_ours[name], grads_hf[name], grads64[name], atol=1e-6, what=name)


def _layer_bytes(model, batch):
    torch.manual_seed(0)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    del out
    return meter.per_layer


def test_bert_per_layer_bytes_in_bf16(registered):
    """bf16, dropout on, all switches on: (6h + i) elements, 2 float32 rstd and a float32 log-sum-exps per token,
    = 20 sbh at i = 4h plus 8 + 4a bytes per token, plus each LayerNorm's side buffer (2k bytes per token and 8k
    per call, k = side_columns(h)) (the same figure as the 'bert' policy on HF's own modules);
    layer 0 also keeps its input (the embeddings' dropout output) and, with padding, the one boolean
    [B, 1, 1, S] padding row (1 byte per token, built by tempo_ds's mask builder) that every layer shares."""
    b, s, h, a, i = 3, 32, 64, 4, 256
    plain = _bert(dropout=0.1).to(torch.bfloat16)
    before = _layer_bytes(plain, _batch(b, s, padded=False))
    assert before == [2 * s * b * (10 * h + 2 * i + 3 * a * s + 4)] * 2      # HF eager (as in test_inject)
    tempo_ds.inject(plain, policy="bert_layer")
    k = side_columns(h, True)  # each LayerNorm's side buffer: bf16 xhat of k columns and their int64 indices
    expected = 2 * s * b * (6 * h + i) + 4 * s * b * 2 + 4 * b * a * s + 2 * (2 * s * b * k + 8 * k)
    assert expected == 128_384
    assert _layer_bytes(plain, _batch(b, s, padded=False)) == [expected + 2 * s * b * h, expected]
    assert _layer_bytes(plain, _batch(b, s, padded=True)) == [expected + 2 * s * b * h + b * s, expected]
    sbh = expected / (s * b * h)                                        # the design budget is 21
    assert sbh == pytest.approx(20 + (8 + 4 * a + 4 * k) / h + 16 * k / (s * b * h)) and sbh < 21


def test_policy_leaves_layers_it_cannot_compute_alone(registered):
    decoder = _bert(is_decoder=True)
    report = tempo_ds.inject(decoder, policy="bert_layer")
    assert not any(isinstance(s.new, TempoBertLayer) for s in report.replaced)
    assert {s.name for s in report.skipped} >= {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    assert "decoder layer" in next(s.reason for s in report.skipped if s.name == "bert.encoder.layer.0")
    assert report.attention is not None                    # the BertLayers left get tempo_ds attention instead
    relu = _bert(hidden_act="relu")
    report = tempo_ds.inject(relu, policy="bert_layer")
    assert "not a GELU" in next(s.reason for s in report.skipped if s.name == "bert.encoder.layer.0")
    fewbit = _bert()
    report = tempo_ds.inject(fewbit, policy="bert_layer", gelu="fewbit")
    assert "gelu=fewbit" in next(s.reason for s in report.skipped if s.name == "bert.encoder.layer.0")
    assert type(fewbit.bert.encoder.layer[0]) is BertLayer
    assert not bert_layer_policy().matches(_bert())        # opt-in only


def test_policy_maps_tempo_config_to_switches(registered):
    model = _bert()
    tempo_ds.inject(model, policy="bert_layer", norm="off", gelu="off", attention="tempo")
    layer = model.bert.encoder.layer[0]
    assert (layer.normalize_invertible, layer.gelu_checkpoint, layer.attn_dropout_checkpoint) == (False, False, False)
    tempo_ds.inject(model, policy="bert_layer")            # a new config reverts first, then swaps again
    layer = model.bert.encoder.layer[0]
    assert (layer.normalize_invertible, layer.gelu_checkpoint, layer.attn_dropout_checkpoint) == (True, True, True)


def test_write_back_and_pickling():
    hf, _ = _hf_bert_layer()
    ours = TempoBertLayer.from_bert_layer(hf)
    with torch.no_grad():
        ours.attn_qkvw.mul_(1.5)
        ours.attn_qkvb.add_(0.25)
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(hf(x, None), ours(x, None))
    ours.write_back(hf)
    torch.testing.assert_close(hf(x, None), ours(x, None), rtol=1e-5, atol=1e-6)
    ours(x, torch.ones(2, 5, dtype=torch.long))            # fills the mask cache (a weak reference)
    again = pickle.loads(pickle.dumps(ours))
    assert type(again) is TempoBertLayer and isinstance(again, BertLayer)
    torch.testing.assert_close(again(x, None), ours(x, None), rtol=0, atol=0)


def test_policy_works_without_deepspeed(monkeypatch):
    """DeepSpeed is optional (the GPU image has none): the layer then takes a namespace with the config fields."""
    monkeypatch.setitem(sys.modules, "deepspeed.ops.transformer", None)
    hf, _ = _hf_bert_layer()
    ours = TempoBertLayer.from_bert_layer(hf)
    assert type(ours.config) is types.SimpleNamespace and ours.config.hidden_size == 32
    x = torch.randn(2, 5, 32)
    _close32(ours(x, None), hf(x, None), "output")


def test_revert_writes_the_trained_qkv_back():
    import transformers

    import tempo_ds

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(cfg)
    report = tempo_ds.inject(model, policy="bert_layer")
    assert report.policy == "bert_layer"
    layer = model.encoder.layer[1]
    with torch.no_grad():
        layer.attn_qkvw.add_(1.0)                         # "training" moved the concatenated weight
    trained = layer.attn_qkvw.detach().clone()
    tempo_ds.revert(model)
    original = model.encoder.layer[1].attention.self
    h = cfg.hidden_size
    torch.testing.assert_close(original.key.weight, trained[h:2 * h], rtol=0, atol=0)


def test_a_deepspeed_kernel_model_becomes_memory_lean_with_its_own_parameters(deepspeed_layer_on_cpu):
    """A model built from DeepSpeed's CUDA-only DeepSpeedTransformerLayer (constructed here with its kernel
    loader stubbed) is injected like any other: every Parameter object and name is kept, and the result
    computes DeepSpeed's maths on the CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(*[deepspeed_layer_on_cpu(_config(pre_layer_norm=False)) for _ in range(2)])
    params = dict(model.named_parameters())
    report = tempo_ds.inject(model)
    assert report.policy == "deepspeed_kernel" and report.counts() and not report.attention
    assert all(type(m) is TempoTransformerLayer for m in model)
    assert all(p is params[n] for n, p in model.named_parameters())
    reference = nn.Sequential(*[TempoTransformerLayer(_config(pre_layer_norm=False)) for _ in range(2)])
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 32)
    mask = torch.zeros(2, 1, 1, 8)
    out = x
    ref = x
    for ours, theirs in zip(model, reference):
        out, ref = ours(out, mask), theirs(ref, mask)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    tempo_ds.revert(model)
    assert all(type(m) is deepspeed_layer_on_cpu for m in model)

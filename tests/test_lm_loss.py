"""lm_loss=chunked: the LM head + cross-entropy computed in tiles keeps no [tokens, V] tensor, and HF causal /
masked LMs give the untouched model's loss and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tempo_ds
from helpers import assert_checkpoint_matches, assert_within_2x_of_torch
from tempo_ds.lm_loss import LMLossHead, full_logits
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.ops import linear_cross_entropy
from tempo_ds.ops.linear_cross_entropy import MIN_COLS, TILE_BYTES, tile_shape

N, H, V = 13, 7, 19


def _op_inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, dtype=dtype)
    w = torch.randn(V, H, generator=gen, dtype=dtype)
    b = torch.randn(V, generator=gen, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[[1, 5, 6]] = -100
    return h, w, b, y


def reference(h, w, y, b=None, softcap=None, logit_scale=None, **kw):
    z = F.linear(h, w, b)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z.float() if z.dtype != torch.float64 else z, y, **kw)


@pytest.fixture
def small_sub_blocks(monkeypatch):
    """Sub-blocks of a few rows (CPU's are 2^18 float32 values, more than these tiles): the loop over them runs."""
    import sys

    monkeypatch.setitem(sys.modules["tempo_ds.ops.linear_cross_entropy"].SUB_ELEMENTS, "cpu", 16)


@pytest.mark.parametrize("kw", [  # small=True: sub-blocks of a few rows
    dict(softcap=3.0, logit_scale=0.7),
    dict(token_chunk=4, vocab_chunk=5, softcap=2.0, num_items_in_batch=torch.tensor(7), small=True),
    dict(token_chunk=3, vocab_chunk=8, logit_scale=1.3, reduction="none", ignore_index=4),
    dict(token_chunk=5, reduction="sum", small=True)])
def test_gradcheck_float64_and_equal_to_pytorch(kw, request):
    kw = dict(kw)
    if kw.pop("small", False):
        request.getfixturevalue("small_sub_blocks")
    h, w, b, y = (t.requires_grad_(t.is_floating_point()) for t in _op_inputs())
    if "ignore_index" in kw:
        y = torch.where(y == -100, kw["ignore_index"], y)
    ref_kw = {k: kw[k] for k in ("softcap", "logit_scale") if k in kw}
    out = linear_cross_entropy(h, w, y, b, **kw)
    items = kw.get("num_items_in_batch")
    ref = reference(h, w, y, b, **ref_kw, ignore_index=kw.get("ignore_index", -100),
                    reduction="sum" if items is not None else kw.get("reduction", "mean"))
    torch.testing.assert_close(out, ref / items if items is not None else ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, y, b, **kw), (h, w, b))


def test_opcheck_and_tiles():
    from tempo_ds.ops.linear_cross_entropy import _forward

    h, w, b, y = _op_inputs(torch.float32)
    torch.library.opcheck(_forward, (h.requires_grad_(), w.requires_grad_(), b, y, -100, 2.0, None, None, 4, 5))
    # the whole problem when it fits TILE_BYTES (16 MiB of the compute dtype), else equal vocabulary blocks of all
    # tokens, token chunks only below MIN_COLS columns; the bound on the tile is the docstring's transient bytes
    assert tile_shape(1024, 8192, itemsize=2) == (1024, 8192) and tile_shape(2048, 8192, itemsize=2) == (2048, 4096)
    assert tile_shape(512, 128256, itemsize=2) == (512, 16032) and tile_shape(512, 128256) == (512, 8016)
    assert tile_shape(65536, 128256, itemsize=2) == (2048, 4008)
    assert tile_shape(16, 512) == (16, 512) and tile_shape(16, 512, 3, 7) == (3, 7)
    for n, v, size in ((1, 262144, 4), (100000, 50, 2), (4097, 151936, 2), (3, 5, 8)):
        rows, cols = tile_shape(n, v, itemsize=size)
        assert rows * cols * size <= TILE_BYTES and (cols > MIN_COLS // 2 or cols == v)


def test_saves_hidden_labels_and_one_float32_lse_per_token():
    h, w, b, y = _op_inputs(torch.bfloat16)
    h = h.view(1, N, H).requires_grad_()
    w, b = nn.Parameter(w), nn.Parameter(b)
    with SavedTensorMeter() as meter:
        linear_cross_entropy(h, w, y.view(1, N), b, token_chunk=4, vocab_chunk=5)
    # hidden (a view: its storage), labels int64, lse float32, and the count of labels for the mean
    assert sorted(r.nbytes for r in meter.saved) == sorted([N * H * 2, N * 8, N * 4, 8])
    assert max(r.nbytes for r in meter.saved) < N * V  # no [tokens, V] tensor, not even a 1-byte one
    with torch.no_grad(), SavedTensorMeter() as meter:
        linear_cross_entropy(h, w, y.view(1, N), b)
    assert meter.total_bytes == 0


def test_bf16_and_autocast_within_2x_of_pytorch(small_sub_blocks):
    h, w, b, y = _op_inputs(torch.float32, seed=3)
    h, w = h * 2, w / 2

    def grads(fn, dtype, autocast=False, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (h, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(*leaves[:2], y, leaves[2], softcap=4.0, reduction="none", **kw)
        loss.sum().backward()  # per-token losses: a single scalar's error is one draw of rounding noise
        return [loss.detach()] + [t.grad for t in leaves]

    ref = grads(reference, torch.float64)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        # bf16: several token chunks (dW accumulated); autocast: one chunk, dW cast into the float32 weight's dtype
        ours = grads(linear_cross_entropy, dtype, autocast, token_chunk=None if autocast else 5, vocab_chunk=8)
        theirs = grads(reference, dtype, autocast)
        for name, o, t, r in zip(["loss", "h", "w", "b"], ours, theirs, ref):
            assert o.dtype == t.dtype, name
            assert_within_2x_of_torch(o, t, r, what=f"{dtype} autocast={autocast} {name}")


@pytest.mark.parametrize("mode", ["torch_reentrant", "torch_non_reentrant"])
def test_checkpoint(mode):
    h, w, b, y = _op_inputs(torch.float32)
    w = nn.Parameter(w)
    assert_checkpoint_matches(lambda x: linear_cross_entropy(x * 2, w, y, softcap=2.0, token_chunk=4),
                              [h.requires_grad_()], mode)


def test_zero3_partitioned_weight_is_gathered_in_backward(zero3_gather):
    h, w, b, y = _op_inputs(torch.float32)
    w, b, h = nn.Parameter(w), nn.Parameter(b), h.requires_grad_()
    loss = linear_cross_entropy(h, w, y, b)
    zero3_gather.partition(w, b)
    loss.backward()
    assert zero3_gather.gathered == [[w, b]] and w.grad is not None and b.grad is not None


def test_zero3_gather_also_under_saved_tensor_hooks(zero3_gather):
    """Under saved-tensor hooks (the meter, non-reentrant checkpointing) autograd unpacks a saved Parameter as a
    plain tensor without ds_status; the backward still gathers (and reads) the ZeRO-3 Parameter objects."""
    h, w, b, y = _op_inputs(torch.float32)
    w, b, h = nn.Parameter(w), nn.Parameter(b), h.requires_grad_()
    w.ds_id, b.ds_id = 0, 1  # what marks a ZeRO-3 Parameter
    with SavedTensorMeter():
        loss = linear_cross_entropy(h, w, y, b)
    zero3_gather.partition(w, b)
    loss.backward()
    assert len(zero3_gather.gathered) == 1 and [p is q for p, q in zip(zero3_gather.gathered[0], (w, b))] == [True] * 2


def test_an_empty_batch_gives_pytorchs_nan_loss_and_zero_gradients():
    h = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.t(), torch.zeros(0, dtype=torch.long)))
    loss.backward()
    assert h.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs_name_the_problem():
    h, w, b, y = _op_inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction='avg': allowed values: 'mean', 'sum', 'none'"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="labels .* must have hidden's leading shape"):
        linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="softcap=0.0"):
        linear_cross_entropy(h, w, y, softcap=0.0)
    with pytest.raises(ValueError, match="num_items_in_batch replaces the count"):
        linear_cross_entropy(h, w, y, reduction="sum", num_items_in_batch=3)
    with pytest.raises(TypeError, match="hidden is torch.float32 but weight is torch.float64"):
        linear_cross_entropy(h, w.double(), y)
    y = y.clone()
    y[0] = V  # out of range: NaN for that token, no host sync to raise
    per_token = linear_cross_entropy(h, w, y, reduction="none")
    assert per_token[0].isnan() and per_token[1:].isfinite().all()


# -- HF models -----------------------------------------------------------------------------------------------
def _tiny(name):
    import transformers as tf

    common = dict(vocab_size=96, max_position_embeddings=32)
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, use_cache=False, **common)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**llama)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, final_logit_softcapping=2.0,
                                                                attn_logit_softcapping=None, **llama)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=3.0, **llama)),
        "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.3, **llama)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                  output_router_logits=True, **llama)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96,
                                                         n_positions=32, use_cache=False)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=64, **common)),
    }
    torch.manual_seed(0)
    model = configs[name]()
    for p in model.parameters():  # untrained heads are near zero; make every gradient sizeable
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.train()


def _batch(name, causal=True):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=gen)
    labels = ids.clone() if causal else torch.full_like(ids, -100)
    if causal:
        labels[0, :4] = -100
    else:
        labels[:, ::3] = ids[:, ::3]
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "gemma2", "granite", "cohere", "mixtral", "gpt2", "bert"])
def test_fp32_loss_and_every_gradient_equal_the_untouched_model(name):
    model = _tiny(name)
    ref = copy.deepcopy(model)
    report = tempo_ds.inject(model, dropout="off")
    head = {"bert": "cls.predictions.decoder"}.get(name, "lm_head")
    assert [s.name for s in report.replaced if s.technique == "lm_loss=chunked"] == [head]
    assert tempo_ds.lm_loss.NOTE in report.notes
    for m in (model, ref):
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    batch = _batch(name, causal=name != "bert")
    kw = {"num_items_in_batch": torch.tensor(17)} if name == "llama" else {}
    out, grads = _loss_and_grads(model, batch, **kw)
    expected, ref_grads = _loss_and_grads(ref, batch, **kw)
    assert out.logits is None and expected.logits is not None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=0)
    if name == "mixtral":
        assert out.aux_loss is not None and torch.equal(out.aux_loss, expected.aux_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        scale = max(ref_grads[n].abs().max().item(), 1e-3)  # attention key biases get ~0 (softmax invariance)
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m: f"{name} {n}: {m}")


def test_bf16_within_2x_of_hf_error_against_float64():
    base = _tiny("gemma2")
    batch = _batch("gemma2")
    ref64 = _loss_and_grads(copy.deepcopy(base).double(), batch)
    hf = _loss_and_grads(copy.deepcopy(base).bfloat16(), batch)
    ours_model = copy.deepcopy(base).bfloat16()
    tempo_ds.inject(ours_model, dropout="off", norm="off", attention="off", mlp="off")
    ours = _loss_and_grads(ours_model, batch)
    assert_within_2x_of_torch(ours[0].loss, hf[0].loss, ref64[0].loss, what="loss")
    for n in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
        assert_within_2x_of_torch(ours[1][n], hf[1][n], ref64[1][n], what=n)


def test_bytes_outside_the_layers_llama_bf16():
    """Outside the layers the head + loss keep, beyond what the final norm keeps anyway (its output is the op's
    saved input, the same storage): the shifted labels (int64), a float32 log-sum-exp per token and the int64
    count of labels -- 12 bytes per token + 8. HF's loss keeps the float32 log-softmax (4V bytes per token),
    its int64 target and a float32 scalar."""
    model = _tiny("llama").bfloat16()
    tokens, vocab = 2 * 12, 96
    batch = _batch("llama")

    def outside(lm_loss):
        m = copy.deepcopy(model)
        tempo_ds.inject(m, lm_loss=lm_loss)
        with SavedTensorMeter(m) as meter:
            m(**batch)
        return [r for r in meter.saved if meter.layer_of(r.module) is None]

    chunked, off = outside("chunked"), outside("off")
    head = [r for r in chunked if r.module == "lm_head"]
    assert sorted((str(r.dtype), r.nbytes) for r in head) == [("torch.float32", 4 * tokens), ("torch.int64", 8),
                                                             ("torch.int64", 8 * tokens)]
    assert not [r for r in chunked if vocab in r.shape]
    def kept(records):
        return [(r.module, r.dtype, r.shape, r.nbytes) for r in records]

    assert kept(r for r in chunked if r.module != "lm_head") == kept(r for r in off if r.module.startswith("model."))
    lost = sum(r.nbytes for r in off) - sum(r.nbytes for r in chunked)
    assert lost == tokens * vocab * 4 + tokens * 8 + 4 - (12 * tokens + 8)


def test_logits_when_asked_eval_tuple_output_and_revert():
    model = _tiny("llama")
    ref = copy.deepcopy(model)
    weight = model.lm_head.weight
    tempo_ds.inject(model)
    batch = _batch("llama")
    with full_logits(model):
        out = model(**batch)
    expected = ref(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, expected.logits)
    loss, *_ = model(**batch, return_dict=False)  # tuple: (loss, ...) without logits
    torch.testing.assert_close(loss, expected.loss)
    positional = model(batch["input_ids"], None, None, None, None, batch["labels"])  # labels is 6th in Llama's
    assert positional.logits is None
    torch.testing.assert_close(positional.loss, expected.loss)
    model.eval()
    out = model(**batch)
    assert out.logits.shape == (2, 12, 96)
    import inspect

    assert "labels" in inspect.signature(model.forward).parameters  # Trainer reads the signature
    assert isinstance(model.lm_head, LMLossHead) and model.lm_head.weight is weight
    tempo_ds.revert(model)
    assert "forward" not in model.__dict__ and type(model.lm_head) is nn.Linear


def test_a_saved_or_copied_model_keeps_the_chunked_loss():
    """torch.save / torch.load and copy.deepcopy keep the instance-level forward (a bound closure was lost on
    load: the loaded model computed logits again)."""
    import io

    model = _tiny("llama")
    tempo_ds.inject(model)
    batch = _batch("llama")
    expected = model(**batch).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert other.forward.args == (other,)
        out = other(**batch)
        assert out.logits is None
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
        tempo_ds.revert(other)
        assert other(**batch).logits is not None


def test_unsupported_heads_are_skipped_with_the_reason():
    model = _tiny("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    report = tempo_ds.inject(model)
    (skip,) = [s for s in report.skipped if s.name == "lm_head"]
    assert "model.loss_function is <lambda>, not transformers' ForCausalLMLoss" in skip.reason
    assert type(model.lm_head) is nn.Linear and "forward" not in model.__dict__

    class MyLM(type(_tiny("llama"))):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = MyLM(_tiny("llama").config)
    report = tempo_ds.inject(model)
    (skip,) = [s for s in report.skipped if s.name == "lm_head"]
    assert skip.reason.startswith("lm_loss=chunked: MyLM.forward is not one tempo_ds has verified")
    report = tempo_ds.inject(_tiny("gpt2"), lm_loss="off")
    assert not [s for s in report.replaced if "lm_loss" in s.technique] + [s for s in report.skipped
                                                                           if "lm_loss" in s.reason]


def test_hooks_on_the_heads_output_run_in_backward_before_its_weight_gradient():
    """DeepSpeed ZeRO-3 fetches a module's parameters for backward from a hook on the module's output (which also
    waits for a prefetch in flight): the armed head's placeholder output lies on the loss's graph, so that hook
    runs, and before the op's backward produces the weight gradient."""
    model = _tiny("llama")
    tempo_ds.inject(model)
    order = []

    def on_output(module, args, output):
        assert output.requires_grad and output.shape == (2, 12, 0)
        output.register_hook(lambda g: order.append("head output"))

    model.lm_head.register_forward_hook(on_output)
    model.lm_head.weight.register_hook(lambda g: order.append("weight gradient"))
    model(**_batch("llama")).loss.backward()
    assert order == ["head output", "weight gradient"]


def test_no_host_reads_in_the_op_implementations_and_the_wrapper():
    """DESIGN.md rule 10: nothing reads a tensor value on the host. A dispatch mode does not see inside a custom
    op, so the implementations are run directly under it, then the wrapper with autograd."""
    from helpers import NoHostReads
    from tempo_ds.ops.linear_cross_entropy import _backward, _forward

    h, w, b, y = _op_inputs(torch.float32)
    args = (-100, 2.0, 0.5, torch.bfloat16, 4, 5)
    with NoHostReads():
        loss, lse = _forward._init_fn(h, w, b, y, *args)
        _backward._init_fn(torch.ones_like(loss), h, w, b, y, lse, *args, [True, True, True])
        h.requires_grad_()
        linear_cross_entropy(h, nn.Parameter(w), y, b, num_items_in_batch=torch.tensor(3)).backward()
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        bool(h.sum() > 0)

"""tempo_ds.megatron: tempo's layer specs in megatron-core models (CPU, gloo, tensor-parallel size 1).

Megatron's own ``DotProductAttention`` needs CUDA (its score buffer comes from
``get_global_memory_buffer()`` on ``torch.cuda.current_device()``), so the reference model is built from
the local spec's pieces (``WrappedTorchNorm``, ``MLP`` with ``F.gelu``, the same linears) with the core
attention replaced by ``ReferenceAttention`` below, a plain PyTorch copy of ``DotProductAttention``'s
maths. Dropout is 0 in the equality tests, so Megatron's CUDA RNG tracker is never needed.
"""
import math
import socket
import warnings

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from tempo_ds import megatron as tm  # noqa: E402
from tempo_ds.memory import SavedTensorMeter  # noqa: E402
from tempo_ds.ops.layer_norm import side_columns  # noqa: E402
from tempo_ds.nn import InplaceGELU, InplaceLayerNorm, InplaceRMSNorm  # noqa: E402

S, B, H, N, V, L = 16, 2, 64, 4, 128, 2  # seq, batch, hidden, heads, vocab, layers
FFN = 4 * H


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    """A single-process gloo group and Megatron's model-parallel state (TP = PP = 1)."""
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def make_config(**overrides):
    kw = dict(num_layers=L, hidden_size=H, num_attention_heads=N, use_cpu_initialization=True,
              hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
              masked_softmax_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
              persist_layer_norm=False, apply_rope_fusion=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


class ReferenceAttention(MegatronModule):
    """``DotProductAttention``'s maths in plain PyTorch (no CUDA buffer): scores scaled by
    1/sqrt(d), masked positions filled with -10000 (``attention_mask_func``), softmax, dropout, @ V."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if attention_mask is None and self.attn_mask_type == AttnMaskType.causal:
            attention_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu_(1)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, -10000.0)
        probs = torch.softmax(scores, dim=-1)
        if self.p > 0 and self.training:
            probs = F.dropout(probs, self.p)
        out = torch.matmul(probs, v).permute(2, 0, 1, 3).contiguous()
        return out.view(out.shape[0], out.shape[1], -1)


def reference_spec():
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = ReferenceAttention
    return spec


def build(spec, config=None, seed=0):
    torch.manual_seed(seed)
    return GPTModel(config=config or make_config(), transformer_layer_spec=spec, vocab_size=V,
                    max_sequence_length=S)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool).triu_(1)  # Megatron: True = masked out
    return ids, pos, mask, labels


def run(model, meter=False):
    ids, pos, mask, labels = batch()
    if meter:
        with SavedTensorMeter(model) as m:
            loss = model(ids, pos, mask, labels=labels).mean()
    else:
        m, loss = None, model(ids, pos, mask, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, m


def test_importing_tempo_ds_does_not_import_megatron():
    import subprocess
    import sys

    code = "import sys, tempo_ds, tempo_ds.megatron; assert 'megatron' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_modules():
    model = build(tm.tempo_layer_spec())
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, InplaceLayerNorm)
    assert isinstance(layer.pre_mlp_layernorm, InplaceLayerNorm)
    assert isinstance(layer.mlp.activation_func, InplaceGELU)
    assert isinstance(layer.self_attention.core_attention, tm.TempoDotProductAttention)
    assert layer.self_attention.core_attention.attn_mask_type == AttnMaskType.causal
    bert = tm.get_bert_layer_tempo_spec()
    assert bert.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.padding
    assert tm.gpt_layer_tempo_spec.submodules.input_layernorm is tm.TempoNorm


def test_norm_builder_sequence_parallel_and_rmsnorm():
    norm = tm.TempoNorm(make_config(), H, eps=1e-5)
    assert isinstance(norm, InplaceLayerNorm) and norm.eps == 1e-5
    assert norm.weight.sequence_parallel is False and norm.bias.sequence_parallel is False
    cfg = make_config(normalization="RMSNorm")
    object.__setattr__(cfg, "sequence_parallel", True)  # the builder only reads the flag
    rms = tm.TempoNorm(cfg, H, eps=1e-6)
    assert isinstance(rms, InplaceRMSNorm) and rms.weight.sequence_parallel is True
    x = torch.randn(S, B, H)
    torch.testing.assert_close(rms(x), torch.nn.RMSNorm(H, eps=1e-6)(x))


def test_bias_activation_fusion_is_refused():
    with pytest.raises(ValueError, match="bias_activation_fusion"):
        build(tm.tempo_layer_spec(), make_config(bias_activation_fusion=True))
    build(tm.tempo_layer_spec({"gelu": "off"}), make_config(bias_activation_fusion=True))  # MLP untouched


def test_gpt_forward_backward_matches_reference():
    tempo, ref = build(tm.tempo_layer_spec()), build(reference_spec())
    assert tempo.state_dict().keys() == ref.state_dict().keys()
    tempo.load_state_dict(ref.state_dict())
    loss_t, grads_t, _ = run(tempo)
    loss_r, grads_r, _ = run(ref)
    assert torch.isfinite(loss_t)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rmsnorm_and_padding_spec_match_reference():
    """BERT-kind spec (padding mask type) with RMSNorm, on a padding mask, against the reference."""
    cfg = make_config(normalization="RMSNorm")
    spec = reference_spec()
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    tempo, ref = build(tm.tempo_layer_spec(kind="bert"), cfg), build(spec, cfg)
    tempo.load_state_dict(ref.state_dict())
    ids, pos, _, labels = batch()
    mask = torch.zeros(B, 1, S, S, dtype=torch.bool)
    mask[1, :, :, 11:] = True  # the second sequence has 11 tokens
    out = [m(ids, pos, mask, labels=labels).mean() for m in (tempo, ref)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
    for o in out:
        o.backward()
    for (name, p), q in zip(tempo.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_module_layouts_gqa_and_dropout():
    cfg = make_config(num_query_groups=2, attention_dropout=0.25)
    attn = tm.TempoDotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = ReferenceAttention(cfg, 1, AttnMaskType.causal, "self", attention_dropout=0.0)
    d = H // N
    q = torch.randn(S, B, N, d)
    k, v = torch.randn(S, B, 2, d), torch.randn(S, B, 2, d)
    attn.eval()
    out = attn(q, k, v, None)
    assert out.shape == (S, B, H)
    expected = ref(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    attn.train()  # dropout in training only, regenerated from the CPU generator
    torch.manual_seed(3)
    a = attn(q, k, v, None)
    torch.manual_seed(3)
    b = attn(q, k, v, None)
    assert torch.equal(a, b) and not torch.allclose(a, out)
    with pytest.raises(ValueError, match="packed"):
        attn(q, k, v, None, packed_seq_params=object())


def test_meter_shows_per_layer_saving():
    """Per layer, fp32 (s=16, b=2, h=64, n=4, d=16, ffn=256), what the tempo layer does not keep:

    * each of the 2 LayerNorms: its input x [s, b, h] and mean [s, b] (it keeps its output, which the
      next Linear keeps anyway, and rstd), less its side buffer (fp32 xhat of k = 8 columns and their int64
      indices): 2 * (s*b*h + s*b) * 4 - 2 * (s*b*8*4 + 64) = 16,640 - 2,176 = 14,464
    * GELU: its input [s, b, ffn] (it keeps its output, which linear_fc2 keeps anyway, and 1 bit per
      element): s*b*ffn*4 - s*b*ffn/8 = 32,768 - 1,024 = 31,744
    * attention: the probabilities P [b, n, s, s] (kept for softmax backward and P @ V), against the
      output o [b, n, s, d] and the float32 log-sum-exp [b, n, s] kept by the lean op:
      b*n*s*s*4 - (b*n*s*d*4 + b*n*s*4) = 8,192 - 8,192 - 512 = -512. (At s = d the s x s tensor is no
      bigger than o; the saving grows as s*s - s*d.)
    = 45,696 per layer; in layer 0 the reference also keeps the model's bool causal mask (s*s = 256
    bytes, saved first by its masked_fill; tempo's op reduces it to is_causal and keeps no mask).
    """
    tempo, ref = build(tm.tempo_layer_spec()), build(reference_spec())
    tempo.load_state_dict(ref.state_dict())
    _, _, m_t = run(tempo, meter=True)
    _, _, m_r = run(ref, meter=True)
    assert len(m_t.per_layer) == L
    d = H // N
    k = side_columns(H, True)  # less each in-place LayerNorm's side buffer: xhat of k columns, their indices
    ln = 2 * (S * B * H + S * B) * 4 - 2 * (S * B * k * 4 + 8 * k)
    gelu = S * B * FFN * 4 - S * B * FFN // 8
    attn = B * N * S * S * 4 - (B * N * S * d * 4 + B * N * S * 4)
    per_layer = ln + gelu + attn
    assert per_layer == 45_696
    savings = [r - t for r, t in zip(m_r.per_layer, m_t.per_layer)]
    assert savings == [per_layer + S * S, per_layer], (
        m_r.table(m_r.layer_records(0)) + "\n" + m_t.table(m_t.layer_records(0)))
    assert all(t < r for t, r in zip(m_t.per_layer, m_r.per_layer))


def test_megatron_spec_flag_import():
    """Megatron-LM's ``--spec tempo_ds.megatron gpt_layer_tempo_spec`` goes through
    ``spec_utils.import_module``, which reads ``vars(module)[name]``: run it in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import megatron.core\n"
        "from megatron.core.transformer.spec_utils import ModuleSpec, import_module\n"
        "for name in ('gpt_layer_tempo_spec', 'bert_layer_tempo_spec'):\n"
        "    spec = import_module(('tempo_ds.megatron', name))\n"
        "    assert isinstance(spec, ModuleSpec), (name, spec)\n"
        "    assert spec.submodules.self_attention.submodules.core_attention.__name__ == "
        "'TempoDotProductAttention'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_selective_recompute_and_dropout_in_training(monkeypatch):
    """core_attn selective recompute wraps the tempo core attention; with attention dropout on, the
    recomputed forward draws the same mask (the seed comes from the CPU generator Megatron restores).

    Megatron's ``CheckpointFunction`` also saves and restores the CUDA generator's state, which a CPU-only
    torch cannot read: without CUDA that part is stubbed out here (the CPU state, which tempo's dropout
    uses, is still saved and restored by Megatron's own code)."""
    if not torch.cuda.is_available():
        from megatron.core.tensor_parallel import random as mrandom

        monkeypatch.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: None)
        monkeypatch.setattr(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
    recomputed = []
    results = []
    for recompute in (None, "selective"):
        cfg = make_config(attention_dropout=0.2, recompute_granularity=recompute,
                          **({"recompute_modules": ["core_attn"]} if recompute else {}))
        model = build(tm.tempo_layer_spec(), cfg)
        if recompute:
            core = model.decoder.layers[0].self_attention.core_attention
            core.register_forward_hook(lambda *a: recomputed.append(torch.is_grad_enabled()))
        torch.manual_seed(5)
        results.append(run(model))
    assert recomputed == [False, True]  # checkpointed forward (no grad), then the recompute in backward
    (loss_a, grads_a, _), (loss_b, grads_b, _) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("overrides", [{"gelu": "fewbit", "attention": "tempo", "norm": "off"},
                                       {"enabled": False}])
def test_config_variants_run(overrides):
    from tempo_ds.nn import FewBitGELU

    model = build(tm.tempo_layer_spec(overrides))
    layer = model.decoder.layers[0]
    if overrides.get("enabled", True):
        assert isinstance(layer.mlp.activation_func, FewBitGELU)
        assert layer.self_attention.core_attention.tempo_mode == "tempo"
        assert isinstance(layer.input_layernorm, torch.nn.LayerNorm)
        assert not isinstance(layer.input_layernorm, InplaceLayerNorm)
    else:
        assert type(layer.self_attention.core_attention).__name__ == "DotProductAttention"
        return  # Megatron's own core attention needs CUDA
    loss, grads, _ = run(model)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        tm.tempo_layer_spec(kind="t5")


def test_padding_masks_are_kept_once_and_nothing_is_read_on_the_host():
    """BERT-kind spec (padding type): Megatron's [b, 1, s, s] mask and a [b, 1, 1, s] row are used as they are
    (decided from attn_mask_type and shapes), inverted once for both layers: layer 0 keeps b*s*s (or b*s)
    bytes more than without a mask, layer 1 nothing more. Forward and backward read no tensor on the host."""
    from test_ops_syncfree import NoHostReads

    model = build(tm.tempo_layer_spec(kind="bert"))
    ids, pos, _, labels = batch()
    full = torch.zeros(B, 1, S, S, dtype=torch.bool)
    full[1, :, :, 11:] = True
    row = full[:, :, :1].clone()

    def per_layer(mask):
        with SavedTensorMeter(model) as m:
            model(ids, pos, mask, labels=labels).mean()
        return m.per_layer

    none = per_layer(None)
    assert [a - b for a, b in zip(per_layer(full), none)] == [B * S * S, 0]
    assert [a - b for a, b in zip(per_layer(row), none)] == [B * S, 0]
    loss = model(ids, pos, full, labels=labels).mean()
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with NoHostReads():
        model(ids, pos, full, labels=labels).mean().backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_causal_type_ignores_the_mask_and_the_cpu_rank_stream_leaves_the_generator_alone():
    """A causal type runs is_causal without a mask, whatever the mask holds (as Megatron's fused softmax); a
    padding_causal mask is used with is_causal. The tensor-parallel CPU dropout stream draws one base seed from
    the CPU generator, gives each rank its own stream and leaves the global state as one draw left it."""
    from megatron.core.transformer.enums import AttnMaskType as T

    mask = torch.rand(B, 1, S, S) > 0.5
    assert tm._mask_and_causal(mask, T.causal, S, S) == (None, True)
    assert tm._mask_and_causal(mask, T.causal, 1, S) == (None, False)
    assert tm._mask_and_causal(None, T.no_mask, S, S) == (None, False)
    for kind, causal in ((T.padding, False), (T.padding_causal, True), (T.arbitrary, False)):
        attend, is_causal = tm._mask_and_causal(mask, kind, S, S)
        assert is_causal is causal and torch.equal(attend, ~mask)
        assert tm._mask_and_causal(mask, kind, S, S)[0] is attend  # one inversion for every layer
    del mask, attend
    assert (tm._INVERTED._source, tm._INVERTED._version, tm._INVERTED._value) == (None, -1, None)  # released with it
    draws = []
    for rank in (0, 1):
        torch.manual_seed(3)
        with tm._cpu_rank_stream(rank):
            draws.append(torch.rand(4))
        after = torch.rand(1)
        torch.manual_seed(3)
        torch.randint(0, 2**31 - 1, (1,))
        assert torch.equal(after, torch.rand(1))
    assert not torch.equal(draws[0], draws[1])

"""The meter must report exactly the bytes autograd keeps, so every later memory claim can trust it."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tempo_ds.memory import SavedTensorMeter, find_layers

DTYPES = [torch.float32, torch.bfloat16]


def _nbytes(*shape, dtype=torch.float32):
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_saves_its_input_not_its_weight(dtype):
    lin = nn.Linear(24, 40).to(dtype)
    x = torch.randn(5, 7, 24, dtype=dtype)
    with SavedTensorMeter(lin) as meter:
        y = lin(x)
    assert meter.total_bytes == _nbytes(5, 7, 24, dtype=dtype)
    assert meter.by_module == {"<root>": meter.total_bytes}
    assert y.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_saves_input_and_row_statistics(dtype):
    ln = nn.LayerNorm(48).to(dtype)
    x = torch.randn(6, 9, 48, dtype=dtype, requires_grad=True)
    with SavedTensorMeter(ln) as meter:
        ln(x)
    # CPU keeps mean and rstd in the input dtype, one each per row.
    assert meter.total_bytes == _nbytes(6, 9, 48, dtype=dtype) + 2 * _nbytes(6, 9, dtype=dtype)
    assert set(meter.by_op) == {"NativeLayerNormBackward0"}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_saves_its_input(approximate):
    x = torch.randn(4, 33, requires_grad=True)
    with SavedTensorMeter() as meter:
        F.gelu(x, approximate=approximate)
    assert meter.total_bytes == _nbytes(4, 33)
    assert meter.by_module == {"<outside>": meter.total_bytes}


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_saves_a_mask_in_the_input_dtype_on_cpu(dtype):
    drop = nn.Dropout(0.3)
    x = torch.randn(8, 17, dtype=dtype, requires_grad=True)
    with SavedTensorMeter(drop) as meter:
        drop(x)
    assert meter.total_bytes == _nbytes(8, 17, dtype=dtype)
    drop.eval()
    with SavedTensorMeter(drop) as meter:
        drop(x)
    assert meter.total_bytes == 0


def test_attention_math_saves_q_k_v_and_the_probabilities():
    b, a, s, d = 2, 3, 11, 8
    q, k, v = (torch.randn(b, a, s, d, requires_grad=True) for _ in range(3))
    with SavedTensorMeter() as meter:
        p = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
        out = p @ v
    assert meter.total_bytes == 3 * _nbytes(b, a, s, d) + _nbytes(b, a, s, s)
    # the probabilities are saved by softmax and by the second matmul, and count once
    assert len([r for r in meter.saved if r.shape == (b, a, s, s)]) == 1
    out.sum().backward()


def test_a_tensor_saved_twice_or_through_views_counts_once():
    x = torch.randn(10, 16, requires_grad=True)
    w1, w2, w3 = (torch.randn(16, 16, requires_grad=True) for _ in range(3))
    with SavedTensorMeter() as meter:
        h = torch.tanh(x @ w1)          # tanh saves h
        y = h @ w2 + h @ w3             # both matmuls save h again
        z = h[:, :8] @ w2[:8] + h[:, 8:] @ w3[8:]   # views of h's storage
    # x for the first matmul, h once, and the weights w1, w2, w3 (plain tensors, not Parameters)
    assert meter.total_bytes == _nbytes(10, 16) + _nbytes(10, 16) + 3 * _nbytes(16, 16)
    (y.sum() + z.sum()).backward()


def test_parameters_and_their_autocast_copies_never_count():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 32)
    with SavedTensorMeter(model) as meter:
        model(x)
    assert meter.total_bytes == _nbytes(4, 32) + _nbytes(4, 64)  # relu output; fc2 saves it too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with SavedTensorMeter(model) as meter:
            model(x)
    # bf16 copies of the input and of the ReLU output; the bf16 weight copies are excluded
    assert meter.total_bytes == _nbytes(4, 32, dtype=torch.bfloat16) + _nbytes(4, 64, dtype=torch.bfloat16)
    assert all(r.shape in {(4, 32), (4, 64)} for r in meter.saved)


def _tensors_on(ptr):
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is torch.Tensor and o.untyped_storage().data_ptr() == ptr]


def test_meter_keeps_nothing_alive():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        h = x.exp()                     # exp saves its result
        out = h.sum()
    ptr = h.untyped_storage().data_ptr()
    del h
    assert _tensors_on(ptr)             # autograd still holds the result
    assert meter.live_bytes == _nbytes(1000)
    del out
    assert not _tensors_on(ptr)         # freed with the graph, as without the meter
    assert meter.live_bytes == 0
    assert meter.total_bytes == _nbytes(1000)  # the figure measured at the end of the forward


def test_backward_inside_the_block_reports_the_peak():
    x = torch.randn(64, requires_grad=True)
    with SavedTensorMeter() as meter:
        x.sin().exp().sum().backward()   # sin saves x, exp its result
    assert meter.live_bytes == 0
    assert meter.total_bytes == meter.peak_bytes == 2 * _nbytes(64)


@pytest.mark.parametrize("batch,seq", [(1, 8), (2, 8), (4, 8), (2, 16), (2, 32)])
def test_counts_scale_linearly_with_batch_and_sequence(batch, seq):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Dropout(0.1))
    with SavedTensorMeter(mlp) as meter:
        mlp(torch.randn(batch, seq, 16))
    per_token = 4 * (16 + 64 + 64 + 16 + 2 + 16)  # fc1 in, gelu in, fc2 in, ln in + stats, dropout mask
    assert meter.total_bytes == batch * seq * per_token


def test_checkpointed_block_saves_only_its_input():
    block = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(3, 16, requires_grad=True)
    for reentrant in (True, False):
        with SavedTensorMeter(block) as meter:
            y = checkpoint(block, x, use_reentrant=reentrant)
        assert meter.total_bytes == _nbytes(3, 16), reentrant
        y.sum().backward()


def test_find_layers_picks_the_transformer_stack():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)])

    assert find_layers(Net()) == ("blocks", 3)
    assert find_layers(nn.Linear(2, 2)) == ("", 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_bert_eager_layer_matches_the_analytic_count(dtype):
    """Derive the bytes of one HF BertLayer (eager attention, training mode, CPU) from the ops it runs.

    Per token, in elements of the activation dtype:
      attention  QKV input h, Q h, K h (copies made by matmul's reshape), softmax output a*s,
                 dropout mask a*s (CPU masks use the input dtype), dropped probabilities a*s, V h,
                 output projection input h, dropout mask h, LayerNorm input h, LayerNorm mean+rstd 2
      MLP        fc1 input h (= the LayerNorm output), GELU input i, fc2 input i, dropout mask h,
                 LayerNorm input h, LayerNorm mean+rstd 2
    = 10h + 2i + 3as + 4.  With i = 4h and 2-byte elements: 36 sbh + 6 a s^2 b + 8 s b.
    """
    transformers = pytest.importorskip("transformers")
    h, a, i, s, b = 64, 4, 256, 24, 3
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=h, num_hidden_layers=3, num_attention_heads=a,
                                  intermediate_size=i, max_position_embeddings=s)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).to(dtype).train()
    ids = torch.randint(5, 97, (b, s))
    with SavedTensorMeter(model) as meter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    elem = torch.empty((), dtype=dtype).element_size()
    expected = s * b * elem * (10 * h + 2 * i + 3 * a * s + 4)
    assert meter.per_layer == [expected] * 3
    ops = {r.op for r in meter.layer_records(1)}
    assert {"AddmmBackward0", "BmmBackward0", "SoftmaxBackward0", "GeluBackward0",
            "NativeLayerNormBackward0", "MulBackward0"} == ops
    out.loss.backward()


def test_layers_are_the_outermost_list_even_when_an_inner_list_is_longer():
    """StableLM keeps one LayerNorm per head in a ModuleList inside each layer: 4 heads > 2 layers."""
    import transformers

    config = transformers.StableLmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, qk_layernorm=True)
    model = transformers.StableLmForCausalLM(config)
    assert len(model.model.layers[0].self_attn.q_layernorm.norms) == 4
    assert find_layers(model) == ("model.layers", 2)

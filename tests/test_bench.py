"""``tempo-ds bench`` end to end on the tiny BERT preset: its three outputs, and its figures checked against
independent measurements."""
import json
import struct

import pytest
import torch

from tempo_ds import presets
from tempo_ds.cli import main
from tempo_ds.config import TempoConfig
from tempo_ds.inject import inject
from tempo_ds.memory import SavedTensorMeter

SEQ, BATCH, LAYERS, BUDGET_GB, STEPS = 32, 2, 2, 0.05, 4
ARGS = ["bench", "--arch", "bert", "--size", "tiny", "--seq", str(SEQ), "--batch", str(BATCH), "--layers",
        str(LAYERS), "--steps", str(STEPS), "--reps", "1", "--threads", "1", "--memory_budget_gb", str(BUDGET_GB)]
# On BERT every technique but SiLU's and the gated MLP's applies (BERT has neither).
EXPECTED = ["HF eager", "HF sdpa", "tempo_ds gelu=recompute", "tempo_ds gelu=inplace", "tempo_ds gelu=fewbit (2 bit)",
            "tempo_ds norm=inplace", "tempo_ds attention=lean", "tempo_ds attention=tempo", "tempo_ds dropout=seed",
            "tempo_ds (all)"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out / "bench.json", encoding="utf-8") as f:
        result = json.load(f)
    return out, result, {row["label"]: row for row in result["variants"]}


def test_json_holds_every_figure_settings_and_environment(bench):
    _, result, rows = bench
    assert list(rows) == EXPECTED
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    assert list(skipped) == ["silu=fewbit", "mlp=recompute", "liger"]  # no SiLU, no gated MLP; Liger needs CUDA
    assert "replaced nothing" in skipped["silu=fewbit"] and "replaced nothing" in skipped["mlp=recompute"]
    assert skipped["liger"].startswith("Liger-Kernel's Triton kernels need CUDA")
    s = result["settings"]
    assert (s["arch"], s["size"], s["seq"], s["dtype"], s["batch"], s["layers"], s["full_layers"], s["steps"]) == \
        ("bert", "tiny", SEQ, "bf16", BATCH, LAYERS, 2, STEPS)
    assert s["max_micro_batch_method"] == "derived" and s["memory_budget_bytes"] == int(BUDGET_GB * 2**30)
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1 and env["date"]
    assert result["command"].startswith("tempo-ds bench --arch bert --size tiny --seq 32")
    for row in rows.values():
        assert set(row) == {"name", "label", "kind", "attn", "tempo", "memory", "time", "max_micro_batch", "loss"}
        assert len(row["memory"]["per_layer_bytes"]) == LAYERS
        assert len(row["time"]["times_s"]) == 1 and row["time"]["best_s"] > 0
        assert len(row["loss"]["losses"]) == STEPS
        assert row["loss"]["final"] == row["loss"]["losses"][-1]  # 4 steps: the last quarter is one step
    assert rows["HF eager"]["kind"] == "baseline" and rows["tempo_ds (all)"]["kind"] == "tempo_ds"


def test_baseline_ratios_are_one_and_tempo_keeps_less(bench):
    _, _, rows = bench
    base, tempo = rows["HF eager"], rows["tempo_ds (all)"]
    assert base["time"]["ratio"] == 1.0 and base["memory"]["vs_baseline"] == 1.0
    assert base["loss"]["delta_rel"] == 0.0
    assert tempo["memory"]["sbh_per_layer"] < base["memory"]["sbh_per_layer"]
    assert tempo["max_micro_batch"]["batch"] > base["max_micro_batch"]["batch"] > 0
    assert tempo["memory"]["vs_baseline"] == tempo["memory"]["bytes_per_layer"] / base["memory"]["bytes_per_layer"]
    # norm=inplace is exact and leaves torch's dropout draws alone: it trains like the baseline, up to rounding.
    assert abs(rows["tempo_ds norm=inplace"]["loss"]["delta_rel"]) < 0.002


@pytest.mark.parametrize("label, tempo", [("HF eager", None), ("tempo_ds (all)", {})])
def test_derived_micro_batch_matches_an_independent_meter_run(bench, label, tempo):
    from tempo_ds.data import load_tokenizer, sample_batch

    _, result, rows = bench
    tok = load_tokenizer()
    model = presets.build_model("bert", "tiny", dtype="bf16", vocab_size=len(tok), max_seq=SEQ, layers=LAYERS)
    if tempo is not None:
        inject(model, tempo)
    model.train()
    with SavedTensorMeter(model) as meter:
        out = model(**sample_batch("bert", tok, SEQ, BATCH, seed=0))
    del out
    per_layer = meter.per_layer[LAYERS // 2]
    outside = meter.total_bytes - sum(meter.per_layer)
    full = presets.build_model("bert", "tiny", vocab_size=len(tok), max_seq=SEQ)
    params = sum(p.numel() for p in full.parameters())
    full_layers = full.config.num_hidden_layers
    budget = int(BUDGET_GB * 2**30)
    expected = (budget - 16 * params) * BATCH // (outside + full_layers * per_layer)
    got = rows[label]["max_micro_batch"]
    assert rows[label]["memory"]["bytes_per_layer"] == per_layer
    assert got == {"batch": expected, "method": "derived", "budget_bytes": budget, "model_state_bytes": 16 * params,
                   "params": params, "layers": full_layers,
                   "bytes_per_sample": (outside + full_layers * per_layer) / BATCH,
                   "vs_baseline": got["batch"] / rows["HF eager"]["max_micro_batch"]["batch"]}
    assert result["settings"]["params"] == params


def test_markdown_has_one_row_per_variant(bench, capsys):
    out, _, rows = bench
    text = (out / "bench.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == (f"| variant | sbh/layer | vs baseline | outside sbh | step time ratio | max micro-batch "
                        f"(derived) | loss after {STEPS} | Δloss |")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == EXPECTED
    eager = table[1].split(" | ")
    assert eager[1] == f"{rows['HF eager']['memory']['sbh_per_layer']:.2f}" and eager[4] == "1.00"
    memory = rows["HF eager"]["memory"]
    assert eager[3] == f"{memory['outside_layers_sbh']:.1f}" and memory["outside_layers_bytes"] == \
        memory["total_bytes"] - sum(memory["per_layer_bytes"])
    assert eager[5] == f"{rows['HF eager']['max_micro_batch']['batch']:,}"
    assert "DERIVED from the meter" in text and f"{LAYERS} of the preset's 2 layers" in text
    assert "Not applicable: tempo_ds silu=fewbit (2 bit)" in text


def test_png_is_a_real_two_panel_plot(bench):
    out, _, _ = bench
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "bench.png")
    assert pixels.shape[:2] == (height, width) and width > height > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_variants_and_their_gpu_trial_spec():
    """Each technique runs alone (the others off); the GPU search runs the full-depth preset."""
    from tempo_ds.bench.measure import gpu_spec
    from tempo_ds.bench.variants import VARIANTS

    for v in VARIANTS.values():
        spec = gpu_spec(v, arch="gpt2", size="large", seq=512, dtype="bf16")
        assert spec == {"arch": "gpt2", "size": "large", "seq": 512, "dtype": "bf16", "attn": v.attn, "layers": None,
                        "tempo": v.tempo}
    assert VARIANTS["sdpa"].attn == "sdpa" and VARIANTS["sdpa"].tempo is None
    assert VARIANTS["all"].tempo == TempoConfig().model_dump()
    assert VARIANTS["attention=lean"].tempo == TempoConfig(gelu="off", mlp="off", norm="off", dropout="off",
                                                           lm_loss="off", attention="lean").model_dump()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])  # masked, tied causal, untied causal
def test_training_loss_takes_the_chunked_lm_loss_of_an_injected_model(arch):
    """The bench trains on the model's own loss, so a tempo_ds variant's loss is the chunked op's (no logits),
    equal to the untouched model's."""
    import copy

    from tempo_ds.bench.training import lm_loss
    from tempo_ds.data import load_tokenizer, sample_batch

    tok = load_tokenizer()
    plain = presets.build_model(arch, "tiny", vocab_size=len(tok), max_seq=SEQ).train()
    model = copy.deepcopy(plain)
    inject(model, TempoConfig.build({"dropout": "off", "attention": "off"}))
    batch = sample_batch(arch, tok, SEQ, BATCH, seed=0)
    assert model(**batch).logits is None

    def loss(m):
        torch.manual_seed(0)  # the same dropout masks for both
        return lm_loss(m, batch).item()

    assert loss(model) == pytest.approx(loss(plain), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--arch", "t5"], "arch='t5' is not supported; allowed values: bert, roberta, gpt2, llama, qwen3, gemma, mixtral"),
    (["--size", "huge"], "size='huge' is not supported; allowed values: tiny, small, base, medium, large"),
    (["--size", "medium"], "size='medium' is not defined for bert; allowed values: tiny, base, large"),
    (["--dtype", "int8"], "dtype='int8' is not supported; allowed values: fp32, bf16, fp16"),
    (["--variants", "eager,flash"], "unknown variant(s) 'flash'; allowed: eager, sdpa, gelu=recompute"),
    (["--size", "large", "--memory_budget_gb", "4"], "memory budget 4.0 GiB is too small for the model states "
     "of bert-large"),
    (["--seq", "1"], "seq=1 must be >= 2"),
    (["--seq", "100000000"], "seq=100000000 is too long: the embedded corpus has"),
    (["--layers", "3"], "layers=3 is deeper than the bert-tiny preset (2 layers)"),
    (["--steps", "0"], "steps=0 must be >= 1"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message, tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tempo-ds bench: error: ") and message in err
    assert not any(tmp_path.iterdir())


def test_a_failed_gpu_search_is_reported_not_raised():
    """The CUDA path's search runs each trial in a subprocess; one that fails (here: a size the preset lacks, which
    only the trial process finds out) leaves a "failed" cell and the error instead of ending the bench. Run on the CPU device."""
    from tempo_ds.bench.measure import measured_micro_batch
    from tempo_ds.bench.report import _batch

    spec = {"arch": "bert", "size": "medium", "seq": 16, "dtype": "fp32", "attn": "eager", "layers": 1,
            "tempo": None}
    result = measured_micro_batch(spec, 2**30, torch.device("cpu"))
    assert result["batch"] is None and result["method"] == "measured" and result["error"]
    assert _batch(result) == "failed (see bench.json)"
    assert _batch({"batch": 12, "complete": False}) == ">= 12" and _batch({"batch": 1234}) == "1,234"


def test_training_uses_the_variants_attention_implementation(monkeypatch):
    """HF sdpa's loss column is trained with sdpa attention (one SDPA call per layer and step), eager's with
    none; the model passed in keeps eager. (On the CPU the two draw identical dropout masks: same losses.)"""
    import torch.nn.functional as F

    from tempo_ds.bench.training import train
    from tempo_ds.data import load_tokenizer, sample_batch

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    tok = load_tokenizer()
    batches = [sample_batch("bert", tok, SEQ, BATCH, seed=s) for s in range(2)]
    model = presets.build_model("bert", "tiny", vocab_size=len(tok), max_seq=SEQ)
    eager = train(model, batches, 2, lr=1e-3)
    assert calls == []
    with_sdpa = train(model, batches, 2, attn="sdpa", lr=1e-3)
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert model.config._attn_implementation == "eager"
    assert with_sdpa == pytest.approx(eager, rel=1e-3)


def test_the_liger_variant_patches_an_instance_and_takes_it_off_again():
    """Liger's instance patch (its kernels cannot run on the CPU, its patching can) is undone completely."""
    pytest.importorskip("liger_kernel")
    from tempo_ds.bench.variants import VARIANTS, applied, liger_reason

    model = presets.build_model("llama", "tiny", vocab_size=64, max_seq=16)
    import transformers.models.llama.modeling_llama as modeling_llama

    family_before, forward_before = dict(vars(modeling_llama)), modeling_llama.LlamaForCausalLM.forward
    before = {name: (type(m), dict(m.__dict__)) for name, m in model.named_modules()}
    assert liger_reason(model, torch.device("cpu")).startswith("Liger-Kernel's Triton kernels need CUDA")
    with applied(model, VARIANTS["liger"]):
        norm = model.model.norm
        assert type(norm.__dict__.get("forward")).__name__ == "method" and "casting_mode" in norm.__dict__
        assert model.config._attn_implementation == "sdpa"
    after = {name: (type(m), dict(m.__dict__)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name, (cls, attrs) in before.items():
        assert after[name][0] is cls and after[name][1].keys() == attrs.keys(), name
    # nothing leaks into models built later: Liger also rebinds names in transformers' modeling module
    import transformers.models.llama.modeling_llama as modeling_llama

    assert vars(modeling_llama) == family_before and modeling_llama.LlamaForCausalLM.forward is forward_before
    fresh = presets.build_model("llama", "tiny", vocab_size=64, max_seq=16)
    assert type(fresh.model.norm) is modeling_llama.LlamaRMSNorm

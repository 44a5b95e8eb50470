"""DeepSpeed integration: tempo_ds.initialize, add_config_arguments, the "tempo" config section, activation
checkpointing, mixed precision, HF Trainer and DeepSpeed checkpoints.

Engine tests launch real 2-rank DeepSpeed jobs (`deepspeed --num_gpus 2`, gloo on the CPU accelerator) of the
scripts in tests/scripts/ds_*.py; each launch runs many cases and each rank writes its findings as JSON. The
rest runs in this process (parsers, config resolution, initialize with DeepSpeed's initialize stubbed, DeepSpeed's
overflow machinery on gradients produced through tempo_ds ops).

Tolerances, from measurement (3 steps, tiny BERT/Llama, 2 ranks, every case of the matrix): fp32 with AdamW:
losses rtol 1e-5 (measured: equal within 1.0e-7), parameters |diff| <= 1e-5 |p| + 1e-5 (measured max |diff|
6.6e-6). bf16 with SGD + momentum (ds_common.ds_config says why not Adam): losses rtol 1e-3 (measured 6.0e-5),
parameters |diff| <= 2**-7 |p| + 5e-4: one bf16 rounding step of the parameter plus an absolute 5e-4 (measured
max |diff| 4.9e-4; largest excess over 2**-7 |p|: 1.3e-4).
"""
import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import tempo_ds
from tempo_ds import deepspeed_integration as dsi
from tempo_ds.config import TempoConfigError
from tempo_ds.nn import InplaceLayerNorm

deepspeed = pytest.importorskip("deepspeed")

SCRIPTS = Path(__file__).parent / "scripts"
FP16_REFUSED = "Type fp16 is not supported on your device."
BF16_PARAM_ATOL = 5e-4


# -- launching ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args, out: Path, timeout: int = 300):
    """Run ``deepspeed --num_gpus 2 script args`` (one thread per rank); return the process and each rank's JSON."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(SCRIPTS / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    run.seconds = time.monotonic() - start
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    return run, ranks


def _ok(run, ranks):
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert [r["rank"] for r in ranks] == [0, 1]
    return ranks


def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# -- ZeRO 0-3 x checkpointing x dtype ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return _ok(*launch("ds_matrix.py", ".", 0, 1, 2, 3, out=tmp_path_factory.mktemp("matrix")))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tempo_engine_trains_like_the_plain_engine(matrix, stage):
    """Per-step losses and final parameters of tempo_ds.initialize's engine equal deepspeed.initialize's on the
    same model, for every activation checkpointing flavour, in fp32 and bf16, BERT and Llama, dropout off."""
    for found in matrix:
        cases = [c for c in found["cases"] if c["stage"] == stage]
        skipped = [s for s in found["skipped"] if s[0] == stage]
        assert skipped == ([[3, "deepspeed_non_reentrant", d, "llama"] for d in ("fp32", "bf16")] if stage == 3 else [])
        assert len(cases) + len(skipped) == 5 * 2 * 2
        for c in cases:
            what = f"rank {found['rank']} stage {stage} {c['checkpointing']} {c['dtype']} {c['arch']}"
            assert sum(c["replaced"].values()) >= (5 if c["arch"] == "llama" else 15) and c["plain_replaced"] == {}
            steps = found["steps"] * (1 if c["checkpointing"] == "none" else 2)  # recompute: a second forward
            assert c["calls"] == [steps, steps], what
            if c["checkpointing"].startswith("deepspeed"):  # the section was applied by tempo_ds.initialize
                offload = c["arch"] == "llama"
                assert c["ds_checkpointing"] == [offload, offload, True], what
            if c["dtype"] == "fp32":
                assert rel(c["tempo"], c["plain"]) <= 1e-5, what
                assert c["param_diff"]["excess_fp32"] <= 0, what
            else:
                assert rel(c["tempo"], c["plain"]) <= 1e-3, what
                assert c["param_diff"]["excess_bf16"] <= BF16_PARAM_ATOL, what


# -- a training script with tempo_ds + deepspeed arguments: checkpoints, resume, fp16 ------------------------------
def _ds_file(path: Path, stage: int) -> str:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    body = json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
                       "zero_optimization": zero, "tempo": {"gelu": "recompute", "dropout": "seed"}}, indent=1)
    path.write_text("// HJSON, as DeepSpeed reads config files\n" + body)
    return str(path)


@pytest.fixture(scope="module")
def train_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_cli")
    args = ["--deepspeed", "--deepspeed_config", _ds_file(out / "ds2.json", 2), "--tempo_gelu", "inplace",
            "--out", out, "--stage3_config", _ds_file(out / "ds3.json", 3)]
    return _ok(*launch("ds_train_cli.py", *args, out=out))


def test_command_line_overrides_the_config_section(train_cli):
    for found in train_cli:
        for stage in (2, 3):
            assert found[f"resume{stage}"]["techniques"] == {"gelu": "inplace", "silu": "off", "mlp": "recompute",
                                                            "norm": "inplace", "attention": "lean", "dropout": "seed",
                                                            "lm_loss": "chunked"}


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_exactly_like_the_uninterrupted_run(train_cli, stage):
    """Dropout on: tempo_ds.deepspeed_integration.save/load_checkpoint keep each rank's RNG states, so the seeded
    dropout masks after the resume are those of the uninterrupted run; DeepSpeed's checkpoint alone does not."""
    for found in train_cli:
        r = found[f"resume{stage}"]
        assert r["first"] == r["full"][:2]
        assert r["tempo_ds"]["losses"] == r["full"][2:]
        assert r["tempo_ds"]["param_diff"]["abs"] == 0.0 and r["tempo_ds"]["global_steps"] == 4
        assert r["deepspeed_only"]["losses"] != r["full"][2:]  # DeepSpeed 0.19.8 saves no RNG state
    assert train_cli[0]["ranks_rng_files"] == ["tempo_ds_rng_state_rank0.pt", "tempo_ds_rng_state_rank1.pt"]


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoints_cross_load_between_tempo_and_plain(train_cli, stage):
    """A tempo_ds checkpoint continues in a plain engine and a plain one in a tempo_ds engine (dropout off), as the
    saving run continues itself."""
    for found in train_cli:
        for direction, injected in (("tempo->plain", False), ("plain->tempo", True)):
            r = found[f"cross{stage}"][direction]
            assert r["injected"] is injected
            assert rel(r["other"], r["itself"]) <= 1e-5, direction
            assert r["param_diff"]["excess_fp32"] <= 0, direction


def test_fp16_engine_skips_the_overflowing_step(train_cli):
    """Dynamic loss scaling with an inf entering tempo_ds's LayerNorm on rank 0: the step is skipped on both ranks,
    the scale halves and no parameter moves, as for the plain model. DeepSpeed's CPU accelerator refuses fp16."""
    for found in train_cli:
        fp16 = found["fp16"]
        if "refused" in fp16:
            assert fp16["refused"] == FP16_REFUSED
            pytest.skip(FP16_REFUSED)
        for variant in ("plain", "tempo"):
            assert fp16[variant]["skipped"] == 1 and fp16[variant]["param_diff"] == 0.0
            assert fp16[variant]["scale"] == [2.0 ** 8, 2.0 ** 7]
        assert fp16["tempo"]["injected"] and not fp16["plain"]["injected"]


# -- fp16 overflow machinery on CPU, in this process ------------------------------------------------------------
def _fp16_model(tempo: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    if tempo:
        tempo_ds.inject(model)
    return model.half()


def _scaled_backward(model, scale: float, poison: bool):
    ids = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    handle = None
    if poison:  # an inf produced before the first (tempo_ds) LayerNorm
        def hook(module, inputs, output):
            output = output.clone()
            output[0, 3, 5] = float("inf")
            return output
        handle = model.bert.embeddings.word_embeddings.register_forward_hook(hook)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    (loss.float() * scale).backward()
    if handle:
        handle.remove()
    return loss


@pytest.mark.parametrize("case", ["finite", "inf_before_tempo_op", "overflow_in_backward"])
def test_fp16_overflow_is_flagged_and_scale_backs_off_as_for_plain(case, monkeypatch):
    """DeepSpeed's CheckOverflow and DynamicLossScaler (the machinery of its fp16 optimizers) on fp16 gradients
    computed through tempo_ds ops decide exactly as on the plain model's: an inf before a tempo op, or an fp16
    overflow in backward (loss scale 2**24 makes the gradients flowing back through the tempo ops exceed fp16),
    reaches the parameter gradients, is flagged, and the scale halves; finite gradients keep the scale."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.utils import CheckOverflow

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it logs the overflow on rank 0; no group here
    scale = 2.0 ** 24 if case == "overflow_in_backward" else 2.0 ** 4
    decisions = {}
    for tempo in (False, True):
        model = _fp16_model(tempo)
        loss = _scaled_backward(model, scale, poison=case == "inf_before_tempo_op")
        params = [p for p in model.parameters() if p.grad is not None]
        overflow = CheckOverflow(mpu=None).has_overflow(params)
        scaler = loss_scaler.DynamicLossScaler(init_scale=scale, scale_window=1000, min_scale=1, delayed_shift=1,
                                   consecutive_hysteresis=False)
        scaler.update_scale(overflow)
        nonfinite = sum(int(not torch.isfinite(p.grad).all()) for p in params)
        decisions[tempo] = (overflow, scaler.cur_scale, nonfinite > 0, torch.isfinite(loss).item())
    assert tempo_ds.is_injected(model)
    expected_overflow = case != "finite"
    assert decisions[True] == decisions[False]
    assert decisions[True] == (expected_overflow, scale / 2 if expected_overflow else scale, expected_overflow,
                               case != "inf_before_tempo_op")


def test_fp16_overflow_inside_a_tempo_op_backward():
    """The overflow is produced inside tempo_ds's LayerNorm backward: its input rows have a variance ~1e-7
    (rstd ~ 3e3), so finite incoming gradients come out of it as fp16 inf; they reach the Linear below and
    CheckOverflow flags it, as with nn.LayerNorm."""
    from deepspeed.runtime.utils import CheckOverflow

    torch.manual_seed(0)
    flags = []
    for make in (lambda ln: ln, InplaceLayerNorm.from_module):
        linear = nn.Linear(16, 64).half()
        with torch.no_grad():
            linear.weight.mul_(1e-3)
            linear.bias.fill_(0.5)
        norm = make(nn.LayerNorm(64, eps=1e-12).half())
        hidden = linear(torch.randn(8, 16).half())
        hidden.retain_grad()
        out = norm(hidden)
        grad_out = torch.randn_like(out) * 32
        assert torch.isfinite(out).all() and torch.isfinite(grad_out).all()
        out.backward(grad_out)
        overflow = CheckOverflow(mpu=None).has_overflow(list(linear.parameters()))
        flags.append((bool(torch.isinf(hidden.grad).any()), overflow))
    assert flags == [(True, True), (True, True)]


# -- bad sections -----------------------------------------------------------------------------------------------
def test_bad_sections_fail_on_every_rank_before_anything_is_built(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                               "tempo": {"fewbit": {"bits": 5}}}))
    run, ranks = launch("ds_bad_config.py", "--out", tmp_path, "--deepspeed_config", bad, out=tmp_path, timeout=180)
    assert run.returncode != 0 and run.seconds < 120  # every rank raised; nobody waited for the other
    text = run.stdout + run.stderr
    assert text.count("fewbit.bits: Input should be 1, 2, 3 or 4 (got 5)") >= 2, text[-3000:]
    assert f"DeepSpeed config {bad}" in text
    assert [r["rank"] for r in ranks] == [0, 1]
    for found in ranks:
        r = found["found"]
        assert "gelu_bits: unknown key; allowed keys: attention, attention_block_size" in r["unknown key"]["raised"]
        assert "norm: Input should be 'inplace' or 'off' (got 3)" in r["wrong type"]["raised"]
        assert "fewbit.bits: Input should be 1, 2, 3 or 4 (got 5)" in r["bits = 5"]["raised"]
        for what in r.values():
            assert what["injected"] is False and what["distributed"] is False


# -- HF Trainer -------------------------------------------------------------------------------------------------
def test_hf_trainer_with_deepspeed_config_and_inject(tmp_path):
    """TrainingArguments(deepspeed=ds_config, use_cpu=True) with ZeRO-2 and tempo_ds.inject(model, ds_config)
    before the Trainer: the same loss history as without tempo_ds (fp32: rtol 1e-5; bf16: the logged bf16 loss
    within one bf16 rounding step, 2**-7 relative)."""
    pytest.importorskip("accelerate")
    found = _ok(*launch("ds_trainer.py", tmp_path, out=tmp_path))
    for r in found:
        for dtype, tol in (("fp32", 1e-5), ("bf16", 2 ** -7)):
            plain, ours = r[dtype]["plain"], r[dtype]["tempo"]
            assert r[dtype]["injected"] and len(ours) == len(plain) == 6
            assert rel(ours, plain) <= tol, (dtype, ours, plain)
            assert ours[-1] < ours[0]


# -- command line -----------------------------------------------------------------------------------------------
def _parser(*own: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for flag in own:
        parser.add_argument(flag, action="store_true")
    return parser


@pytest.mark.parametrize("order", ["tempo_first", "deepspeed_first"])
def test_add_config_arguments_composes_with_deepspeeds(order):
    parser = _parser()
    first, second = (tempo_ds.add_config_arguments, deepspeed.add_config_arguments)
    if order == "deepspeed_first":
        first, second = second, first
    args = second(first(parser)).parse_args(["--deepspeed", "--deepspeed_config", "ds.json", "--tempo",
                                             "--tempo_gelu", "fewbit", "--tempo_fewbit_bits", "3",
                                             "--tempo_norm", "off", "--tempo_attention", "tempo",
                                             "--tempo_dropout", "off", "--tempo_silu", "fewbit", "--tempo_mlp", "off",
                                             "--tempo_lm_loss", "off", "--tempo_qk_norm", "separate",
                                             "--tempo_mask_check", "never"])
    assert args.deepspeed and args.deepspeed_config == "ds.json" and args.tempo
    assert (args.tempo_gelu, args.tempo_fewbit_bits, args.tempo_norm, args.tempo_attention, args.tempo_dropout,
            args.tempo_silu) == ("fewbit", 3, "off", "tempo", "off", "fewbit")
    settings = dsi._cli_settings(args)
    assert [settings[k] for k in ("mlp", "lm_loss", "qk_norm", "mask_check")] == ["off", "off", "separate", "never"]


def test_switch_values_are_checked_by_argparse(capsys):
    parser = tempo_ds.add_config_arguments(_parser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--tempo_gelu", "fast"])
    assert "--tempo_gelu: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--tempo_fewbit_bits", "5"])


def test_deepspeed_examples_aliases():
    parser = tempo_ds.add_config_arguments(_parser())
    args = parser.parse_args(["--deepspeed_transformer_kernel"])
    assert dsi.resolve_config(args) == tempo_ds.TempoConfig()
    args = parser.parse_args(["--normalize_invertible", "--gelu_checkpoint", "--attention_dropout_checkpoint"])
    cfg = dsi.resolve_config(args)
    assert (cfg.enabled, cfg.norm, cfg.gelu, cfg.attention) == (True, "inplace", "recompute", "tempo")
    assert dsi.resolve_config(parser.parse_args([])) is None


def test_aliases_the_script_defines_itself_are_not_added_again_but_read():
    parser = _parser("--deepspeed_transformer_kernel", "--attention_dropout_checkpoint")
    tempo_ds.add_config_arguments(parser)  # would raise argparse.ArgumentError on a clash
    helps = {a.dest: a.help or "" for a in parser._actions}
    assert helps["attention_dropout_checkpoint"] == ""  # the script's own option
    assert helps["normalize_invertible"].startswith("DeepSpeedExamples alias")
    cfg = dsi.resolve_config(parser.parse_args(["--attention_dropout_checkpoint"]))
    assert cfg.enabled and cfg.attention == "tempo"


# -- config resolution ------------------------------------------------------------------------------------------
DS = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}


def _args(argv=(), **given):
    parser = deepspeed.add_config_arguments(tempo_ds.add_config_arguments(_parser()))
    args = parser.parse_args(list(argv))
    for k, v in given.items():
        setattr(args, k, v)
    return args


def test_no_section_and_no_flags_means_no_tempo():
    assert dsi.resolve_config(config=DS) is None
    assert dsi.resolve_config(_args(deepspeed_config=None)) is None
    assert dsi.resolve_config() is None


def test_section_from_dict_file_hjson_base64_and_args(tmp_path):
    config = {**DS, "tempo": {"gelu": "inplace", "fewbit": {"bits": 3}}}
    plain = tmp_path / "ds.json"
    plain.write_text(json.dumps(config))
    hjson = tmp_path / "ds.hjson"
    hjson.write_text("{\n  // a comment\n  tempo: {\n    gelu: inplace\n    fewbit: {\n      bits: 3\n    }\n  }\n"
                     "  train_batch_size: 4\n}\n")
    b64 = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    expected = tempo_ds.TempoConfig(gelu="inplace", fewbit={"bits": 3})
    for source in (config, str(plain), str(hjson), b64):
        assert dsi.resolve_config(config=source) == expected, source
    assert dsi.resolve_config(config_params=str(plain)) == expected
    assert dsi.resolve_config(_args(deepspeed_config=str(plain))) == expected
    assert dsi.resolve_config(_args(deepscale_config=str(hjson))) == expected
    with pytest.raises(ValueError, match="Not sure how to proceed"):
        dsi.resolve_config(_args(deepspeed_config=str(plain)), config=config)


def test_command_line_wins_over_the_section(tmp_path):
    config = {**DS, "tempo": {"enabled": False, "gelu": "inplace", "norm": "off",
                              "fewbit": {"bits": 1, "functions": {"silu": 4}}}}
    assert dsi.resolve_config(config=config).enabled is False  # a disabled section: pass-through
    cli = tmp_path / "tempo.json"
    cli.write_text(json.dumps({"norm": "inplace", "attention": "tempo"}))
    args = _args(["--tempo", "--tempo_config", str(cli), "--tempo_gelu", "fewbit", "--tempo_fewbit_bits", "2"],
                 deepspeed_config=None)
    cfg = dsi.resolve_config(args, config=config)
    assert cfg.enabled and (cfg.gelu, cfg.norm, cfg.attention) == ("fewbit", "inplace", "tempo")
    assert cfg.fewbit.bits == 2 and cfg.fewbit.functions == {"silu": 4}
    inline = dsi.resolve_config(_args(["--tempo_config", '{"dropout": "off"}']))
    assert inline.enabled and inline.dropout == "off" and inline.gelu == "recompute"


def test_bad_sections_and_options_name_the_key_and_the_source(tmp_path):
    with pytest.raises(TempoConfigError, match=r"(?s)the DeepSpeed config: .*gelu_bits: unknown key; allowed keys"):
        dsi.resolve_config(config={**DS, "tempo": {"gelu_bits": 2}})
    with pytest.raises(TempoConfigError, match=r"(?s)fewbit.bits: Input should be 1, 2, 3 or 4 \(got 5\)"):
        dsi.resolve_config(config={**DS, "tempo": {"fewbit": {"bits": 5}}})
    with pytest.raises(TempoConfigError, match="'tempo' section must be a JSON object, got bool"):
        dsi.resolve_config(config={**DS, "tempo": True})
    with pytest.raises(TempoConfigError, match=r"(?s)--tempo_config: .*skip: Input should be a valid list"):
        dsi.resolve_config(_args(["--tempo_config", '{"skip": 3}']))


def test_deepspeed_accepts_the_tempo_key():
    """DeepSpeed's own config parser ignores unknown top-level keys, so the section is left in the config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig({**DS, "train_batch_size": 2, "tempo": {"gelu": "inplace", "bogus": 1}})
    assert parsed.zero_optimization_stage == 2 and parsed._param_dict["tempo"]["gelu"] == "inplace"


# -- initialize with deepspeed.initialize stubbed ---------------------------------------------------------------
@pytest.fixture
def fake_deepspeed(monkeypatch):
    """deepspeed.initialize replaced by a recorder: what it was given, and whether the model was injected then."""
    calls = []

    def initialize(**kwargs):
        kwargs["injected_then"] = tempo_ds.is_injected(kwargs["model"])
        calls.append(kwargs)
        return ("engine", "optimizer", "loader", "scheduler")

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setattr(dsi, "configure_activation_checkpointing", lambda config, mpu=None: calls.append(("ckpt", mpu)))
    return calls


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    return transformers.BertForMaskedLM(cfg)


def test_initialize_injects_before_deepspeed_and_keeps_the_parameters(fake_deepspeed, capsys):
    model = _tiny_bert()
    before = list(model.parameters())
    config = {**DS, "tempo": {"gelu": "inplace"}}
    collate = object()
    result = tempo_ds.initialize(model=model, config=config, model_parameters=model.parameters(), mpu=None,
                                 collate_fn=collate, dist_init_required=False)
    assert result == ("engine", "optimizer", "loader", "scheduler")
    call, ckpt = fake_deepspeed
    assert call["injected_then"] and call["config"] is config and call["collate_fn"] is collate
    assert call["dist_init_required"] is False and ckpt == ("ckpt", None)
    assert isinstance(call["model_parameters"], list)
    assert len(call["model_parameters"]) == len(before) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(call["model_parameters"], before))
    assert all(a is b for a, b in zip(model.parameters(), before))
    assert "tempo_ds: bert policy (gelu=inplace" in capsys.readouterr().out


@pytest.mark.parametrize("tempo", [None, {"enabled": False}])
def test_initialize_passes_through_without_a_section_or_when_disabled(fake_deepspeed, tempo, capsys):
    model = _tiny_bert()
    config = {**DS, **({"tempo": tempo} if tempo else {})}
    params = model.parameters()
    tempo_ds.initialize(model=model, config=config, model_parameters=params)
    call = fake_deepspeed[0]
    assert not call["injected_then"] and not tempo_ds.is_injected(model)
    assert call["model_parameters"] is params and call["config"] is config
    assert "tempo_ds:" not in capsys.readouterr().out


def test_initialize_with_a_bad_section_builds_nothing(fake_deepspeed):
    model = _tiny_bert()
    with pytest.raises(TempoConfigError, match="attention"):
        tempo_ds.initialize(model=model, config={**DS, "tempo": {"attention": "flash"}})
    assert fake_deepspeed == [] and not tempo_ds.is_injected(model)


def test_activation_checkpointing_section_is_applied_unless_configured_elsewhere(monkeypatch):
    applied = []
    configured = [False]
    monkeypatch.setattr(deepspeed.checkpointing, "is_configured", lambda: configured[0])
    monkeypatch.setattr(deepspeed.checkpointing, "configure",
                        lambda mpu, deepspeed_config=None: applied.append((mpu, deepspeed_config)))
    monkeypatch.setattr(dsi, "_CONFIGURED_HERE", False)
    config = {**DS, "activation_checkpointing": {"partition_activations": True}}
    assert not dsi.configure_activation_checkpointing(DS)
    assert dsi.configure_activation_checkpointing(config, mpu="mpu") and applied == [("mpu", config)]
    configured[0] = True  # ours: applied again for the next engine
    assert dsi.configure_activation_checkpointing(config)
    monkeypatch.setattr(dsi, "_CONFIGURED_HERE", False)  # the training code configured it: left alone
    assert not dsi.configure_activation_checkpointing(config) and len(applied) == 2


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    torch.save(dsi.rng_state(), path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(100), random.random(), np.random.rand(7)
    dsi.load_rng_state(str(path))  # torch.load(weights_only=True) inside
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_rng_state_refuses_missing_foreign_or_code_carrying_files(tmp_path, capsys):
    with pytest.raises(dsi.RNGStateError, match="does not exist: this checkpoint was not saved with tempo_ds"):
        dsi.load_rng_state(str(tmp_path / "absent.pt"))
    torch.save({"torch": torch.get_rng_state(), "python": _RunsCode()}, tmp_path / "crafted.pt")
    with pytest.raises(dsi.RNGStateError, match="weights_only=True"):
        dsi.load_rng_state(str(tmp_path / "crafted.pt"))
    assert "pwned" not in capsys.readouterr().out
    torch.save({"torch": torch.get_rng_state()}, tmp_path / "partial.pt")
    with pytest.raises(dsi.RNGStateError, match="not in the form tempo_ds.save_checkpoint writes"):
        dsi.load_rng_state(str(tmp_path / "partial.pt"))


# -- benchmark command ------------------------------------------------------------------------------------------
def test_bench_command_runs_both_cases_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "tempo_ds.bench.engines", "--layers", "2",
                          "--seq", "16", "--batch", "1", "--steps", "1", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == ["zero2", "zero3-ckpt2"]
    for r in results:
        base, ours = r["baseline"]["per_layer_bytes"], r["tempo_ds"]["per_layer_bytes"]
        assert len(base) == len(ours) == 2 and 0 < ours[1] < base[1]
        if r["checkpoint_every"]:  # layer 0 is checkpointed: both keep only its input (1 x 16 x 768 bf16)
            assert ours[0] == base[0] == 16 * 768 * 2
        else:
            assert 0 < ours[0] < base[0]
    assert "| zero2 | 0 |" in run.stdout

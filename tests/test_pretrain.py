"""`tempo-ds pretrain` end to end: 2 ranks started by the command itself (real DeepSpeed engines over gloo), a
tiny preset on the embedded corpus. Loss decreases; checkpoints are complete or absent; `--resume` continues
exactly where an uninterrupted run would be; Ctrl-C (SIGINT to the process group, as a terminal sends it) ends
the run after a checkpoint; metrics reach DeepSpeed's csv and tensorboard monitors; bad input fails with a clear
message before any process group starts."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

TINY = ["--seq_len", "32", "--micro_batch", "4", "--no_progress"]
TIMEOUT = 240


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "TRITON_INTERPRET", "TEMPO_DS_TRITON")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pretrain(*args, cwd=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tempo_ds.cli", "pretrain", *map(str, args)]
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _config(out: Path) -> Path:
    """The embedded config with the learning-rate schedule fixed at 8 steps (by default it follows --steps,
    and a run resumed with a larger --steps stretches its decay)."""
    from tempo_ds.pretrain.options import EMBEDDED_CONFIG

    config = json.loads(json.dumps(EMBEDDED_CONFIG))
    config["scheduler"]["params"].update(total_num_steps=8, warmup_num_steps=2)
    config["csv_monitor"]["output_path"] = str(out / "monitor")
    path = out / "ds_config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps in one go, a checkpoint every 3 steps, two kept."""
    out = tmp_path_factory.mktemp("straight")
    run = pretrain(*TINY, "--deepspeed_config", _config(out), "--steps", 8, "--save_interval", 3,
                   "--log_interval", 4, "--out", out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run


def test_trains_and_summarises(straight):
    out, run = straight
    s = _summary(out)
    assert len(s["losses"]) == 8 and s["steps"] == [1, 8] and not s["interrupted"]
    losses = s["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert s["loss_start"] == pytest.approx(sum(losses) / 8) == s["loss_end"]  # 10-step windows
    assert s["tempo_enabled"] and s["tokens_per_s"] > 0
    mem = s["memory"]
    from tempo_ds.profile import compare

    base, lean = compare("bert", "tiny", seq=32, batch=4, dtype="bf16", layers=2, runs={"base": None, "tempo": {}})
    assert (mem["without_tempo"], mem["with_tempo"]) == (base.bytes_per_layer, lean.bytes_per_layer)
    assert mem["with_tempo"] < 0.55 * mem["without_tempo"]
    assert mem["in_run"] == mem["with_tempo"]  # the run's own first step meters what the 2-layer copy does
    assert mem["tokens_x_hidden"] == 32 * 4 * 128
    text = run.stdout
    assert "tempo-ds pretrain: bert-tiny MLM, 2 ranks (cpu), bf16, ZeRO-1, micro-batch 4 x 32 tokens" in text
    assert "without tempo_ds" in text and "with tempo_ds" in text and "tokens/s" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")] == ["1/8", "4/8", "8/8"]


def test_checkpoints_are_complete_and_pruned(straight):
    out, _ = straight
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step8"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step6", "step8"]  # --keep 2
    files = {p.name for p in (ckpt / "step8").iterdir()}
    assert {"mp_rank_00_model_states.pt", "tempo_ds_rng_state_rank0.pt", "tempo_ds_rng_state_rank1.pt"} <= files
    assert not list(ckpt.glob(".partial-*"))


def test_metrics_go_through_deepspeeds_csv_monitor(straight):
    out, _ = straight
    monitor = out / "monitor" / "pretrain"
    loss = _csv(monitor / "Train_loss.csv")
    assert loss[0] == ["step", "loss"]
    assert [int(r[0]) for r in loss[1:]] == list(range(1, 9))
    assert [round(float(r[1]), 6) for r in loss[1:]] == [round(x, 6) for x in _summary(out)["losses"]]
    for name in ("tokens_per_s", "peak_memory_bytes", "saved_activation_bytes_per_layer"):
        rows = _csv(monitor / f"Train_{name}.csv")[1:]
        assert [int(r[0]) for r in rows] == [1, 4, 8] and all(float(r[1]) > 0 for r in rows)
    saved = {float(r[1]) for r in _csv(monitor / "Train_saved_activation_bytes_per_layer.csv")[1:]}
    assert saved == {_summary(out)["memory"]["in_run"]}
    assert (monitor / "Train_Samples_lr.csv").exists()  # DeepSpeed's own events share the monitor


def test_resume_continues_exactly(straight, tmp_path):
    """4 steps, then --resume to 8: the same losses as the straight run (model, optimizer, scheduler, RNG of
    the seeded dropout, data position all restored)."""
    config = _config(tmp_path)
    first = pretrain(*TINY, "--deepspeed_config", config, "--steps", 4, "--save_interval", 0, "--out", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(*TINY, "--deepspeed_config", config, "--steps", 8, "--resume", "--out", tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    s = _summary(tmp_path)
    assert s["steps"] == [5, 8]
    assert s["losses"] == _summary(straight[0])["losses"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step8"


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path):
    cmd = [sys.executable, "-m", "tempo_ds.cli", "pretrain", *TINY, "--steps", "100000", "--log_interval", "1",
           "--save_interval", "0", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))  # a silent hang fails the test
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                break
        rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-3000:]
    s = _summary(tmp_path)
    assert s["interrupted"] and 3 <= s["steps"][1] < 100000
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{s['steps'][1]}"
    assert not list(ckpt.glob(".partial-*"))
    assert "resume with the same arguments and --resume" in text
    again = pretrain(*TINY, "--steps", s["steps"][1] + 2, "--resume", "--out", tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(tmp_path)["steps"] == [s["steps"][1] + 1, s["steps"][1] + 2]

    other = pretrain(*TINY, "--seq_len", 16, "--steps", 100, "--resume", "--out", tmp_path)
    assert other.returncode == 2, other.stdout[-2000:] + other.stderr[-2000:]
    assert "the checkpoint belongs to a different run; seq_len: checkpoint 32, now 16" in other.stderr

    fresh = pretrain(*TINY, "--steps", 2, "--out", tmp_path)  # a new run would mix with the old one
    assert fresh.returncode == 2 and "holds a run" in fresh.stderr and "--overwrite" in fresh.stderr
    over = pretrain(*TINY, "--steps", 2, "--overwrite", "--out", tmp_path)
    assert over.returncode == 0, over.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]
    assert len(_csv(tmp_path / "monitor" / "pretrain" / "Train_loss.csv")) == 3  # header + 2 steps


def test_config_file_gpt2_zero3_tensorboard_own_data(tmp_path):
    """Causal LM from a user's DeepSpeed config: ZeRO-3 (model built under zero.Init), a "tempo" section,
    the tensorboard monitor, gradient accumulation, an own lr; the user's text and tokenizer folder."""
    pytest.importorskip("tensorboard")
    from tempo_ds.data import load_tokenizer

    load_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "text").mkdir()
    for i in range(3):
        (tmp_path / "text" / f"doc{i}.txt").write_text(
            "\n\n".join(f"Paragraph {j} of document {i}: the quick brown fox jumps over the lazy dog." for j in range(40)))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "gpt2"},
              "tempo": {"dropout": "off"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    run = pretrain("--deepspeed_config", path, "--arch", "gpt2", "--seq_len", 32, "--steps", 6, "--no_progress",
                   "--data", tmp_path / "text", "--tokenizer", tmp_path / "tok",
                   "--out", tmp_path / "run", "--report_dir", tmp_path / "report")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "gpt2-tiny causal LM, 2 ranks (cpu), fp32, ZeRO-3, micro-batch 2 x 32 tokens x 2 accumulation" \
        in run.stdout
    report = json.loads((tmp_path / "report" / "rank0.json").read_text())
    assert report["zero_stage"] == 3 and report["tempo"]["dropout"] == "off" and report["tempo"]["gelu"] == "recompute"
    s = _summary(tmp_path / "run")
    assert s["losses"][-1] < s["losses"][0]
    assert list((tmp_path / "tb" / "gpt2").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "gpt2"))
    events.Reload()
    assert [e.step for e in events.Scalars("Train/loss")] == list(range(1, 7))


def _fails_fast(*args, message: str, tmp_path):
    run = pretrain(*args, "--out", tmp_path / "out", timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr, run.stderr
    assert "Initializing TorchBackend" not in run.stdout + run.stderr  # no process group was started
    assert not (tmp_path / "out").exists()


def test_bad_data_and_tokenizer_fail_before_any_process_group(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    (tmp_path / "notext").mkdir()
    junk = tmp_path / "tok"
    junk.mkdir()
    (junk / "tokenizer.json").write_text("{not json")
    cases = [(["--data", tmp_path / "missing.txt"], "no such file or directory"),
             (["--data", empty], "empty"),
             (["--data", tmp_path / "notext"], "holds no .txt"),
             (["--tokenizer", tmp_path / "missing"], "missing"),
             (["--tokenizer", junk], "tokenizer"),
             (["--resume"], "no complete checkpoint"),
             (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
             (["--steps", 0], "--steps=0 must be >= 1"),
             (["--size", "medium"], "size='medium' is not defined for bert"),
             (["--no_tempo", "--tempo_gelu", "fewbit"], "--no_tempo conflicts with --tempo_gelu"),
             (["--no_tempo", "--gelu_checkpoint"], "--no_tempo conflicts with --gelu_checkpoint")]
    for args, message in cases:
        _fails_fast(*args, message=message, tmp_path=tmp_path)


def test_bad_config_fails_before_any_process_group(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    bad_tempo = tmp_path / "tempo.json"
    bad_tempo.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "tempo": {"gelu": "fast"}}))
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "three"}}))
    cases = [(tmp_path / "nope.json", "no such file"), (bad_json, "not valid JSON"), (bad_tempo, "gelu"),
             (bad_ds, "DeepSpeed config")]
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():  # DeepSpeed's CPU accelerator asks oneDNN: CPU-model dependent
        fp16 = Path(__file__).resolve().parents[1] / "configs" / "bert-large" / "zero2-fp16.json"
        cases.append((fp16, f"fp16 is enabled but DeepSpeed's {get_accelerator().device_name()} accelerator does "
                            "not support it"))
    for path, message in cases:
        _fails_fast("--deepspeed_config", path, message=message, tmp_path=tmp_path)


def test_preset_from_the_config_folder(tmp_path, monkeypatch):
    from tempo_ds.pretrain.options import parse

    monkeypatch.chdir(tmp_path)  # the default --out is relative: a run left in the working folder must not count

    root = Path(__file__).resolve().parents[1] / "configs"
    args, _ = parse(["--deepspeed_config", str(root / "gpt2-medium" / "zero2-bf16.json")])
    assert (args.arch, args.size) == ("gpt2", "medium")
    args, _ = parse(["--deepspeed_config", str(root / "gpt2-medium" / "zero2-bf16.json"), "--size", "tiny"])
    assert (args.arch, args.size) == ("gpt2", "tiny")
    args, _ = parse([])
    assert (args.arch, args.size) == ("bert", "tiny")

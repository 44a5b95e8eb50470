"""tempo_ds.run: training scripts nobody edited get the DeepSpeed config's "tempo" section.

Three launches (2 ranks, gloo on the CPU accelerator, one thread per rank; tiny models: hidden 32, 2 layers,
seq 16, 3 steps) of the scripts tests/scripts/noedit_*.py, which hold no tempo_ds code:

1. ``deepspeed --num_gpus 2 --module tempo_ds.run noedit_suite.py OUT``: HF Trainer under ZeRO-2 and ZeRO-3 (bf16,
   dropout on), a DeepSpeedExamples-style script calling ``deepspeed.initialize(args=...)`` with ``--tempo_gelu
   inplace`` after the script (its parser calls ``deepspeed.add_config_arguments``), a bad section and a
   ``PipelineModule`` (both refused on every rank before DeepSpeed is called).
2. ``accelerate launch --config_file accelerate.yaml -m tempo_ds.run --tempo_attention tempo noedit_accelerate.py``:
   accelerate's DeepSpeed plugin from the config file `accelerate config` names, carrying the section (bf16 Llama).
3. ``deepspeed --num_gpus 2 noedit_reference.py OUT``: the same runs with the documented code changes
   (``tempo_ds.inject`` before the Trainer / ``accelerator.prepare``, ``tempo_ds.initialize``).

``TEMPO_DS_SUMMARY`` makes the runner record each engine it saw built. Each case asserts the injection (settings,
modules replaced), the bytes per layer the meter counted in the engine's first training forward (exactly the figure
the meter gives the same model injected in this process, and below the plain model's), the one-line report printed
by rank 0 only, and per-step losses equal to the reference run's (measured: identical, so compared exactly).

The rest runs in this process: the runner's argument handling, the hook's paths with DeepSpeed's initialize
replaced by a recorder (pass-through, bad section, model already injected, positional arguments, a model it cannot
inject), the ``add_config_arguments`` hook, the ignored-section warning, and the start-up hook (tempo_ds.pth) in
fresh interpreters.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tempo_ds
from tempo_ds import _startup
from tempo_ds import deepspeed_integration as dsi
from tempo_ds.config import TempoConfigError
from tempo_ds.memory import SavedTensorMeter
from tempo_ds.run import cli, hook, main

deepspeed = pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
sys.path.insert(0, str(SCRIPTS))
import noedit_accelerate  # noqa: E402
import noedit_direct  # noqa: E402
import noedit_trainer  # noqa: E402

STEPS = 3
TIMEOUT = 300
TRAINER_SECTION = {"gelu": "recompute", "norm": "inplace", "attention": "lean", "dropout": "seed"}
DIRECT_SECTION = {"gelu": "recompute", "attention": "tempo"}
ACCELERATE_SECTION = {"silu": "fewbit"}


def _trainer_config(stage: int, extra: dict) -> dict:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "tempo": {**TRAINER_SECTION, **extra}}


CONFIGS = {
    "ds_zero2.json": _trainer_config(2, {}),
    "ds_zero3.json": _trainer_config(3, {}),
    "ds_direct.json": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                       "zero_optimization": {"stage": 1}, "tempo": DIRECT_SECTION},
    "ds_bad.json": {"train_micro_batch_size_per_gpu": 2, "tempo": {"gelu": "inplace", "fewbit": {"bits": 5}}},
    "ds_pipe.json": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                     "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "tempo": {}},
    "ds_acc.json": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
                    "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "tempo": ACCELERATE_SECTION},
}
ACCELERATE_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {config}
  zero3_init_flag: false
machine_rank: 0
main_training_function: main
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: false
"""


# -- launching ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPO_DS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _launch(cmd: list[str], out: Path, **env) -> subprocess.CompletedProcess:
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=out, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    run.seconds = time.monotonic() - start
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return run


def _ranks(out: Path, prefix: str) -> list[dict]:
    return [json.loads((out / f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]


def _summaries(directory: Path) -> list[dict]:
    found = [json.loads((directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in found] == [0, 1]
    return found


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runner")
    for name, config in CONFIGS.items():
        (out / name).write_text(json.dumps(config))
    (out / "accelerate.yaml").write_text(ACCELERATE_YAML.format(config=out / "ds_acc.json"))
    return out


DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]


@pytest.fixture(scope="module")
def suite(out):
    run = _launch([*DEEPSPEED, "--master_port", str(_free_port()), "--module", "tempo_ds.run",
                   str(SCRIPTS / "noedit_suite.py"), str(out)], out, TEMPO_DS_SUMMARY=str(out / "summary"))
    return run, _summaries(out / "summary")


@pytest.fixture(scope="module")
def accelerate_run(out):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    run = _launch([accelerate, "launch", "--config_file", str(out / "accelerate.yaml"), "--main_process_port",
                   str(_free_port()), "-m", "tempo_ds.run", "--tempo_attention", "tempo",
                   str(SCRIPTS / "noedit_accelerate.py"), "--steps", str(STEPS), "--losses_json",
                   str(out / "accelerate")], out, TEMPO_DS_SUMMARY=str(out / "summary_acc"))
    return run, _summaries(out / "summary_acc")


@pytest.fixture(scope="module")
def reference(out):
    _launch([*DEEPSPEED, "--master_port", str(_free_port()), str(SCRIPTS / "noedit_reference.py"), str(out)], out)
    return out


# -- expected figures: the meter on the same model, injected here ----------------------------------------------
def _per_layer(model, tempo, dtype) -> list[int]:
    if tempo is not None:
        tempo_ds.inject(model, tempo)
    model.to(dtype).train()
    ids = torch.randint(3, noedit_trainer.VOCAB, (2, 16))
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, labels=ids)
    return meter.per_layer


def _figures(build, tempo, dtype) -> tuple[list[int], list[int]]:
    return _per_layer(build(), tempo, dtype), _per_layer(build(), None, dtype)


def _check_engine(entry: dict, stage: int, techniques: dict, expected: tuple[list[int], list[int]]) -> None:
    ours, plain = expected
    assert entry["how"] == "injected by tempo_ds.run" and entry["injected"]
    assert entry["zero_stage"] == stage
    assert {k: entry["techniques"][k] for k in techniques} == techniques
    assert sum(entry["replaced"].values()) >= 5
    assert entry["per_layer_bytes"] == ours
    assert all(o < p for o, p in zip(ours, plain))
    assert entry["forwards"] == STEPS and entry["step_s"] > 0


# -- the launches' findings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_script_is_injected_and_trains_like_tempo_ds_inject(suite, reference, stage):
    run, summaries = suite
    tempo = TRAINER_SECTION
    expected = _figures(lambda: noedit_trainer.build(noedit_trainer.ModelArguments()), tempo, torch.bfloat16)
    for r, summary in enumerate(summaries):
        _check_engine(summary["engines"][stage - 2], stage, TRAINER_SECTION, expected)
        ours = _ranks(reference, f"trainer_zero{stage}")[r]["losses"]
        assert ours == _ranks(reference, f"ref_trainer_zero{stage}")[r]["losses"] and len(ours) == STEPS


def test_direct_deepspeed_initialize_takes_tempo_options_after_the_script(suite, reference):
    run, summaries = suite
    args = noedit_direct.parser().parse_args([])
    expected = _figures(lambda: noedit_direct.build(args), {**DIRECT_SECTION, "gelu": "inplace"}, torch.float32)
    for r, summary in enumerate(summaries):
        _check_engine(summary["engines"][2], 1, {"gelu": "inplace", "attention": "tempo"}, expected)
        assert _ranks(reference, "direct")[r]["losses"] == _ranks(reference, "ref_direct")[r]["losses"]


def test_script_gets_its_own_argv_with_the_launchers_local_rank(suite, out):
    for r, found in enumerate(_ranks(out, "suite")):
        assert found["argv"] == [str(SCRIPTS / "noedit_suite.py"), f"--local_rank={r}", str(out)]


def test_report_is_printed_by_rank_0_only(suite):
    run, _ = suite
    lines = [line for line in run.stdout.splitlines() if "tempo_ds: bert policy" in line]
    assert len(lines) == 3 and all(line.startswith("[Rank 0] ") for line in lines), lines


def test_bad_section_fails_on_every_rank_before_anything_is_built(suite, out):
    for found in _ranks(out, "suite"):
        bad = found["bad_section"]
        assert bad["raised"] == "TempoConfigError" and bad["norm"] == "LayerNorm"
        assert f"DeepSpeed config {out / 'ds_bad.json'}" in bad["message"]
        assert "fewbit.bits: Input should be 1, 2, 3 or 4 (got 5)" in bad["message"]


def test_pipeline_module_is_refused_with_a_clear_message(suite, out):
    for found in _ranks(out, "suite"):
        pipe = found["pipeline"]
        assert pipe["raised"] == "TempoRunnerError"
        assert f"DeepSpeed config {out / 'ds_pipe.json'} asks for tempo_ds" in pipe["message"]
        assert "is a PipelineModule" in pipe["message"] and 'Set "enabled": false' in pipe["message"]


def test_accelerate_deepspeed_plugin_config_file(accelerate_run, reference, out):
    run, summaries = accelerate_run
    args = noedit_accelerate.parser().parse_args([])
    tempo = {**ACCELERATE_SECTION, "attention": "tempo"}  # --tempo_attention tempo given to the runner
    expected = _figures(lambda: noedit_accelerate.build(args), tempo, torch.bfloat16)
    for r, summary in enumerate(summaries):
        (entry,) = summary["engines"]
        _check_engine(entry, 2, tempo, expected)
        assert _ranks(out, "accelerate")[r]["losses"] == _ranks(reference, "ref_accelerate")[r]["losses"]
    assert sum("tempo_ds: llama policy" in line for line in run.stdout.splitlines()) == 1


# -- argument handling ----------------------------------------------------------------------------------------
def test_runner_argv_goes_to_the_script_with_local_rank_moved_after_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    got = cli.parse(["--local_rank=1", "--tempo_gelu", "inplace", "--tempo", str(script), "--tempo_gelu", "x"])
    assert got.argv == [str(script), "--local_rank=1", "--tempo_gelu", "x"] and not got.module
    assert got.option_tokens == ["--tempo_gelu", "inplace", "--tempo"]
    assert got.options.tempo_gelu == "inplace" and got.options.tempo
    got = cli.parse(["--local-rank", "0", "--tempo_norm=off", "--", "-m", "pkg.train", "--lr", "1"])
    assert (got.target, got.module, got.argv) == ("pkg.train", True, ["pkg.train", "--local-rank", "0", "--lr", "1"])
    assert got.option_tokens == ["--tempo_norm=off"]
    assert cli.parse(["--help", str(script)]) is None


@pytest.mark.parametrize("argv, message", [
    ([], "no script to run"),
    (["-m"], "no module name after -m"),
    (["missing.py"], "cannot open the script 'missing.py': no such file"),
    (["--tempo_gelu", "fast", "x.py"], "argument --tempo_gelu: invalid choice: 'fast'"),
    (["--bogus", "x.py"], "unrecognized arguments: --bogus"),
    (["--tempo_config", '{"gelu_bits": 2}', "x.py"], "gelu_bits: unknown key; allowed keys"),
    (["--tempo_fewbit_bits"], "--tempo_fewbit_bits expects a value"),
])
def test_bad_runner_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(cli.RunnerError) as err:
        cli.parse(argv)
    assert message in str(err.value)
    assert main(argv) == 2
    assert message in capsys.readouterr().err and "TEMPO_DS" not in os.environ


def test_env_options(monkeypatch):
    assert cli.env_options(None) is None and cli.env_options("  ") is None
    assert cli.env_options("--tempo_gelu inplace --tempo").tempo_gelu == "inplace"
    with pytest.raises(cli.RunnerError, match=r"TEMPO_DS_ARGS='--tempo_norm x': argument --tempo_norm"):
        cli.env_options("--tempo_norm x")


def test_python_m_tempo_ds_run_runs_the_script_as_main(tmp_path):
    """A fresh interpreter (no DeepSpeed import): __name__, argv, sys.path[0], the exported switch, the exit code."""
    (tmp_path / "sub").mkdir()
    script = tmp_path / "sub" / "train.py"
    script.write_text("import json, os, sys\n"
                      "json.dump({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0], 'file': __file__,\n"
                      "           'env': [os.environ.get('TEMPO_DS'), os.environ.get('TEMPO_DS_ARGS')]},\n"
                      "          open(sys.argv[-1], 'w'))\n"
                      "sys.exit(3)\n")
    found = tmp_path / "found.json"
    run = subprocess.run([sys.executable, "-m", "tempo_ds.run", "--tempo_dropout", "off", str(script), "--x",
                          str(found)], cwd=tmp_path, env=_env(TEMPO_DS_ARGS="--tempo"), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 3, run.stderr[-3000:]
    got = json.loads(found.read_text())
    assert got["name"] == "__main__" and got["argv"] == [str(script), "--x", str(found)]
    assert got["path0"] == os.path.realpath(script.parent) and got["file"] == str(script)
    assert got["env"] == ["1", "--tempo --tempo_dropout off"]


# -- the hook, with DeepSpeed's initialize replaced by a recorder -------------------------------------------------
DS = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}


def _model():
    return noedit_trainer.build(noedit_trainer.ModelArguments(layers=1, dropout=0.0))


@pytest.fixture
def hooked(monkeypatch):
    """deepspeed.initialize = the runner's hook around a recorder with DeepSpeed's own signature."""
    calls = []

    def recorder(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
                 distributed_port=29500, mpu=None, dist_init_required=None, collate_fn=None, config=None,
                 mesh_param=None, config_params=None):
        calls.append({**locals(), "injected_then": tempo_ds.is_injected(model)})
        return ("engine", "optimizer", "loader", "scheduler")

    monkeypatch.setattr(deepspeed, "initialize", hook._initialize_hook(recorder))
    monkeypatch.setattr(dsi, "PROCESS_OPTIONS", None)
    monkeypatch.delenv("TEMPO_DS_SUMMARY", raising=False)
    return calls


def test_hook_without_section_or_option_changes_nothing(hooked, capsys):
    model = _model()
    params = model.parameters()
    for config in (DS, {**DS, "tempo": {"enabled": False}}):
        result = deepspeed.initialize(model=model, config=config, model_parameters=params)
        assert result == ("engine", "optimizer", "loader", "scheduler")
        call = hooked.pop()
        assert call["model"] is model and call["config"] is config and call["model_parameters"] is params
        assert not call["injected_then"] and not tempo_ds.is_injected(model)
    assert "tempo_ds:" not in capsys.readouterr().out


def test_hook_injects_before_deepspeed_with_positional_arguments(hooked, capsys):
    model = _model()
    before = list(model.parameters())
    deepspeed.initialize(None, model, None, model.parameters(), config={**DS, "tempo": {"gelu": "inplace"}})
    (call,) = hooked
    assert call["injected_then"] and call["model"] is model
    assert [id(p) for p in call["model_parameters"]] == [id(p) for p in before]
    assert "tempo_ds: bert policy (gelu=inplace" in capsys.readouterr().out


def test_hook_reads_process_options_under_the_scripts_own(hooked, monkeypatch):
    monkeypatch.setattr(dsi, "PROCESS_OPTIONS", cli.env_options("--tempo_gelu inplace --tempo_norm off"))
    args = argparse.Namespace(tempo_gelu="fewbit", deepspeed_config=None)
    model = _model()
    deepspeed.initialize(args=args, model=model, config=DS)  # no section: the process options turn tempo_ds on
    report = getattr(model, "_tempo_ds_state")["report"]
    assert (report.config.gelu, report.config.norm) == ("fewbit", "off")
    assert hooked[0]["args"] is args


def test_hook_fails_a_bad_section_before_deepspeed_is_called(hooked):
    model = _model()
    with pytest.raises(TempoConfigError, match=r"(?s)the DeepSpeed config: .*fewbit.bits: Input should be 1, 2, 3"):
        deepspeed.initialize(model=model, config={**DS, "tempo": {"fewbit": {"bits": 5}}})
    assert hooked == [] and not tempo_ds.is_injected(model)


def test_hook_leaves_a_model_the_script_injected_itself(hooked, capsys):
    model = _model()
    report = tempo_ds.inject(model, gelu="inplace")
    deepspeed.initialize(model=model, config={**DS, "tempo": {"gelu": "recompute"}})
    assert hooked[0]["injected_then"] and getattr(model, "_tempo_ds_state")["report"] is report
    assert "tempo_ds:" not in capsys.readouterr().out


def test_hook_refuses_a_model_it_cannot_inject(hooked):
    with pytest.raises(hook.TempoRunnerError, match=r"is a dict, not a torch.nn.Module, so the hook cannot inject"):
        deepspeed.initialize(model={"not": "a module"}, config={**DS, "tempo": {}})
    assert hooked == []


def test_add_config_arguments_hook_adds_the_tempo_options_without_clashing():
    add = hook._arguments_hook(deepspeed.add_config_arguments)
    parser = add(argparse.ArgumentParser())
    parser.add_argument("--deepspeed_transformer_kernel", action="store_true")  # DeepSpeedExamples: after DeepSpeed's
    args = parser.parse_args(["--deepspeed", "--tempo_gelu", "inplace", "--deepspeed_transformer_kernel"])
    assert args.deepspeed and args.tempo_gelu == "inplace"
    assert dsi.resolve_config(args).gelu == "inplace"
    own = tempo_ds.add_config_arguments(argparse.ArgumentParser())  # the script already has them: left alone
    assert add(own).parse_args(["--tempo"]).tempo


def _ds_initialize():
    real = deepspeed.initialize
    return getattr(real, "__wrapped__", real)


def test_warning_when_a_section_reaches_deepspeed_and_tempo_ds_is_not_active(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**DS, "tempo": {"gelu": "inplace"}}))
    model = _model()
    with pytest.warns(hook.IgnoredSectionWarning) as caught:
        assert hook.warn_if_ignored(_ds_initialize(), (None, model), {"config": str(config)})
    (message,) = [str(w.message) for w in caught if w.category is hook.IgnoredSectionWarning]
    assert f"DeepSpeed config {config} has a \"tempo\" section, but tempo_ds is not active" in message
    assert "trains WITHOUT tempo_ds" in message and "deepspeed --module tempo_ds.run train.py" in message
    assert "TEMPO_DS=1" in message and '"enabled": false' in message
    with pytest.warns(hook.IgnoredSectionWarning, match=r"TEMPO_DS='yes' is neither 0 nor 1"):
        hook.warn_if_ignored(_ds_initialize(), (), {"model": model, "config": str(config)}, "yes")


def test_no_warning_without_section_when_disabled_or_already_injected(recwarn):
    model = _model()
    initialize = _ds_initialize()
    assert not hook.warn_if_ignored(initialize, (), {"model": model, "config": DS})
    assert not hook.warn_if_ignored(initialize, (), {"model": model, "config": {**DS, "tempo": {"enabled": False}}})
    tempo_ds.inject(model)
    assert not hook.warn_if_ignored(initialize, (), {"model": model, "config": {**DS, "tempo": {}}})
    assert not [w for w in recwarn if issubclass(w.category, hook.IgnoredSectionWarning)]


def test_watching_wrapper_warns_then_calls_deepspeed():
    calls = []

    def initialize(args=None, model=None, config=None):
        calls.append(model)
        return "engine"

    watched = _startup._watching(initialize)
    model = _model()
    with pytest.warns(hook.IgnoredSectionWarning):
        assert watched(model=model, config={**DS, "tempo": {}}) == "engine"
    assert watched(model=model, config="/no/such/file.json") == "engine"  # the check never stands in the way
    assert calls == [model, model] and getattr(watched, _startup.HOOK_ATTRIBUTE) == "watch"


# -- the start-up hook in fresh interpreters ------------------------------------------------------------------
PTH_PROBE = """
import json, os, site, sys
site.addsitedir(sys.argv[1])
found = {"startup_loaded": "tempo_ds._startup" in sys.modules, "torch": "torch" in sys.modules}
if os.environ.get("PROBE_DEEPSPEED"):
    import argparse, deepspeed
    found["watch"] = getattr(deepspeed.initialize, "__tempo_ds_hook__", None)
    found["tempo_ds_imported"] = "tempo_ds" in sys.modules
    os.environ["TEMPO_DS"], os.environ["TEMPO_DS_ARGS"] = "1", "--tempo_gelu inplace"
    sys.modules["tempo_ds._startup"].install()  # what tempo_ds.run does when the .pth already watches
    from tempo_ds import deepspeed_integration as dsi
    found["active"] = [getattr(f, "__tempo_ds_hook__", None) for f in (deepspeed.initialize, deepspeed.add_config_arguments)]
    found["process_gelu"] = dsi.PROCESS_OPTIONS.tempo_gelu
    found["parser_has_tempo"] = "--tempo" in deepspeed.add_config_arguments(argparse.ArgumentParser())._option_string_actions
print(json.dumps(found))
"""


def _probe(tmp_path, **env) -> dict:
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    shutil.copy(REPO / "tempo_ds" / "run" / "tempo_ds.pth", site_dir)
    run = subprocess.run([sys.executable, "-c", PTH_PROBE, str(site_dir)], cwd=tmp_path, env=_env(**env),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_pth_hook_watches_deepspeed_without_importing_anything_heavy(tmp_path):
    found = _probe(tmp_path, PROBE_DEEPSPEED="1")
    assert found == {"startup_loaded": True, "torch": False, "watch": "watch", "tempo_ds_imported": False,
                     "active": ["active", "active"], "process_gelu": "inplace", "parser_has_tempo": True}
    assert _probe(tmp_path, TEMPO_DS="0") == {"startup_loaded": False, "torch": False}

"""configs/: every JSON file is a valid DeepSpeed config (deepspeed.runtime.config.DeepSpeedConfig) whose
"tempo" section (if any) passes TempoConfig.build; the set is exactly what configs/generate.py writes, each
tempo config has its baseline (the same config without the "tempo" section), and the grid is complete."""
import importlib.util
import json
from pathlib import Path

import pytest

from tempo_ds import presets
from tempo_ds.config import TempoConfig

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.json"))


def _generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_what_the_generator_writes(tmp_path):
    gen = _generator()
    gen.main(tmp_path)
    expected = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert sorted(p.relative_to(CONFIGS) for p in ALL) == expected, "run python configs/generate.py"
    for rel in expected:
        assert (CONFIGS / rel).read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run configs/generate.py"


def test_grid_is_complete():
    gen = _generator()
    assert set(gen.MODELS) == {"bert-large", "roberta-large", "gpt2-medium"}
    names = {f"zero{s}-{d}{c}.json" for s in (1, 2, 3) for d in ("bf16", "fp16") for c in ("", "-ckpt")}
    for model in gen.MODELS:
        assert {p.name for p in (CONFIGS / model).glob("*.json")} == names
        assert {p.name for p in (CONFIGS / "baselines" / model).glob("*.json")} == names
        arch, size = gen.MODELS[model][:2]
        presets.model_config(arch, size)  # the preset each directory is meant for exists


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_validates(path):
    data = json.loads(path.read_text())
    baseline = path.relative_to(CONFIGS).parts[0] == "baselines"
    # tempo_ds: the section (absent in baselines), through the same entry point tempo_ds.initialize uses
    assert ("tempo" in data) == (not baseline)
    tempo = TempoConfig.build(data)
    if not baseline:
        assert tempo.enabled and tempo.techniques()["norm"] == "inplace"
    # DeepSpeed: its own strict config classes (unknown keys inside its sections fail)
    ds = DeepSpeedConfig(data)
    name = path.stem
    stage = int(name[4])
    assert ds.zero_optimization_stage == stage
    assert ds.train_micro_batch_size_per_gpu == data["train_micro_batch_size_per_gpu"]
    if "-bf16" in name:
        assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    else:
        assert ds.float16_config.enabled and not ds.bfloat16_config.enabled
    assert ("activation_checkpointing" in data) == name.endswith("-ckpt")
    if stage == 3:
        assert ds.zero_config.param_persistence_threshold == 0


def test_baseline_is_the_tempo_config_without_its_section():
    for path in ALL:
        rel = path.relative_to(CONFIGS)
        if rel.parts[0] == "baselines":
            continue
        tempo = json.loads(path.read_text())
        base = json.loads((CONFIGS / "baselines" / rel).read_text())
        tempo.pop("tempo")
        assert tempo == base, rel

"""TempoConfig is strict: unknown keys and bad values fail with messages naming the key and what is allowed."""
import json

import pytest

from tempo_ds.config import TempoConfig, TempoConfigError, deepspeed_section


def test_defaults_and_overrides():
    cfg = TempoConfig.build()
    assert cfg.techniques() == {"gelu": "recompute", "silu": "off", "mlp": "recompute", "norm": "inplace",
                                "attention": "lean", "dropout": "seed", "lm_loss": "chunked"}
    assert TempoConfig.build({"gelu": "inplace"}, gelu="fewbit").gelu == "fewbit"
    assert TempoConfig.build(cfg, norm="off").norm == "off" and cfg.norm == "inplace"


def test_from_a_deepspeed_config_dict_file_and_inline_json(tmp_path):
    ds = {"train_batch_size": 8, "bf16": {"enabled": True}, "tempo": {"gelu": "inplace", "fewbit": {"bits": 3}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for source in (ds, str(path), json.dumps(ds)):
        cfg = TempoConfig.build(source)
        assert cfg.gelu == "inplace" and cfg.fewbit.bits == 3
    assert deepspeed_section(str(path)) == ds["tempo"]
    assert deepspeed_section({"train_batch_size": 8}) is None
    assert TempoConfig.build({"tempo": {"norm": "off"}}).norm == "off"


def test_per_function_fewbit_bits():
    cfg = TempoConfig.build(fewbit={"bits": 2, "functions": {"silu": 4}})
    assert cfg.fewbit.bits_for("silu") == 4 and cfg.fewbit.bits_for("gelu") == 2


@pytest.mark.parametrize("bad,needles", [
    ({"gelu": "fast"}, ["gelu", "'inplace', 'recompute', 'fewbit' or 'off'", "'fast'"]),
    ({"attention": "flash"}, ["attention", "'lean', 'tempo' or 'off'"]),
    ({"gelu_mode": "inplace"}, ["gelu_mode: unknown key", "allowed keys: attention", "gelu"]),
    ({"fewbit": {"bits": 5}}, ["fewbit.bits", "1, 2, 3 or 4"]),
    ({"fewbit": {"bitz": 2}}, ["fewbit.bitz: unknown key", "allowed keys: bits, functions"]),
    ({"fewbit": {"functions": {"relu": 2}}}, ["fewbit.functions.relu", "'gelu'", "'silu'"]),
    ({"attention_block_size": 0}, ["attention_block_size", "greater than or equal to 1"]),
    ({"enabled": "maybe"}, ["enabled"]),
])
def test_bad_values_name_the_key_and_the_allowed_values(bad, needles):
    with pytest.raises(TempoConfigError) as exc:
        TempoConfig.build(bad)
    for needle in needles:
        assert needle in str(exc.value)


def test_bad_sources(tmp_path):
    with pytest.raises(TempoConfigError, match="does not exist"):
        TempoConfig.build(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TempoConfigError, match="not valid JSON"):
        TempoConfig.build(str(broken))
    with pytest.raises(TempoConfigError, match="must be a JSON object"):
        TempoConfig.build({"train_batch_size": 1, "tempo": [1, 2]})
    with pytest.raises(TempoConfigError, match="must be a TempoConfig"):
        TempoConfig.build(42)


def test_assignment_is_validated_too():
    cfg = TempoConfig.build()
    with pytest.raises(Exception, match="norm"):
        cfg.norm = "fused"


def test_deepspeed_config_without_a_tempo_section_means_defaults(tmp_path):
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    assert TempoConfig.build(ds) == TempoConfig.build()
    commented = tmp_path / "ds.json"
    commented.write_text('{\n  // DeepSpeed reads HJSON: comments are allowed\n  "train_batch_size": 8,\n'
                         '  "tempo": {"norm": "off"}\n}\n')
    assert TempoConfig.build(str(commented)).norm == "off"

"""`tempo-ds profile`: the installed console script, its JSON, and its errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tempo_ds import presets
from tempo_ds.cli import main
from tempo_ds.ops.layer_norm import side_columns
from tempo_ds.profile import profile

SCRIPT = shutil.which("tempo-ds") or str(Path(sys.executable).parent / "tempo-ds")


def test_console_script_profiles_bert_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    run = subprocess.run([SCRIPT, "profile", "--arch", "bert", "--size", "tiny", "--seq", "32", "--batch", "2",
                          "--dtype", "bf16", "--json", str(out)], capture_output=True, text=True, check=True)
    assert "sbh" in run.stdout and "per layer" in run.stdout
    (result,) = json.loads(out.read_text())
    assert result["layers"] == 2 and result["hidden"] == 128 and result["heads"] == 2
    # BERT eager, bf16, CPU: 36 sbh + 6 a s^2 b + the LayerNorm statistics (2 x 2 values of 2 bytes per token)
    s, b, h, a = 32, 2, 128, 2
    expected = 36 * s * b * h + 6 * a * s * s * b + 8 * s * b
    assert result["per_layer_bytes"] == [expected, expected]
    assert result["sbh_per_layer"] == pytest.approx(expected / (s * b * h))
    assert result["total_bytes"] == sum(result["per_layer_bytes"]) + result["outside_layers_bytes"]


@pytest.mark.parametrize("arch", presets.ARCHS)
def test_every_arch_profiles_with_per_layer_figures(arch):
    p = profile(arch, "tiny", seq=16, batch=2, dtype="fp32", layers=3)
    assert p.layers == 3 and len(p.per_layer_bytes) == 3
    # layer 0 is also charged for what all layers share (Llama's rotary cos/sin): first saver pays
    assert len(set(p.per_layer_bytes[1:])) == 1 and p.per_layer_bytes[0] >= p.per_layer_bytes[1] > 0
    assert p.bytes_per_layer == p.per_layer_bytes[1]
    assert p.outside_layers_bytes > 0          # embeddings, LM head and loss
    assert sum(p.layer_by_op.values()) == p.per_layer_bytes[1]


def test_sdpa_and_user_data(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    eager = profile("bert", "tiny", seq=16, batch=2, dtype="fp32", data=str(text))
    sdpa = profile("bert", "tiny", seq=16, batch=2, dtype="fp32", attn="sdpa", data=str(text))
    assert eager.attn == "eager" and sdpa.attn == "sdpa"
    # with attention dropout on, CPU SDPA takes its math path: other ops, the same bytes as eager
    assert "SafeSoftmaxBackward0" in sdpa.layer_by_op and "SoftmaxBackward0" in eager.layer_by_op
    assert sdpa.per_layer_bytes == eager.per_layer_bytes


@pytest.mark.parametrize("argv,message", [
    (["profile", "--seq", "0"], "seq=0"),
    (["profile", "--layers", "0", "--seq", "8"], "layers=0"),
    (["profile", "--data", "/nonexistent/corpus.txt", "--seq", "8"], "/nonexistent/corpus.txt"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_choice_lists_allowed_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--arch", "t5"])
    assert exc.value.code == 2
    assert "bert" in capsys.readouterr().err


def test_profile_with_tempo_and_each_technique(tmp_path):
    out = tmp_path / "cmp.json"
    assert main(["profile", "--arch", "bert", "--size", "tiny", "--seq", "32", "--batch", "2", "--tempo",
                 "--techniques", "--json", str(out)]) == 0
    runs = {r["variant"]: r for r in json.loads(out.read_text())}
    assert list(runs)[:2] == ["baseline", "tempo_ds"] and len(runs) == 11
    assert runs["baseline"]["tempo"] is None and runs["tempo_ds"]["tempo"]["gelu"] == "recompute"
    s, b, h, a, i = 32, 2, 128, 2, 512
    # all exact techniques: LayerNorm outputs, q, k, v, attention output, GELU input (bf16) + rstd and lse (fp32)
    k = side_columns(h, True)  # + each LayerNorm's side buffer: bf16 xhat of k columns, their int64 indices
    assert runs["tempo_ds"]["per_layer_bytes"][1] == (2 * s * b * (6 * h + i) + 4 * s * b * 2 + 4 * b * a * s
                                                      + 2 * (2 * s * b * k + 8 * k))
    for name, run in runs.items():
        if name in ("only silu=fewbit (2 bit)", "only mlp=recompute"):  # BERT has no SiLU, no gated MLP
            assert run["bytes_per_layer"] == runs["baseline"]["bytes_per_layer"]
        elif name != "baseline":
            assert run["bytes_per_layer"] < runs["baseline"]["bytes_per_layer"], name


def test_bad_tempo_config_fails_before_any_model_is_built(capsys):
    assert main(["profile", "--tempo_config", '{"gelu": "fast"}']) == 2
    err = capsys.readouterr().err
    assert "gelu" in err and "'inplace', 'recompute', 'fewbit' or 'off'" in err


def test_sizes_are_checked_per_arch():
    assert presets.model_config("gpt2", "medium").n_layer == 24
    with pytest.raises(ValueError, match="size='medium' is not defined for bert; allowed values: tiny, base, large"):
        presets.model_config("bert", "medium")

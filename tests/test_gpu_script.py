"""bench/gpu.py in --smoke mode (tiny sizes, the kernels under Triton's interpreter, derived memory): it runs,
writes gpu.json and gpu.md with every row and field, and its figures agree with each other."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
OPS = ["inplace_gelu", "inplace_gelu tanh", "gelu_linear", "inplace_layer_norm", "inplace_rms_norm",
       "attention (lean), dropout 0.1", "seed_dropout p=0.1", "fewbit gelu 2-bit"]
NOT_COMPARABLE = {"attention (lean), dropout 0.1", "seed_dropout p=0.1", "fewbit gelu 2-bit"}  # other masks / table
MODELS = ["BERT tiny", "GPT-2 tiny"]
RUNS = ["HF eager", "HF sdpa", "tempo_ds"]


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself on a machine without CUDA
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    run = run_script(out)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_smoke_writes_both_files_and_prints_the_markdown(smoke):
    run, doc, md = smoke
    assert run.stdout.strip() == md.strip()
    assert doc["smoke"] is True and doc["notes"] == []
    assert doc["card"].startswith("CPU") and doc["torch"] and doc["triton"] and doc["transformers"]
    assert 0 < doc["elapsed_s"] < doc["budget_s"] == 450
    for needle in [doc["date"], doc["card"], f"torch {doc['torch']}", f"triton {doc['triton']}",
                   "| op | replaces |", "| model | run |", "largest micro-batch"]:
        assert needle in md


def test_kernel_rows(smoke):
    _, doc, md = smoke
    rows = doc["kernels"]["rows"]
    assert [r["op"] for r in rows] == OPS and doc["kernels"]["dtype"] == "fp16"
    for r in rows:
        assert f"| {r['op']} | {r['torch_op']} |" in md
        paths = ["pytorch", "torch"] if r["op"] == "gelu_linear" else ["triton", "pytorch", "torch"]
        for name in ["triton", "pytorch", "torch"]:
            assert (r[f"{name}_ms"] is not None) == (name in paths), (r["op"], name)
            errs = [r[f"{name}_out_err"], r[f"{name}_grad_err"]]
            if name not in paths or (name == "torch" and r["op"] in NOT_COMPARABLE):
                assert errs == [None, None], (r["op"], name)
                continue
            # fp16 against float64: a few units in the last place; in-place GELU's gradient inverts a rounded
            # output, so it is allowed its larger floor (DESIGN.md section 8)
            assert all(math.isfinite(e) and 0 <= e < 0.05 for e in errs), (r["op"], name, errs)
        if "triton" in paths:
            # the kernel and the PyTorch path compute the same maths in the same precision
            assert r["triton_out_err"] <= 2 * r["pytorch_out_err"] + 1e-3, r
            assert r["triton_grad_err"] <= 2 * r["pytorch_grad_err"] + 1e-3, r
        assert all(r[f"{name}_ms"] > 0 for name in paths)


def test_model_rows_and_ratios(smoke):
    _, doc, md = smoke
    models = doc["models"]
    assert models["method"] == "derived" and models["seq"] == 64 and models["equal_batch"] == 2
    rows = {(r["model"], r["variant"]): r for r in models["rows"]}
    assert sorted(rows) == sorted((m, v) for m in MODELS for v in RUNS)
    budget = models["budget_bytes"]
    for (model, variant), r in rows.items():
        assert r["method"] == "derived"
        trials = {t["batch"]: t for t in r["trials"]}
        equal = trials[2]
        assert (r["equal_peak_bytes"], r["equal_tokens_per_s"]) == (equal["peak_bytes"], equal["tokens_per_s"])
        largest = trials[r["largest_batch"]]
        assert largest["fits"] and largest["peak_bytes"] == r["largest_peak_bytes"] <= budget
        assert r["largest_tokens_per_s"] == largest["tokens_per_s"] > 0
        assert not trials[r["largest_batch"] + 1]["fits"]  # the budget, not the smoke's max_batch, stopped it
        assert f"| {model} | {variant} |" in md
    ratios = {(r["model"], r["variant"]): r for r in models["ratios"]}
    assert sorted(ratios) == sorted((m, v) for m in MODELS for v in RUNS if v != "HF eager")
    for (model, variant), q in ratios.items():
        r, base = rows[(model, variant)], rows[(model, "HF eager")]
        assert q["largest_batch"] == pytest.approx(r["largest_batch"] / base["largest_batch"])
        assert q["equal_peak_bytes"] == pytest.approx(r["equal_peak_bytes"] / base["equal_peak_bytes"])
        assert q["largest_tokens_per_s"] == pytest.approx(r["largest_tokens_per_s"] / base["largest_tokens_per_s"])
    # tempo_ds saves activations: less memory at the same batch, at least as large a batch in the same budget
    for model in MODELS:
        assert ratios[(model, "tempo_ds")]["equal_peak_bytes"] < 1
        assert rows[(model, "tempo_ds")]["largest_batch"] >= rows[(model, "HF eager")]["largest_batch"]


def test_deadline_skips_with_notes(tmp_path):
    run = run_script(tmp_path, "--budget_s", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["kernels"]["rows"] == [] and doc["models"]["rows"] == []
    assert len(doc["notes"]) == len(OPS) + len(MODELS) * len(RUNS)
    assert all("skipped" in n for n in doc["notes"])
    assert "Notes:" in (tmp_path / "gpu.md").read_text()

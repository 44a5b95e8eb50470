"""tempo-ds bench-gpu (tempo_ds.bench.gpu) in --smoke mode (tiny sizes, the kernels under Triton's interpreter,
derived memory): it runs, writes gpu.json and gpu.md with every row and field, its figures agree with each other
and the Triton path really ran the kernels; the gated-MLP bitwise check, the attention dispatch table, the AOT
check (gated MLP, sm_90) and the compile phase (aot_eager) run; the CUDA-only phases say so. Plus its error paths
(a failing op, a broken install), the report of a search cut short and of the sections only CUDA fills."""
import copy
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODULE = "tempo_ds.bench.gpu"
OPS = ["inplace_gelu", "inplace_gelu tanh", "gelu_linear", "inplace_layer_norm", "inplace_rms_norm",
       "qk_norm_rope (Qwen3 q)", "attention (lean), dropout 0.1", "seed_dropout p=0.1", "fewbit gelu 2-bit", "gated_mlp silu",
       "gated_mlp gelu_tanh, fused gate_up", "moe_experts E=8 k=2", "linear_cross_entropy V=512"]
NO_KERNEL = {"gelu_linear", "moe_experts E=8 k=2", "linear_cross_entropy V=512"}
NOT_COMPARABLE = {"attention (lean), dropout 0.1", "seed_dropout p=0.1", "fewbit gelu 2-bit"}  # other masks / table
KERNELS = {"inplace_gelu": ["gelu.backward", "gelu.forward"], "inplace_gelu tanh": ["gelu.backward", "gelu.forward"],
           "inplace_layer_norm": ["layer_norm.norm_backward", "layer_norm.norm_forward"],
           "inplace_rms_norm": ["layer_norm.norm_backward", "layer_norm.norm_forward"],
           "qk_norm_rope (Qwen3 q)": ["layer_norm.norm_backward", "layer_norm.norm_forward"],
           "attention (lean), dropout 0.1": ["attention.attention_backward", "attention.attention_forward"],
           "seed_dropout p=0.1": ["dropout.apply_seed_mask"],
           "fewbit gelu 2-bit": ["fewbit.backward", "fewbit.forward"],
           "gated_mlp silu": ["gated_mlp.backward", "gated_mlp.forward"],
           "gated_mlp gelu_tanh, fused gate_up": ["gated_mlp.backward", "gated_mlp.forward"]}
MODELS = ["BERT tiny", "Llama tiny", "GPT-2 tiny"]
# (the smoke runs HF sdpa on Llama only; Llama's Liger run needs CUDA: skipped with a reason)
RUNS = {"BERT tiny": ["HF eager", "tempo_ds"], "Llama tiny": ["HF sdpa", "tempo_ds"],
        "GPT-2 tiny": ["HF eager", "tempo_ds"]}


def load_script():
    return importlib.import_module(MODULE)


def run_script(out: Path, *args: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}  # the CPU, even on a GPU host
    for name in ("TRITON_INTERPRET", "TEMPO_DS_TRITON"):  # the script sets the first itself without CUDA
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", MODULE, "--smoke", "--out", str(out), *args], capture_output=True,
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
    assert doc["smoke"] is True and doc["notes"] == [] and doc["tempo_ds_triton"] is None
    assert doc["card"].startswith("CPU") and doc["torch"] and doc["triton"] and doc["transformers"]
    assert doc["python"] == ".".join(map(str, sys.version_info[:3]))
    assert 0 < doc["elapsed_s"] < doc["budget_s"] == 450
    for needle in [doc["date"], doc["card"], f"Python {doc['python']}", f"torch {doc['torch']}",
                   f"triton {doc['triton']}", "TEMPO_DS_TRITON: unset", "| op | replaces |", "| model | params | run |",
                   "largest micro-batch", f"Vocabulary {doc['models']['vocab']}"]:
        assert needle in md
    assert ">=" not in md and "x |" in md and "-x" not in md


def test_kernel_rows(smoke):
    _, doc, md = smoke
    rows = doc["kernels"]["rows"]
    assert [r["op"] for r in rows] == OPS and doc["kernels"]["dtype"] == "fp16" and doc["kernels"]["passes"] == 1
    for r in rows:
        paths = ["pytorch", "torch"] if r["op"] in NO_KERNEL else ["triton", "pytorch", "torch"]
        # the Triton path called the op's kernel launchers, forward and backward; the others called none
        assert r["triton_kernels"] == KERNELS.get(r["op"]), r["op"]
        assert r["pytorch_kernels"] == r["torch_kernels"] == [], r["op"]
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['op']} | {r['torch_op']} |"))
        assert line.endswith(f"| {', '.join(KERNELS[r['op']]) if r['op'] in KERNELS else '-'} |"), line
        for name in ["triton", "pytorch", "torch"]:
            assert (r[f"{name}_ms"] is not None) == (name in paths), (r["op"], name)
            errs = [r[f"{name}_out_err"], r[f"{name}_grad_err"]]
            if name not in paths or (name == "torch" and r["op"] in NOT_COMPARABLE):
                assert errs == [None, None], (r["op"], name)
                continue
            # fp16 against float64: a few units in the last place; in-place GELU's gradient inverts a rounded
            # output, so it is allowed its larger floor (DESIGN.md section 8)
            assert all(math.isfinite(e) and 0 <= e < 0.1 for e in errs), (r["op"], name, errs)
        if "triton" in paths:
            # the kernel and the PyTorch path compute the same maths in the same precision
            assert r["triton_out_err"] <= 2 * r["pytorch_out_err"] + 1e-3, r
            assert r["triton_grad_err"] <= 2 * r["pytorch_grad_err"] + 1e-3, r
        assert all(r[f"{name}_ms"] > 0 for name in paths)


def test_model_rows_and_ratios(smoke):
    _, doc, md = smoke
    models = doc["models"]
    assert models["method"] == "derived" and models["seq"] == 64 and models["equal_batch"] == 2
    assert models["vocab"] == 8192
    rows = {(r["model"], r["variant"]): r for r in models["rows"]}
    # every model's baseline and tempo_ds first (Llama first); then Liger (skipped here)
    assert [(r["model"], r["variant"]) for r in models["rows"]] == [
        ("Llama tiny", "HF sdpa"), ("Llama tiny", "tempo_ds"), ("BERT tiny", "HF eager"), ("BERT tiny", "tempo_ds"),
        ("GPT-2 tiny", "HF eager"), ("GPT-2 tiny", "tempo_ds")]
    assert models["skipped"] == [{"model": "Llama tiny", "variant": "Liger",
                                  "reason": "skipped: needs CUDA (Liger-Kernel's Triton kernels do not run on "
                                            "the CPU)"}]
    assert "- Llama tiny Liger: skipped: needs CUDA" in md
    budget = models["budget_bytes"]
    for (model, variant), r in rows.items():
        assert r["method"] == "derived" and r["complete"] is True
        trials = {t["batch"]: t for t in r["trials"]}
        assert all(t["params"] == r["params"] > 0 and t["wall_s"] > 0 and t["alloc_retries"] is None
                   for t in r["trials"])
        assert r["search_s"] == pytest.approx(sum(t["wall_s"] for t in r["trials"]))
        equal = trials[2]
        assert (r["equal_peak_bytes"], r["equal_tokens_per_s"]) == (equal["peak_bytes"], equal["tokens_per_s"])
        largest = trials[r["largest_batch"]]
        assert largest["fits"] and largest["peak_bytes"] == r["largest_peak_bytes"] <= budget
        assert r["largest_tokens_per_s"] == largest["tokens_per_s"] > 0
        assert not trials[r["largest_batch"] + 1]["fits"]  # the budget, not the smoke's max_batch, stopped it
        assert f"| {model} | {r['params'] / 1e6:.1f}M | {variant} |" in md
    ratios = {(r["model"], r["variant"]): r for r in models["ratios"]}
    assert sorted(ratios) == sorted((m, v) for m in MODELS for v in RUNS[m][1:])
    for (model, variant), q in ratios.items():
        r, base = rows[(model, variant)], rows[(model, RUNS[model][0])]
        assert q["baseline"] == r["baseline"] == RUNS[model][0]
        assert q["largest_batch"] == pytest.approx(r["largest_batch"] / base["largest_batch"])
        assert q["equal_peak_bytes"] == pytest.approx(r["equal_peak_bytes"] / base["equal_peak_bytes"])
        assert q["largest_tokens_per_s"] == pytest.approx(r["largest_tokens_per_s"] / base["largest_tokens_per_s"])
    # tempo_ds saves activations: less memory at the same batch, at least as large a batch in the same budget
    for model in MODELS:
        assert ratios[(model, "tempo_ds")]["equal_peak_bytes"] < 1
        assert rows[(model, "tempo_ds")]["largest_batch"] >= rows[(model, RUNS[model][0])]["largest_batch"]


def test_gated_mlp_bitwise_attention_aot_sync_compile(smoke):
    _, doc, md = smoke
    bitwise = doc["kernels"]["gated_mlp_bitwise"]
    assert bitwise["status"] == "ran" and len(bitwise["rows"]) == 2 * 2 * 2  # fp32/fp16 x silu/gelu_tanh x layouts
    for r in bitwise["rows"]:
        # the interpreter's exp is NumPy's, so not bitwise here; the PyTorch path is HF's ops exactly
        assert r["pytorch_equals_hf"] and r["kernels"] == ["gated_mlp.backward", "gated_mlp.forward"], r
        assert r["max_diff_eps"] < 16 and r["err_vs_hf_x"] < 4, r
    gpu = load_script()
    rows = doc["kernels"]["attention"]
    assert [(r["case"], r["impl"]) for r in rows] == [(c[0], i) for c in gpu.ATTENTION_CASES
                                                      for i in gpu.ATTENTION_IMPLS]
    for r in rows:
        ours = r["impl"] != "HF sdpa (F.sdpa)"
        # on the CPU the dispatch has no SDPA backend: both of ours run the Triton kernel (interpreter)
        assert r["backend"] == ("triton" if ours else "F.sdpa (its own choice)"), r
        assert r["kernels"] == (["attention.attention_backward", "attention.attention_forward"] if ours else []), r
        if ours or r["dropout"] == 0:
            assert 0 <= r["out_err"] < 0.01 and 0 <= r["grad_err"] < 0.01, r
        else:
            assert r["out_err"] is None and r["grad_err"] is None, r
        assert r["ms"] > 0
    assert doc["aot"]["status"] == "ran" and doc["aot"]["arch"] == 90 and doc["aot"]["failures"] == []
    n = doc["aot"]["specializations"]  # the gated MLP's CI subset (kernels/gated_mlp.py decides how many)
    assert n >= 1 and len(doc["aot"]["rows"]) == n and f"| gated_mlp | sm_90 | {n} | 0 |" in md
    assert doc["aot"]["matrix"] == "ci" and doc["kernels"]["launched"] == {
        "status": "skipped: needs CUDA (the interpreter compiles nothing)", "rows": []}
    assert doc["sync"] == {"status": "skipped: needs CUDA", "rows": []}
    c = doc["compile"]
    assert c["status"] == "ran" and c["backend"] == "aot_eager" and c["graphs"] == 1 and c["graph_breaks"] == 0, c
    assert c["graphs_after_timing"] == 1 and c["grads_missing"] == 0
    assert c["max_grad_diff"] <= 1e-6 * c["max_abs_grad"] and c["eager_tokens_per_s"] > 0 < c["compiled_tokens_per_s"]
    for heading in ["### Gated MLP", "### Attention", "### Ahead-of-time", "## Sync check", "## torch.compile"]:
        assert heading in md


def test_report_of_a_stopped_search_and_allocator_retries(smoke):
    """What a CUDA run cut short would write: '>=' for a stopped search, '-' for the ratios it makes
    meaningless, '*' on the figures of a trial whose allocator retried."""
    gpu = load_script()
    doc = copy.deepcopy(smoke[1])
    rows = {(r["model"], r["variant"]): r for r in doc["models"]["rows"]}
    stopped, retried = rows[("BERT tiny", "tempo_ds")], rows[("GPT-2 tiny", "HF eager")]
    stopped["complete"] = False
    retried["equal_alloc_retries"] = 3
    doc["models"]["ratios"] = ratios = {(q["model"], q["variant"]): q for q in gpu.ratios(doc["models"]["rows"])}
    q = ratios[("BERT tiny", "tempo_ds")]
    assert q["largest_batch"] is None and q["largest_tokens_per_s"] is None
    assert q["equal_peak_bytes"] == pytest.approx(stopped["equal_peak_bytes"] / rows[("BERT tiny", "HF eager")]
                                                  ["equal_peak_bytes"])
    doc["models"]["ratios"] = list(ratios.values())
    md = gpu.markdown(doc)
    assert f"| >= {stopped['largest_batch']} |" in md and "a search stopped by the deadline" in md
    assert (f"| BERT tiny | tempo_ds | HF eager | - | {q['equal_tokens_per_s']:.2f}x | - | "
            f"{q['equal_peak_bytes']:.2f}x |") in md
    assert f"| {retried['equal_peak_bytes'] / 2**30:.3g}* |" in md and "-x" not in md


def test_report_of_the_cuda_only_sections(smoke):
    """What only a CUDA run fills in (sync rows, kernels launched, an AOT failure, a Liger row measured at the
    equal batch only) renders: a report that raised would lose the whole run's figures."""
    gpu = load_script()
    doc = copy.deepcopy(smoke[1])
    doc["sync"] = {"status": "ran", "rows": [
        {"model": "Llama-3 small", "variant": "HF sdpa", "status": "ran", "forward_backward": "passed",
         "optimizer_step": "passed"},
        {"model": "Llama-3 small", "variant": "tempo_ds", "status": "ran", "forward_backward": "failed",
         "forward_backward_error": "RuntimeError: called a synchronizing CUDA operation",
         "forward_backward_where": "tempo_ds/ops/x.py:1 in f: y.item()", "optimizer_step": "passed"},
        {"model": "BERT-Large, 2 layers", "variant": "HF sdpa",
         "status": "skipped: its share of --budget_s was spent"}]}
    doc["kernels"]["launched"] = {"status": "ran", "rows": [
        {"module": "gated_mlp", "kernel": "gated_forward_kernel", "device": "0", "specialization": "k",
         "num_warps": 4, "num_stages": 3, "shared": 0, "regs": 40, "spills": 0}]}
    doc["aot"]["failures"] = [{"name": "attention.fwd[fp32,d128]", "error": None, "shared": 250000, "limit": 232448}]
    llama = next(r for r in doc["models"]["rows"] if r["model"] == "Llama tiny")
    liger = dict(llama, variant="Liger", searched=False, largest_batch=None, largest_peak_bytes=None,
                 largest_tokens_per_s=None, trials=llama["trials"][:1])
    doc["models"]["rows"].append(liger)
    doc["models"]["ratios"] = gpu.ratios(doc["models"]["rows"])
    q = next(r for r in doc["models"]["ratios"] if r["variant"] == "Liger")
    assert q["largest_batch"] is None and q["equal_peak_bytes"] == pytest.approx(1.0)
    md = gpu.markdown(doc)
    assert "| Llama-3 small | HF sdpa | passed | passed | - |" in md
    assert ("| Llama-3 small | tempo_ds | failed | passed | RuntimeError: called a synchronizing CUDA operation at "
            "tempo_ds/ops/x.py:1 in f: y.item() |") in md
    assert "| BERT-Large, 2 layers | HF sdpa | skipped: its share of --budget_s was spent | - | - |" in md
    assert "| gated_mlp | gated_forward_kernel | 4 | 3 | 0.0 | 40 | 0 |" in md
    assert "- failed: attention.fwd[fp32,d128]: exceeds shared memory" in md
    assert "| Llama tiny | 2.5M | Liger |" in md and "- (equal batch only)" in md


def test_a_failing_op_is_a_note_and_the_others_still_run(tmp_path):
    gpu = load_script()
    cases = gpu.kernel_cases(gpu.SMOKE, torch.float32, torch.device("cpu"), seed=0)
    good = next(c for c in cases if c.op == "gelu_linear")
    x, w, b = good.inputs
    bad = dataclasses.replace(good, op="gelu_linear, mismatched shapes", inputs=[x, w[:, :-1], b])
    notes, rows, saves = [], [], []
    gpu.kernel_phase([bad, good], gpu.SMOKE, torch.device("cpu"), math.inf, notes, rows, lambda: saves.append(1))
    assert [r["op"] for r in rows] == ["gelu_linear"] and rows[0]["pytorch_ms"] > 0 and len(saves) == 2
    assert len(notes) == 1 and notes[0].startswith("kernels: gelu_linear, mismatched shapes failed: RuntimeError: ")
    assert "cannot be multiplied" in notes[0]


def test_a_broken_install_is_a_clear_error_before_anything_runs(tmp_path):
    planted = tmp_path / "planted" / "triton"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("raise ImportError('planted: no triton here')\n")
    run = run_script(tmp_path / "out",
                     PYTHONPATH=os.pathsep.join([str(planted.parent), os.environ.get("PYTHONPATH", "")]))
    assert run.returncode == 2 and not (tmp_path / "out").exists()
    assert "error: triton does not import (ImportError: planted: no triton here)" in run.stderr


def test_deadline_skips_with_notes(tmp_path):
    run = run_script(tmp_path, "--budget_s", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["kernels"]["rows"] == [] and doc["models"]["rows"] == [] and doc["models"]["ratios"] == []
    gpu = load_script()
    assert len(doc["notes"]) == len(OPS) + len(gpu.ATTENTION_CASES) + sum(map(len, RUNS.values()))
    assert all("skipped" in n for n in doc["notes"])
    assert doc["kernels"]["gated_mlp_bitwise"]["status"].startswith("skipped")
    assert doc["aot"]["status"].startswith("skipped") and doc["compile"]["status"].startswith("skipped")
    assert "Notes:" in (tmp_path / "gpu.md").read_text()


def test_preflight_names_the_missing_kernel_module_and_the_install_step(monkeypatch):
    gpu = load_script()
    assert gpu.preflight() is None
    monkeypatch.setitem(sys.modules, "tempo_ds.kernels.layer_norm", None)  # import raises ImportError
    problem = gpu.preflight()
    assert problem.startswith("tempo_ds.kernels.layer_norm does not import (ModuleNotFoundError: ")
    assert "pip install --no-deps --no-build-isolation -e ." in problem
    monkeypatch.undo()
    import tempo_ds.kernels.dropout as dropout

    monkeypatch.delattr(dropout, "apply_seed_mask")
    assert gpu.preflight() == "tempo_ds.kernels.dropout has no apply_seed_mask: KERNEL_ENTRY_POINTS is out of date"

"""The largest-micro-batch search: the pure search against known thresholds, and the real search on CPU
(one trial process per batch, derived peak memory) checked against figures computed here independently;
a search cut short by its deadline returns what it measured. Every trial runs on device="cpu", so the
figures are the derived ones on a machine with a GPU too."""
import itertools
import re
import time

import pytest
import torch

from tempo_ds import presets
from tempo_ds.bench.max_batch import TRIAL_KEYS, binary_search, largest_micro_batch, run_trial
from tempo_ds.bench.trial import STATE_BYTES_PER_PARAM
from tempo_ds.data import load_tokenizer, sample_batch
from tempo_ds.inject import inject
from tempo_ds.memory import SavedTensorMeter

SPEC = {"arch": "bert", "size": "tiny", "seq": 32, "dtype": "bf16", "attn": "eager", "layers": None, "tempo": {}}


def threshold_predicate(threshold: int):
    probes = []

    def fits(batch: int) -> bool:
        probes.append(batch)
        return batch <= threshold
    return fits, probes


@pytest.mark.parametrize("max_batch", [1, 2, 7, 64, 100])
def test_binary_search_finds_every_threshold_from_any_guess(max_batch):
    thresholds = sorted({0, 1, max_batch // 2, max_batch - 1, max_batch})
    guesses = sorted({-3, 1, 2, max_batch // 3, max_batch, max_batch + 10})
    for threshold, guess in itertools.product(thresholds, guesses):
        fits, probes = threshold_predicate(threshold)
        assert binary_search(fits, max_batch, guess=guess) == threshold, (threshold, guess)
        assert all(1 <= b <= max_batch for b in probes), probes
        assert len(probes) == len(set(probes)), f"a batch was tried twice: {probes}"


def test_binary_search_grows_exponentially_then_bisects():
    fits, probes = threshold_predicate(5)
    assert binary_search(fits, 64) == 5
    assert probes == [1, 2, 4, 8, 6, 5]
    fits, probes = threshold_predicate(40)  # a right guess costs two probes: it fits, the next does not
    assert binary_search(fits, 64, guess=40) == 40 and probes == [40, 41]
    fits, probes = threshold_predicate(37)  # from above: steps of 1, 2, 4, ... down, then bisect
    assert binary_search(fits, 64, guess=40) == 37 and probes == [40, 39, 37, 38]
    fits, probes = threshold_predicate(0)
    assert binary_search(fits, 64) == 0 and probes == [1]
    with pytest.raises(ValueError, match="max_batch=0"):
        binary_search(fits, 0)


@pytest.fixture(scope="module")
def derived_peaks():
    """16 B/parameter + the bytes saved in a bf16-autocast forward, for batches 1..6, computed here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    model = presets.build_model("bert", "tiny", vocab_size=len(tok), max_seq=SPEC["seq"], attn="eager")
    inject(model, {})
    model.train()
    states = STATE_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
    peaks = {}
    for batch in range(1, 7):
        inputs = sample_batch("bert", tok, SPEC["seq"], batch, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorMeter(model) as meter:
            model(**inputs)
        peaks[batch] = states + meter.total_bytes
    torch.set_num_threads(threads)
    return peaks


def test_trial_process_reports_the_derived_peak(derived_peaks, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = run_trial(SPEC, 2, device="cpu")
    assert r["method"] == "derived" and r["device"] == "cpu" and r["fits"] and not r["oom"]
    assert "alloc_retries" not in r  # a CUDA allocator figure
    assert r["peak_bytes"] == STATE_BYTES_PER_PARAM * r["params"] + r["saved_bytes"] == derived_peaks[2]
    assert r["tokens_per_s"] == pytest.approx(2 * SPEC["seq"] / r["step_s"])


def test_largest_micro_batch_on_cpu_matches_the_independent_figures(derived_peaks, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    budget = (derived_peaks[3] + derived_peaks[4]) // 2
    found = largest_micro_batch(SPEC, budget, max_batch=64, device="cpu")
    assert found["batch"] == 3 and found["method"] == "derived" and found["budget_bytes"] == budget
    assert found["complete"] is True and found["stopped"] is None
    assert found["peak_bytes"] == derived_peaks[3]
    by_batch = {t["batch"]: t for t in found["trials"]}
    assert by_batch[3]["fits"] and not by_batch[4]["fits"]  # the answer fits, the next batch does not
    for t in found["trials"]:
        assert set(t) == set(TRIAL_KEYS)
        assert t["peak_bytes"] == derived_peaks[t["batch"]]
        assert t["fits"] == (t["peak_bytes"] <= budget)
        assert t["params"] > 0 and t["wall_s"] > t["step_s"] > 0 and t["alloc_retries"] is t["ooms"] is None
    # trials at 1 and 2 predict the answer from the (linear) peaks: then one trial on each side
    assert [t["batch"] for t in found["trials"]] == [1, 2, 3, 4]
    # in this process (the smoke benchmark's way) the derived figures are the same
    here = largest_micro_batch(SPEC, budget, max_batch=64, isolate=False, device="cpu")
    assert [(t["batch"], t["fits"], t["peak_bytes"]) for t in here["trials"]] == \
        [(t["batch"], t["fits"], t["peak_bytes"]) for t in found["trials"]]


def test_largest_micro_batch_edges(derived_peaks):
    found = largest_micro_batch(SPEC, derived_peaks[1] - 1, isolate=False, device="cpu")
    assert found["batch"] == 0 and found["peak_bytes"] is None
    assert [(t["batch"], t["fits"]) for t in found["trials"]] == [(1, False)]
    found = largest_micro_batch(SPEC, 10 * derived_peaks[6], max_batch=5, start=2, isolate=False, device="cpu")
    assert found["batch"] == 5 and found["trials"][-1]["batch"] == 5 and found["peak_bytes"] == derived_peaks[5]


def test_trial_errors_are_clear():
    with pytest.raises(RuntimeError, match=r"(?s)trial at batch 1 .*failed \(exit 2\).*arch='nope' is not supported"):
        largest_micro_batch({**SPEC, "arch": "nope"}, 10**9, device="cpu")
    with pytest.raises(ValueError, match=r"unknown keys \['batch'\]"):
        largest_micro_batch({**SPEC, "batch": 4}, 10**9)
    with pytest.raises(ValueError, match="budget_bytes=0"):
        largest_micro_batch(SPEC, 0)
    # a CUDA peak measured in this process would include its own allocations
    with pytest.raises(ValueError, match=r"isolate=False .* only device='cpu' allows \(got 'cuda'\)"):
        largest_micro_batch(SPEC, 10**9, isolate=False, device="cuda")
    # a trial past its own timeout (not the search's deadline) is a hung trial: an error, not a result
    with pytest.raises(TimeoutError, match=r"trial at batch 1 .* timed out after 0.3 s"):
        largest_micro_batch(SPEC, 10**9, timeout_s=0.3, device="cpu")


def stopped_search(**kwargs) -> dict:
    found = largest_micro_batch(SPEC, 10**9, start=2, device="cpu", **kwargs)
    assert found["complete"] is False and found["trials"] == [] and found["method"] is None
    assert (found["batch"], found["peak_bytes"], found["tokens_per_s"]) == (0, None, None)
    return found


def test_a_search_past_its_deadline_returns_what_it_has():
    found = stopped_search(deadline=time.monotonic() - 1, isolate=False)
    assert found["stopped"] == "the deadline passed before the trial at batch 2"
    found = stopped_search(deadline=time.monotonic() + 60, trial_s=100)  # a trial would not finish in time
    assert found["stopped"] == "60 s before the deadline, too little for the trial at batch 2 (one takes about 100 s)"
    # a trial process still running at the deadline is stopped; importing torch alone takes longer
    found = stopped_search(deadline=time.monotonic() + 0.3)
    assert re.fullmatch(r"the trial at batch 2 was still running at the deadline, after \d+\.\d s", found["stopped"])

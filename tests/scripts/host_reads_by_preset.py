"""The CPU stand-in for ``tempo-ds bench-gpu``'s sync check: which tiny presets read a tensor value on the host
in a training step (forward + backward after one warm-up step), under the suite's ``NoHostReads`` dispatch mode.
Three rows per preset: HF sdpa without an attention mask (BERT, Llama, Mixtral) or with the all-ones mask (the
others), tempo_ds's defaults the same way, and tempo_ds with ``mask_check="never"`` given the all-ones mask.

    PYTHONPATH=.:tests .venv/bin/python tests/scripts/host_reads_by_preset.py
"""
import traceback

import torch

from helpers import NoHostReads
from tempo_ds.bench.gpu import _training_setup

PRESETS = ("llama", "bert", "gpt2", "qwen3", "gemma", "mixtral", "roberta")
WITHOUT_MASK = ("llama", "bert", "mixtral")


def step(model, inputs) -> str:
    """``none`` or where the first host read happened."""
    model(**inputs).loss.backward()  # warm-up: lazy initialisation may read once
    try:
        with NoHostReads():
            model(**inputs).loss.backward()
    except AssertionError as e:  # the aten op, and where: the innermost frame outside torch and this test helper
        where = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename
                 and not f.filename.endswith("helpers.py")]
        return f"read ({str(e).rsplit(' ', 1)[-1]}) at {where[-1].filename.rsplit('site-packages/', 1)[-1]}:" \
               f"{where[-1].lineno} in {where[-1].name}"
    return "none"


def main() -> None:
    cpu = torch.device("cpu")
    for arch in PRESETS:
        for label, tempo, keep_mask in (("HF sdpa", None, arch not in WITHOUT_MASK),
                                        ("tempo_ds default", {}, arch not in WITHOUT_MASK),
                                        ("tempo_ds mask_check=never", {"mask_check": "never"}, True)):
            model, _, inputs = _training_setup(arch, "tiny", 1, 32, 2, tempo, cpu)
            if keep_mask:
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            else:
                inputs.pop("attention_mask", None)
            mask = "all-ones mask" if keep_mask else "no mask"
            print(f"{arch:8s} {label:26s} {mask:14s} {step(model, inputs)}")


if __name__ == "__main__":
    main()

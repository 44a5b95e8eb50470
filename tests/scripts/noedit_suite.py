"""Several unedited training scripts in one process (no tempo_ds code here either), to keep CI to one launch:

    deepspeed --num_gpus 2 --module tempo_ds.run noedit_suite.py OUT

OUT holds the DeepSpeed configs tests/test_runner.py wrote (ds_zero2.json, ds_zero3.json, ds_direct.json,
ds_pipe.json, ds_bad.json). In order, each as its own command line would run it: noedit_trainer.py under ZeRO-2
and under ZeRO-3, noedit_direct.py with --tempo_gelu inplace after the script (its parser calls
deepspeed.add_config_arguments); then deepspeed.initialize with a config whose "tempo" section is bad, and with a
DeepSpeed PipelineModule and a config that asks for tempo_ds (the exceptions are recorded). Each rank writes
OUT/suite.rank<N>.json: the argv it got (the launcher's --local_rank included) and what the two calls raised; the
scripts write their own losses.
"""
import json
import os
import sys

import deepspeed
import torch

import noedit_direct
import noedit_trainer

STEPS = 3


def trainer_argv(out: str, stage: int, local_rank: list[str]) -> list[str]:
    return [*local_rank, "--deepspeed", os.path.join(out, f"ds_zero{stage}.json"), "--use_cpu", "--bf16",
            "--output_dir", os.path.join(out, "trainer"), "--max_steps", str(STEPS), "--per_device_train_batch_size",
            "2", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
            "--seed", "0", "--losses_json", os.path.join(out, f"trainer_zero{stage}")]


def direct_argv(out: str, local_rank: list[str]) -> list[str]:
    return [*local_rank, "--deepspeed", "--deepspeed_config", os.path.join(out, "ds_direct.json"), "--tempo_gelu",
            "inplace", "--steps", str(STEPS), "--losses_json", os.path.join(out, "direct")]


def pipeline(out: str) -> dict:
    from deepspeed.pipe import LayerSpec, PipelineModule

    model = PipelineModule(layers=[LayerSpec(torch.nn.Linear, 8, 8), LayerSpec(torch.nn.GELU),
                                   LayerSpec(torch.nn.Linear, 8, 8)], num_stages=2, loss_fn=torch.nn.MSELoss())
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(),
                             config=os.path.join(out, "ds_pipe.json"))
    except Exception as exc:  # noqa: BLE001  (recorded for the test)
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def bad_section(out: str) -> dict:
    model = noedit_direct.build(noedit_direct.parser().parse_args([]))
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=os.path.join(out, "ds_bad.json"))
    except Exception as exc:  # noqa: BLE001  (recorded for the test)
        norm = type(model.bert.encoder.layer[0].output.LayerNorm).__name__  # still torch's: nothing was changed
        return {"raised": type(exc).__name__, "message": str(exc), "norm": norm}
    return {"raised": None}


def main() -> None:
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    (out,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    torch.set_num_threads(1)
    for stage in (2, 3):
        noedit_trainer.main(trainer_argv(out, stage, local_rank))
    noedit_direct.main(direct_argv(out, local_rank))
    found = {"argv": sys.argv, "bad_section": bad_section(out), "pipeline": pipeline(out)}
    with open(os.path.join(out, f"suite.rank{torch.distributed.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()
    noedit_trainer.fast_exit()

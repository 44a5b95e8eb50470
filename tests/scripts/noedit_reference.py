"""The runs of noedit_suite.py and noedit_accelerate.py with tempo_ds added in code (the documented code changes),
for tests/test_runner.py to compare tempo_ds.run's losses with:

    deepspeed --num_gpus 2 noedit_reference.py OUT

- HF Trainer (ZeRO-2, ZeRO-3): tempo_ds.inject(model, the --deepspeed config) before the Trainer is built;
- deepspeed.initialize: tempo_ds.add_config_arguments on the parser and tempo_ds.initialize instead;
- accelerate: tempo_ds.inject(model, OUT/ds_acc.json, attention="tempo") before accelerator.prepare, with the
  DeepSpeed plugin built from that config file as `accelerate launch --config_file` builds it (plus
  --tempo_attention tempo, which the runner gets in that test).

Each script writes its losses under OUT with the prefix ref_<case>.
"""
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin

import noedit_accelerate
import noedit_direct
import noedit_suite
import noedit_trainer
import tempo_ds


def _renamed(argv: list[str], out: str, case: str) -> list[str]:
    i = argv.index("--losses_json")
    return [*argv[:i + 1], os.path.join(out, f"ref_{case}"), *argv[i + 2:]]


def main() -> None:
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    (out,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    torch.set_num_threads(1)
    for stage in (2, 3):
        model_args, training_args = noedit_trainer.parse(
            _renamed(noedit_suite.trainer_argv(out, stage, local_rank), out, f"trainer_zero{stage}"))
        model = noedit_trainer.build(model_args)
        tempo_ds.inject(model, training_args.deepspeed)
        noedit_trainer.train(model, model_args, training_args)

    args = tempo_ds.add_config_arguments(noedit_direct.parser()).parse_args(
        _renamed(noedit_suite.direct_argv(out, local_rank), out, "direct"))
    model = noedit_direct.build(args)
    engine, *_ = tempo_ds.initialize(args=args, model=model, model_parameters=model.parameters())
    noedit_direct.train(engine, args)

    AcceleratorState._reset_state(reset_partial_state=True)
    config = os.path.join(out, "ds_acc.json")
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False))
    args = noedit_accelerate.parser().parse_args(["--steps", str(noedit_suite.STEPS),
                                                  "--losses_json", os.path.join(out, "ref_accelerate")])
    model = noedit_accelerate.build(args)
    tempo_ds.inject(model, config, attention="tempo")
    noedit_accelerate.train(accelerator, model, args)


if __name__ == "__main__":
    main()
    noedit_trainer.fast_exit()

"""Launched by tests/test_deepspeed_integration.py:

    deepspeed --num_gpus 2 ds_bad_config.py --out OUT_DIR --deepspeed_config BAD.json

Each bad "tempo" section in BAD_SECTIONS goes through tempo_ds.initialize(config=dict): the TempoConfigError is
caught and recorded with whether anything had happened yet (model injected, torch.distributed initialised).
Then the config file given on the command line goes through tempo_ds.initialize(args=...) uncaught: both ranks
must exit with the message, and the launcher with them, without waiting on each other.
"""
import argparse

import deepspeed
import torch

import tempo_ds
from ds_common import build_model, ds_config, finish, write

BAD_SECTIONS = {
    "unknown key": {"gelu": "inplace", "gelu_bits": 2},
    "wrong type": {"norm": 3},
    "bits = 5": {"fewbit": {"bits": 5}},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = deepspeed.add_config_arguments(tempo_ds.add_config_arguments(parser)).parse_args()
    found = {}
    for name, section in BAD_SECTIONS.items():
        config = {**ds_config(2), "tempo": section}
        model = build_model("bert", config)
        try:
            tempo_ds.initialize(model=model, config=config, model_parameters=model.parameters())
            found[name] = {"raised": None}
        except tempo_ds.TempoConfigError as exc:
            found[name] = {"raised": str(exc), "injected": tempo_ds.is_injected(model),
                           "distributed": torch.distributed.is_initialized()}
    write(args.out, {"found": found})
    model = build_model("bert", ds_config(2))
    tempo_ds.initialize(args=args, model=model, model_parameters=model.parameters())


if __name__ == "__main__":
    main()
    finish()

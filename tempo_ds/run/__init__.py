"""``python -m tempo_ds.run``: run a training script nobody edited, with the DeepSpeed config's "tempo" section.

    deepspeed --num_gpus 8 --module tempo_ds.run train.py --deepspeed --deepspeed_config ds.json
    torchrun --nproc_per_node 8 -m tempo_ds.run run_clm.py --deepspeed ds.json ...
    accelerate launch --config_file accelerate.yaml -m tempo_ds.run train.py ...
    python -m tempo_ds.run [--tempo_gelu inplace ...] train.py ...
    TEMPO_DS=1 mpirun -x TEMPO_DS -np 16 python train.py ...      # launchers that cannot take a module

The runner exports ``TEMPO_DS=1`` (and its tempo options as ``TEMPO_DS_ARGS``, so processes the script starts
behave alike), installs the start-up hook (:mod:`tempo_ds._startup`: the moment DeepSpeed is imported, its
``initialize`` becomes :mod:`tempo_ds.run.hook`'s) and runs the script as ``__main__`` with :mod:`runpy`, with
the ``sys.argv`` and ``sys.path[0]`` that ``python script.py`` / ``python -m module`` would give it
(:mod:`tempo_ds.run.cli`). Every ``deepspeed.initialize`` of the script then behaves as :func:`tempo_ds.initialize`:
with a "tempo" section or a tempo option the model is injected before the engine is built and rank 0 prints the
report; without, nothing changes. ``TEMPO_DS_SUMMARY=DIR`` adds a JSON summary per rank (:mod:`tempo_ds.run.summary`).
"""
from __future__ import annotations

import os
import runpy
import shlex
import sys

from .. import _startup
from .cli import USAGE, Invocation, RunnerError, help_text, parse, parse_options

__all__ = ["main", "run"]


def run(invocation: Invocation) -> None:
    """Run the script (or module) as ``__main__`` with its own argv; restore argv and sys.path[0] afterwards."""
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = list(invocation.argv)
    try:
        if invocation.module:
            runpy.run_module(invocation.target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.realpath(invocation.target))  # as `python script.py` sets it
            runpy.run_path(invocation.target, run_name="__main__")
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0


def main(argv: list[str] | None = None) -> int:
    """The runner's entry point; returns the exit status (2: bad runner arguments). The script's own
    ``SystemExit`` and exceptions pass through."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        invocation = parse(argv)
        if invocation is not None:
            tokens = [*shlex.split(os.environ.get(_startup.ARGS_ENV, "")), *invocation.option_tokens]
            parse_options(tokens, f"{_startup.ARGS_ENV} + runner options")  # the two together, checked now
    except RunnerError as exc:
        print(f"usage: {USAGE}\npython -m tempo_ds.run: error: {exc}", file=sys.stderr)
        return 2
    if invocation is None:
        print(help_text())
        return 0
    os.environ[_startup.ENV] = "1"
    if tokens:
        os.environ[_startup.ARGS_ENV] = shlex.join(tokens)
    _startup.install()
    run(invocation)
    return 0

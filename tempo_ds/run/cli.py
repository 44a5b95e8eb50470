"""The runner's command line: ``[tempo options] [--local_rank=N] (SCRIPT | -m MODULE) [script arguments]``.

Everything before the script belongs to the runner, everything after it to the script, untouched. The tempo
options are those of :func:`tempo_ds.add_config_arguments` (``--tempo``, ``--tempo_config``, ``--tempo_gelu``, ...,
the DeepSpeedExamples aliases) and apply to every ``deepspeed.initialize`` of the process. ``--local_rank=N`` /
``--local-rank=N``, which the DeepSpeed launcher (and torch's legacy launcher) put before the script when the
script is a module (``deepspeed --module tempo_ds.run train.py``), is moved to just after the script, where the
launcher puts it for ``deepspeed train.py``: the script's argv is exactly the one it would have got.
"""
from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field

from ..config import TempoConfig, TempoConfigError
from ..deepspeed_integration import add_config_arguments

__all__ = ["RunnerError", "Invocation", "parse", "parse_options", "USAGE"]

PROG = "python -m tempo_ds.run"
USAGE = f"{PROG} [tempo options] [--local_rank=N] (SCRIPT | -m MODULE) [script arguments]"
LOCAL_RANK = ("--local_rank", "--local-rank")


class RunnerError(ValueError):
    """Bad runner arguments or TEMPO_DS_ARGS: the message says which and what is allowed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting: the caller says where the options came from
        raise RunnerError(message)


def options_parser() -> argparse.ArgumentParser:
    """The tempo options the runner takes before the script (and TEMPO_DS_ARGS holds)."""
    parser = _Parser(prog=PROG, usage=USAGE, add_help=False,
                     description="Run a training script unchanged, with tempo_ds injecting the model its "
                     "deepspeed.initialize call builds the engine from, as tempo_ds.initialize does.")
    return add_config_arguments(parser)


def parse_options(tokens: list[str], source: str) -> argparse.Namespace:
    """Tempo options parsed and validated (``--tempo_config`` read) now, before any script runs."""
    try:
        options = options_parser().parse_args(tokens)
    except RunnerError as exc:
        raise RunnerError(f"{source}: {exc}") from None
    if options.tempo_config:
        try:
            TempoConfig.build(options.tempo_config)
        except TempoConfigError as exc:
            raise RunnerError(f"{source}: --tempo_config: {exc}") from None
    return options


@dataclass
class Invocation:
    """What to run: ``target`` (a script path, or a module name when ``module``), its argv, the runner's options."""

    target: str
    module: bool
    argv: list[str]                       # sys.argv for the script; argv[0] is the target
    option_tokens: list[str] = field(default_factory=list)
    options: argparse.Namespace | None = None


def _takes_value(parser: argparse.ArgumentParser, flag: str) -> bool:
    action = parser._option_string_actions.get(flag)
    return action is not None and action.nargs != 0


def parse(argv: list[str]) -> Invocation | None:
    """Split the runner's argv; None means ``--help`` was asked for. Raises RunnerError."""
    parser = options_parser()
    option_tokens: list[str] = []
    local_rank: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] not in ("-", "-m", "--"):
        token = rest.pop(0)
        flag = token.split("=", 1)[0]
        if flag in ("-h", "--help"):
            return None
        bucket = local_rank if flag in LOCAL_RANK else option_tokens
        bucket.append(token)
        if "=" not in token and (flag in LOCAL_RANK or _takes_value(parser, flag)):
            if not rest:
                raise RunnerError(f"{flag} expects a value")
            bucket.append(rest.pop(0))
    if rest[:1] == ["--"]:
        rest.pop(0)
    module = rest[:1] == ["-m"]
    if module:
        rest.pop(0)
    if not rest:
        raise RunnerError("no " + ("module name after -m" if module else "script to run") + f"; usage: {USAGE}")
    options = parse_options(option_tokens, "runner options")
    target, script_args = rest[0], rest[1:]
    if not module and not os.path.isfile(target):
        raise RunnerError(f"cannot open the script {target!r}: no such file")
    return Invocation(target, module, [target, *local_rank, *script_args], option_tokens, options)


def env_options(value: str | None) -> argparse.Namespace | None:
    """The options in ``TEMPO_DS_ARGS`` (None when it is unset or blank)."""
    if not value or not value.strip():
        return None
    return parse_options(shlex.split(value), f"TEMPO_DS_ARGS={value!r}")


def help_text() -> str:
    from .._startup import ARGS_ENV, ENV

    text = options_parser().format_help()
    return text + (
        "\nThe script runs as __main__ with the argv it would have had without the runner. Its "
        "deepspeed.initialize calls\n(HF Trainer's, accelerate's, Megatron-DeepSpeed's, its own) inject the model "
        "first when the DeepSpeed config\nhas a \"tempo\" section or a tempo option is given (here, or on the "
        "script's parser when it calls\ndeepspeed.add_config_arguments); otherwise nothing changes.\n\n"
        f"Environment: {ENV}=1 does the same for a plain 'python train.py' (needs the installed tempo_ds.pth), "
        f"{ARGS_ENV}\nholds tempo options for it, {ENV}=0 turns even the ignored-section warning off, "
        "TEMPO_DS_SUMMARY=DIR writes\nDIR/rank<N>.json: each engine's injection, bytes saved per layer in its "
        "first forward, step time.\n")

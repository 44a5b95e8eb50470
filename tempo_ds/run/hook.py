"""The hook on ``deepspeed.initialize``: tempo_ds.initialize's semantics for a script that calls DeepSpeed itself.

HF Trainer (through accelerate), accelerate's DeepSpeed plugin, Megatron-DeepSpeed and DeepSpeedExamples all build
their engine with ``deepspeed.initialize``, looked up on the ``deepspeed`` module when they call it; :func:`activate`
replaces it there (``tempo_ds._startup`` does so right after DeepSpeed is imported, before any other module can
keep a reference). Each call then:

1. reads the DeepSpeed config where DeepSpeed reads it (``config``, ``config_params``, ``args.deepspeed_config``)
   and resolves the tempo settings exactly as :func:`tempo_ds.initialize` does: the ``"tempo"`` section, under the
   process's runner options (``dsi.PROCESS_OPTIONS``), under the tempo options on ``args`` (the script's parser,
   which the hooked ``deepspeed.add_config_arguments`` gives the ``--tempo*`` options). A bad section raises
   ``TempoConfigError`` here, on every rank, before anything is built or any collective call is made;
2. without settings (no section, no option) or with ``"enabled": false``, calls DeepSpeed's own initialize with
   the arguments untouched: nothing changes. A model the training code injected itself is left as it is;
3. otherwise refuses, with :class:`TempoRunnerError`, a model it cannot inject (a ``PipelineModule``), and calls
   :func:`tempo_ds.initialize` with the very same arguments: the model is injected in place before the engine
   and optimizer exist, rank 0 prints the one-line report, the ``activation_checkpointing`` section is applied.

:func:`warn_if_ignored` is the check of a process where tempo_ds is installed but not active.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import threading
import warnings
from typing import Any, Callable

from torch import nn

from .. import deepspeed_integration as dsi
from .._startup import ARGS_ENV, ENV, HOOK_ATTRIBUTE
from ..config import SECTION
from ..inject import _STATE, is_injected
from . import summary
from .cli import env_options

__all__ = ["activate", "deactivate", "warn_if_ignored", "TempoRunnerError", "IgnoredSectionWarning", "ORIGINALS"]

ORIGINALS: dict[str, Callable] = {}  # DeepSpeed's own functions while hooked
_inside = threading.local()          # set while tempo_ds.initialize runs on behalf of the hook

LAUNCH_HINT = ("run the script through tempo_ds.run (deepspeed --module tempo_ds.run train.py ..., torchrun -m "
               "tempo_ds.run train.py ..., accelerate launch -m tempo_ds.run train.py ..., python -m tempo_ds.run "
               "train.py ...), or set TEMPO_DS=1, or call tempo_ds.initialize in the script")


class TempoRunnerError(RuntimeError):
    """The config asks for tempo_ds but the hook cannot inject the model deepspeed.initialize was given."""


class IgnoredSectionWarning(UserWarning):
    """A config with a "tempo" section reached deepspeed.initialize in a process where tempo_ds is not active."""


# -- installing ----------------------------------------------------------------------------------------------
def activate(deepspeed: Any = None) -> None:
    """Hook ``deepspeed.initialize`` and ``deepspeed.add_config_arguments``; read TEMPO_DS_ARGS (process options)."""
    if deepspeed is None:
        import deepspeed
    dsi.PROCESS_OPTIONS = env_options(os.environ.get(ARGS_ENV))
    for name, make in (("initialize", _initialize_hook), ("add_config_arguments", _arguments_hook)):
        current = getattr(deepspeed, name)
        if getattr(current, HOOK_ATTRIBUTE, None) == "active":
            continue
        original = current.__wrapped__ if getattr(current, HOOK_ATTRIBUTE, None) else current
        ORIGINALS[name] = original
        setattr(deepspeed, name, make(original))


def deactivate(deepspeed: Any = None) -> None:
    """Put DeepSpeed's own functions back and forget the process options (in-process runs and tests)."""
    if deepspeed is None:
        import deepspeed
    for name, original in ORIGINALS.items():
        setattr(deepspeed, name, original)
    ORIGINALS.clear()
    dsi.PROCESS_OPTIONS = None


def _initialize_hook(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        if getattr(_inside, "active", False):
            return original(*args, **kwargs)
        return _initialize(original, signature.bind(*args, **kwargs).arguments)

    setattr(initialize, HOOK_ATTRIBUTE, "active")
    return initialize


def _tempo_flags() -> set[str]:
    parser = dsi.add_config_arguments(argparse.ArgumentParser(add_help=False), aliases=False)
    return {flag for action in parser._actions for flag in action.option_strings}


def _arguments_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_config_arguments(parser):
        parser = original(parser)
        if not _tempo_flags() & set(parser._option_string_actions):  # the script's own tempo options stay
            dsi.add_config_arguments(parser, aliases=False)  # its DeepSpeedExamples flags are read either way
        return parser

    setattr(add_config_arguments, HOOK_ATTRIBUTE, "active")
    return add_config_arguments


# -- the call ------------------------------------------------------------------------------------------------
def _initialize(original: Callable, call: dict) -> tuple:
    model, args = call.get("model"), call.get("args")
    try:
        ds_config, where = dsi._deepspeed_config(args, call.get("config"), call.get("config_params"))
    except Exception:  # two configs, an unreadable file: DeepSpeed reports its own config errors
        return original(**call)
    tempo = dsi._resolve(ds_config, where, args)
    if isinstance(model, nn.Module) and is_injected(model):
        result = original(**call)
        summary.record(result[0], model, getattr(model, _STATE)["report"], "injected by the training code")
        return result
    if tempo is None or not tempo.enabled:
        result = original(**call)
        summary.record(result[0], model, None, "not asked for" if tempo is None else "section disabled")
        return result
    _check_reachable(model, where)
    _inside.active = True
    try:
        result = dsi.initialize(**call)
    finally:
        _inside.active = False
    summary.record(result[0], model, getattr(model, _STATE)["report"], "injected by tempo_ds.run")
    return result


def _check_reachable(model: Any, where: str) -> None:
    from deepspeed.pipe import PipelineModule

    what = None
    if isinstance(model, PipelineModule):
        what = ("a PipelineModule (DeepSpeed's pipeline engine): each rank holds one stage's layers, built from "
                "LayerSpecs, and tempo_ds.run injects whole models only")
    elif model is not None and not isinstance(model, nn.Module):
        what = f"a {type(model).__name__}, not a torch.nn.Module"
    if what:
        raise TempoRunnerError(
            f"tempo_ds.run: {where} asks for tempo_ds, but the model handed to deepspeed.initialize is {what}, so "
            f"the hook cannot inject it. Set \"enabled\": false in the \"{SECTION}\" section to train without "
            "tempo_ds, or inject the layers in the training code (tempo_ds.inject on each stage's modules; for "
            "Megatron models, the layer specs of tempo_ds.megatron).")


# -- not active ----------------------------------------------------------------------------------------------
def warn_if_ignored(original: Callable, args: tuple, kwargs: dict, env_value: str = "") -> bool:
    """Warn (IgnoredSectionWarning) when this deepspeed.initialize call carries an enabled "tempo" section and a
    model tempo_ds has not injected: DeepSpeed will ignore the section. Returns whether it warned."""
    call = inspect.signature(original).bind(*args, **kwargs).arguments
    ds_config, where = dsi._deepspeed_config(call.get("args"), call.get("config"), call.get("config_params"))
    section = ds_config.get(SECTION) if ds_config else None
    if section is None or (isinstance(section, dict) and section.get("enabled") is False):
        return False
    model = call.get("model")
    if isinstance(model, nn.Module) and is_injected(model):
        return False
    message = (f"tempo_ds: {where} has a \"{SECTION}\" section, but tempo_ds is not active in this process: "
               f"DeepSpeed ignores the section and this run trains WITHOUT tempo_ds. To apply it, {LAUNCH_HINT}. "
               f"\"enabled\": false in the section (or {ENV}=0) silences this warning.")
    if env_value.strip() not in ("", "0", "1"):
        message += f" ({ENV}={env_value!r} is neither 0 nor 1, so it was read as unset.)"
    warnings.warn(message, IgnoredSectionWarning, stacklevel=3)
    return True

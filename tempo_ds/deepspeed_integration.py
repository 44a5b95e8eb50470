"""DeepSpeed integration: a ``"tempo"`` section in the DeepSpeed config, launcher flags, and ``initialize``.

    parser = deepspeed.add_config_arguments(tempo_ds.add_config_arguments(parser))
    args = parser.parse_args()
    engine, optimizer, loader, scheduler = tempo_ds.initialize(args=args, model=model,
                                                               model_parameters=model.parameters())

``tempo_ds.initialize`` takes exactly what ``deepspeed.initialize`` takes and returns what it returns. Before
anything is built it reads the ``"tempo"`` section of the DeepSpeed config (``config``, ``config_params``,
``args.deepspeed_config`` or ``args.deepscale_config``: a dict, a JSON/HJSON file or base64 text, as DeepSpeed
accepts them), lays the command-line options of :func:`add_config_arguments` over it (the command line wins)
and validates the result strictly (:class:`~tempo_ds.config.TempoConfig`): a bad section raises
``TempoConfigError`` naming the key on every rank, before any collective call, so nothing hangs. Then it
injects the model in place (keeping the Parameter objects, so ``model_parameters`` and ZeRO-3 partitions stay
valid), calls ``deepspeed.initialize`` with the arguments untouched, and on rank 0 prints a one-line summary
of the injection (the full report goes to DeepSpeed's logger at INFO level). Without a section (or with
``"enabled": false``) and without tempo flags nothing is injected: it is ``deepspeed.initialize`` plus the one
addition below.

DeepSpeed ignores unknown top-level keys, so the ``"tempo"`` key stays in the config handed to DeepSpeed (and
in the config it prints and saves with checkpoints).

The addition, made with or without tempo: DeepSpeed's engine never calls ``deepspeed.checkpointing.configure``,
so an ``"activation_checkpointing"`` section has no effect unless the training code calls it. ``initialize``
calls it with the config (and ``mpu``) when the section is present, unless the training code configured
checkpointing itself, so A/B runs with tempo on and off checkpoint the same way. Two DeepSpeed 0.19.8 defects,
with or without tempo_ds: on the CPU accelerator ``cpu_checkpointing`` without ``partition_activations`` is
broken; and ``partition_activations`` shifts a checkpointed function's ``None`` positional arguments on
recompute, which breaks HF BERT layers (``encoder_hidden_states=None`` is passed positionally).

DeepSpeed checkpoints do not hold the random-number generators' states; dropout masks (tempo_ds regenerates
them from seeds drawn from the global RNG) then differ after a resume. :func:`save_checkpoint` and
:func:`load_checkpoint` wrap the engine's methods and keep each rank's RNG states beside the checkpoint (as the
HF Trainer does), so a resumed run continues exactly as the uninterrupted one.

``tempo-ds bench-deepspeed`` measures saved bytes per layer and step time with and without
tempo_ds on 2 ranks (it starts the DeepSpeed launcher itself).
"""
from __future__ import annotations

import argparse
import os
import random
import typing
from typing import Any

import torch
from torch import nn

from .config import SECTION, TempoConfig, TempoConfigError
from .inject import inject

__all__ = ["initialize", "add_config_arguments", "resolve_config", "configure_activation_checkpointing",
           "deepspeed_activation_checkpointing", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "load_rng_state", "RNGStateError", "summary", "DEEPSPEED_EXAMPLES_FLAGS"]

SWITCHES = ("gelu", "norm", "attention", "dropout", "silu", "mlp", "lm_loss", "qk_norm", "mask_check")

# DeepSpeedExamples' flags for DeepSpeed's CUDA transformer kernel -> the tempo_ds technique with the same idea.
DEEPSPEED_EXAMPLES_FLAGS: dict[str, dict[str, str]] = {
    "deepspeed_transformer_kernel": {},
    "normalize_invertible": {"norm": "inplace"},
    "gelu_checkpoint": {"gelu": "recompute"},
    "attention_dropout_checkpoint": {"attention": "tempo"},
}

RNG_FILE = "tempo_ds_rng_state_rank{rank}.pt"


def _choices(key: str) -> tuple[str, ...]:
    return typing.get_args(TempoConfig.model_fields[key].annotation)


# -- command line --------------------------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser, aliases: bool = True) -> argparse.ArgumentParser:
    """Add tempo_ds's options to ``parser`` (an argument group "tempo_ds") and return it.

    ``--tempo``                 turn tempo_ds on with its defaults (or the config's section)
    ``--tempo_config JSON``     tempo settings: a JSON file, inline JSON, or a DeepSpeed config with a section
    ``--tempo_gelu``, ``--tempo_norm``, ``--tempo_attention``, ``--tempo_dropout``, ``--tempo_silu``,
    ``--tempo_mlp``, ``--tempo_lm_loss``, ``--tempo_qk_norm``, ``--tempo_mask_check``
                                one setting (choices as in ``TempoConfig``)
    ``--tempo_fewbit_bits N``   bits per element of few-bit activations (1-4)

    Any of them turns tempo_ds on; their values override the DeepSpeed config's ``"tempo"`` section.
    Composes with ``deepspeed.add_config_arguments`` (no shared option names).

    DeepSpeedExamples' switches for DeepSpeed's CUDA transformer kernel are read as aliases; each turns tempo_ds
    on, the other settings keep their values, and an explicit ``--tempo_<technique>`` still wins:

    - ``--deepspeed_transformer_kernel``: tempo_ds on (the config's section, else the defaults)
    - ``--normalize_invertible``: ``norm=inplace`` (LayerNorm keeps its output, not its input)
    - ``--gelu_checkpoint``: ``gelu=recompute`` (GELU recomputed in backward from its input)
    - ``--attention_dropout_checkpoint``: ``attention=tempo`` (Tempo's attention-dropout recomputation)

    An alias is added only if the parser does not define that option already (training scripts often do;
    add tempo_ds's arguments after your own), and none with ``aliases=False``. Its value is read from ``args``
    either way.
    """
    group = parser.add_argument_group("tempo_ds", "tempo_ds activation-memory techniques")
    group.add_argument("--tempo", action="store_true", default=False,
                       help="turn tempo_ds on (defaults, or the DeepSpeed config's \"tempo\" section)")
    group.add_argument("--tempo_config", default=None, metavar="JSON",
                       help="tempo settings: JSON file, inline JSON, or a DeepSpeed config with a \"tempo\" section")
    for key in SWITCHES:
        group.add_argument(f"--tempo_{key}", default=None, choices=_choices(key),
                           help=f"tempo_ds {key} setting (overrides the config)")
    group.add_argument("--tempo_fewbit_bits", default=None, type=int, choices=(1, 2, 3, 4),
                       help="bits per element of few-bit activations")
    known = getattr(parser, "_option_string_actions", {})
    for flag, technique in DEEPSPEED_EXAMPLES_FLAGS.items():
        if aliases and f"--{flag}" not in known:
            what = ", ".join(f"{k}={v}" for k, v in technique.items()) or "defaults"
            group.add_argument(f"--{flag}", action="store_true", default=False,
                               help=f"DeepSpeedExamples alias: tempo_ds on ({what})")
    return parser


def _cli_settings(args: Any) -> dict:
    """The tempo settings the command line asks for (empty when it asks for none)."""
    if args is None:
        return {}
    out: dict = {}
    source = getattr(args, "tempo_config", None)
    if source:
        try:
            out.update(TempoConfig.build(source).model_dump(exclude_unset=True))
        except TempoConfigError as exc:
            raise TempoConfigError(f"--tempo_config: {exc}") from None
    for flag, technique in DEEPSPEED_EXAMPLES_FLAGS.items():
        if getattr(args, flag, False) is True:
            out.update(technique)
            out.setdefault("enabled", True)
    for key in SWITCHES:
        value = getattr(args, f"tempo_{key}", None)
        if value is not None:
            out[key] = value
    bits = getattr(args, "tempo_fewbit_bits", None)
    if bits is not None:
        out["fewbit"] = {**out.get("fewbit", {}), "bits": bits}
    if getattr(args, "tempo", False) is True:
        out["enabled"] = True
    if out:
        out.setdefault("enabled", True)
    return out


# -- config --------------------------------------------------------------------------------------------------
def _deepspeed_config(args: Any, config: Any, config_params: Any) -> tuple[dict | None, str]:
    """The DeepSpeed config as a dict (None if none was given) and a name for messages, found where
    ``deepspeed.initialize`` looks: ``config``, ``config_params``, ``args.deepspeed_config`` / ``deepscale_config``."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError("Not sure how to proceed, we were given deepspeed configs in the deepspeed arguments "
                             "and deepspeed.initialize() function call")
        config = from_args
    if config is None:
        return None, ""
    if isinstance(config, dict):
        return config, "the DeepSpeed config"
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return load_ds_config(config), f"DeepSpeed config {config}"


def resolve_config(args: Any = None, config: Any = None, config_params: Any = None) -> TempoConfig | None:
    """The validated tempo settings of a run, or None when neither the config nor the command line asks for
    tempo_ds. The DeepSpeed config's ``"tempo"`` section comes first; command-line options override its keys.
    Raises ``TempoConfigError`` (naming the key and where it came from) for a bad section or option."""
    return _resolve(*_deepspeed_config(args, config, config_params), args)


# Tempo options of the whole process, given ahead of the script (``python -m tempo_ds.run --tempo_gelu inplace
# train.py ...`` or ``TEMPO_DS_ARGS``): an argparse namespace that tempo_ds.run sets. They lie under the section
# and under the options on ``args`` (the script's own parser), like every command-line option.
PROCESS_OPTIONS: Any = None


def _layer(low: dict, high: dict) -> dict:
    """``high``'s settings over ``low``'s; few-bit settings merge key by key."""
    if "fewbit" in high and "fewbit" in low:
        high = {**high, "fewbit": {**low["fewbit"], **high["fewbit"],
                                   "functions": {**low["fewbit"].get("functions", {}),
                                                 **high["fewbit"].get("functions", {})}}}
    return {**low, **high}


def _resolve(ds: dict | None, where: str, args: Any) -> TempoConfig | None:
    section = ds.get(SECTION) if ds else None
    merged: dict = {}
    if section is not None:
        try:
            merged = TempoConfig.build({SECTION: section}).model_dump(exclude_unset=True)
        except TempoConfigError as exc:
            raise TempoConfigError(f"{where}: {exc}") from None
    cli = _layer(_cli_settings(PROCESS_OPTIONS), _cli_settings(args))
    if section is None and not cli:
        return None
    try:
        return TempoConfig.validate_dict(_layer(merged, cli))
    except TempoConfigError as exc:
        raise TempoConfigError(f"command-line tempo options: {exc}") from None


# -- initialize ----------------------------------------------------------------------------------------------
def _parameter_list(model_parameters: Any) -> Any:
    """A generator (``model.parameters()``) becomes a list so the very objects the caller named are kept."""
    if model_parameters is None or isinstance(model_parameters, (list, tuple)):
        return model_parameters
    return list(model_parameters)


def _check_parameters_kept(model: nn.Module, model_parameters: Any) -> None:
    if model_parameters is None:
        return
    owned = {id(p) for p in model.parameters()}
    for item in model_parameters:
        params = item["params"] if isinstance(item, dict) else [item]
        for p in ([params] if isinstance(params, torch.Tensor) else params):
            if isinstance(p, nn.Parameter) and id(p) not in owned:
                raise RuntimeError("a parameter in model_parameters is no longer part of the model after "
                                   "tempo_ds.inject; inject must keep every Parameter object")


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` with tempo_ds injected first, when the config or command line asks for it.

    Same arguments (``**kwargs`` carries the rest of deepspeed.initialize's: ``mpu``, ``collate_fn``,
    ``dist_init_required``, ...) and the same return value ``(engine, optimizer, dataloader, lr_scheduler)``.
    The tempo settings are validated before anything is built; the model is injected in place before the
    engine and optimizer exist; rank 0 prints a summary of the injection (:func:`summary`). An
    ``"activation_checkpointing"`` section is applied with ``deepspeed.checkpointing.configure`` (see the
    module docstring).
    """
    import deepspeed

    ds_config, where = _deepspeed_config(args, config, config_params)
    tempo = _resolve(ds_config, where, args)
    report = None
    if tempo is not None and tempo.enabled:
        if model is None:
            raise ValueError("tempo_ds.initialize requires a model")
        model_parameters = _parameter_list(model_parameters)
        report = inject(model, tempo)
        _check_parameters_kept(model, model_parameters)
    result = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                  training_data=training_data, lr_scheduler=lr_scheduler, config=config,
                                  config_params=config_params, **kwargs)
    configure_activation_checkpointing(ds_config, mpu=kwargs.get("mpu"))
    if report is not None:
        from deepspeed.utils import log_dist
        from deepspeed.utils.logging import print_dist

        print_dist(summary(report), ranks=[0])
        log_dist(str(report), ranks=[0])
    return result


def summary(report) -> str:
    """One line for the log: the policy, the settings, what was replaced (per technique) and left alone."""
    counts = ", ".join(f"{k}: {v}" for k, v in report.counts().items()) or "nothing"
    settings = ", ".join(f"{k}={v}" for k, v in report.config.techniques().items())
    line = (f"tempo_ds: {report.policy} policy ({settings}); replaced {len(report.replaced)} modules ({counts}); "
            f"left alone {len(report.skipped)}")
    if report.attention:
        line += f"; attention {report.attention[0]} -> {report.attention[1]}"
    return line


_CONFIGURED_HERE = False  # whether the last deepspeed.checkpointing.configure call was ours


def configure_activation_checkpointing(ds_config: dict | None, mpu: Any = None) -> bool:
    """Apply the config's ``"activation_checkpointing"`` section with ``deepspeed.checkpointing.configure``,
    unless it is absent or the training code configured checkpointing itself (then its settings, e.g.
    Megatron-DeepSpeed's ``num_checkpoints``, stay). Returns whether it applied the section."""
    global _CONFIGURED_HERE
    if not ds_config or "activation_checkpointing" not in ds_config:
        return False
    import deepspeed

    if deepspeed.checkpointing.is_configured() and not _CONFIGURED_HERE:
        return False
    deepspeed.checkpointing.configure(mpu, deepspeed_config=ds_config)
    _CONFIGURED_HERE = True
    return True


def deepspeed_activation_checkpointing(model: nn.Module, *, every_n_layers: int = 1, reentrant: bool = True) -> None:
    """Make a transformers model checkpoint its layers with ``deepspeed.checkpointing`` (reentrant
    ``checkpoint`` or ``non_reentrant_checkpoint``) instead of torch's, every ``every_n_layers``-th layer."""
    import deepspeed

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    if every_n_layers == 1:
        enable()
    else:
        enable(every_n_layers=every_n_layers)
    fn = deepspeed.checkpointing.checkpoint if reentrant else deepspeed.checkpointing.non_reentrant_checkpoint
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn


# -- checkpoints ---------------------------------------------------------------------------------------------
class RNGStateError(RuntimeError):
    """A checkpoint folder without this rank's RNG states, or with states in a form we did not write."""


def rng_state() -> dict:
    """This process's random-number generator states: torch (CPU and accelerator), Python, NumPy.

    Only tensors and plain Python values, so ``torch.load(..., weights_only=True)`` reads it back and a
    crafted checkpoint folder cannot run code at resume."""
    version, internal, gauss = random.getstate()
    state: dict = {"torch": torch.get_rng_state(),
                   "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state:
            import numpy as np

            n = state["numpy"]
            np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RNGStateError(f"RNG state is not in the form tempo_ds.save_checkpoint writes ({exc!r})") from None


def load_rng_state(path: str) -> None:
    """Read and restore this rank's RNG states from ``path`` with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise RNGStateError(f"{path} does not exist: this checkpoint was not saved with tempo_ds.save_checkpoint "
                            "(or not by this many ranks); resume it with engine.load_checkpoint to skip the RNG "
                            "states")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # the unpickler's refusal of anything but tensors and plain types, or a bad file
        raise RNGStateError(f"{path} cannot be read as RNG states with weights_only=True: {exc}") from None
    if not isinstance(state, dict):
        raise RNGStateError(f"{path} holds a {type(state).__name__}, not the RNG-state dict tempo_ds writes")
    set_rng_state(state)


def _rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def _tag(load_dir: str, tag: str | None) -> str | None:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            return f.read().strip()
    return None


def save_checkpoint(engine, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                    **kwargs) -> bool:
    """``engine.save_checkpoint`` plus this rank's RNG states in ``<save_dir>/<tag>/``."""
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    state = rng_state()  # before saving: saving draws no random numbers, but be exact about the moment
    ok = engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
    path = os.path.join(save_dir, tag)
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, RNG_FILE.format(rank=_rank())))
    return ok


def load_checkpoint(engine, load_dir: str, tag: str | None = None, **kwargs):
    """``engine.load_checkpoint`` (same return value), then this rank's RNG states, read with
    ``weights_only=True``; a checkpoint DeepSpeed loaded that holds no RNG states raises :class:`RNGStateError`."""
    result = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    resolved = _tag(load_dir, tag)
    if resolved is not None and result[0] is not None:
        path = os.path.join(load_dir, resolved, RNG_FILE.format(rank=_rank()))
        load_rng_state(path)
    return result

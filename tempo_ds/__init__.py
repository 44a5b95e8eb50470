"""tempo_ds: cut the activation memory of transformer training without changing what it computes.

    report = tempo_ds.inject(model, config=None, **overrides)   # before deepspeed.initialize
    tempo_ds.revert(model)

Heavy dependencies (transformers, deepspeed) are imported by the modules that need them, not here.
"""
from . import lm_loss, memory, ops, policies
from .config import TempoConfig, TempoConfigError
from .deepspeed_integration import add_config_arguments, initialize
from .inject import InjectionReport, inject, is_injected, revert
from .memory import SavedTensorMeter
from .deepspeed_layer import TempoTransformerLayer, bert_layer_policy, deepspeed_kernel_policy
from .policies import Policy, register_policy

register_policy(deepspeed_kernel_policy())          # any model holding DeepSpeedTransformerLayers
register_policy(bert_layer_policy(), first=False)  # opt-in: inject(model, policy="bert_layer")

__version__ = "0.1.0"

__all__ = ["inject", "revert", "initialize", "add_config_arguments", "is_injected", "InjectionReport", "TempoConfig",
           "TempoConfigError", "Policy", "register_policy", "SavedTensorMeter", "lm_loss", "memory", "ops", "policies",
           "__version__"]

"""tempo_ds: cut the activation memory of transformer training without changing what it computes.

Heavy dependencies (transformers, deepspeed) are imported by the modules that need them, not here.
"""
from . import memory
from .memory import SavedTensorMeter

__version__ = "0.1.0"

__all__ = ["memory", "SavedTensorMeter", "__version__"]

"""``tempo-ds bench``: HF eager, HF sdpa and tempo_ds (each technique, all) side by side on one preset.

``run_bench`` returns every figure as a dict; ``report.write`` turns it into bench.json, bench.md and
bench.png; ``training.train`` is the loss-after-N-steps loop the convergence test reuses.
"""
from .runner import run_bench
from .training import final_loss, train
from .variants import VARIANTS, Variant

__all__ = ["run_bench", "train", "final_loss", "VARIANTS", "Variant"]

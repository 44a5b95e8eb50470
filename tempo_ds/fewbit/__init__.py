"""Few-bit backward (Novikov et al., ICML 2022, "Few-Bit Backward: Quantized Gradients of Activation
Functions for Memory Footprint Reduction"), rebuilt: optimal tables by exact dynamic programming.

An activation computes its exact output but keeps only a b-bit code per element (b = 1..4): the index of
the interval its input fell in. Backward multiplies the incoming gradient by that interval's level, a
piecewise-constant approximation q of f' minimising the integral of (f' - q)^2 w.

* ``solve(name_or_fprime, bits, weight="uniform" | "gaussian" | density | (counts, edges), range, grid)``:
  the optimal table (``solver``);
* ``table(name, bits)``: the shipped table, ``(borders, levels)`` float64 tensors (``tables``; the file
  ``tables.json`` is written by ``tempo-ds fewbit-tables``);
* ``calibrate(model, batches, bits)``: tables weighted by the inputs each activation module really sees;
* ``FUNCTIONS``: the activations known, with their exact forward and derivative.

The op is ``tempo_ds.ops.fewbit(x, name, bits)``; the modules are ``tempo_ds.nn.FewBitGELU`` and
friends. Unlike the published code, a b-bit code takes exactly b bits (not b + 1), fp16 and bf16 work,
the input is never overwritten, and the tables are the DP optimum (several published ones are not).
"""
from .calibrate import calibrate
from .functions import FUNCTIONS
from .solver import Table, l2_error, solve
from .tables import table

__all__ = ["solve", "table", "calibrate", "FUNCTIONS", "Table", "l2_error"]

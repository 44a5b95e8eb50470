"""Data-weighted few-bit tables: solve each activation's table for the inputs it really sees.

The shipped tables weight every x in [-10, 10] equally; real pre-activations crowd around a few
values. ``calibrate`` runs the model on a few batches (under no_grad; the model's train/eval mode is
left as it is), records with forward pre-hooks a histogram of the input of every smooth activation
module that ``tempo_ds.nn.fewbit.from_module`` knows (nn.GELU, nn.SiLU, nn.Tanh, HF's GELUActivation,
NewGELUActivation, SiLUActivation, ...), and solves, per module, the table minimising the sum over the
recorded inputs of (f'(x) - q(x))^2: the empirical weight, binned on the solver's grid.

The histogram has the solver's grid cells as bins (default 4000 bins of 0.005 on [-10, 10]); inputs
outside [-range, range] are counted in the outermost bins (there every registry f' but softsign's is
within 5e-4 of its limit), and nan inputs are ignored. Exact variants (ReLU, ...) need no table and
are skipped.

Usage::

    for name, t in calibrate(model, batches, bits=2).items():     # {module name: Table}
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, from_module(model.get_submodule(name), 2, t))
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import solver
from .functions import SMOOTH
from .solver import Table

__all__ = ["calibrate", "record_histograms"]


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def record_histograms(model: nn.Module, batches: Iterable, range: float = solver.DEFAULT_RANGE,
                      grid: int = solver.DEFAULT_GRID) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{module name: (activation name, counts [grid - 1], edges [grid])}`` of each activation's input.

    ``batches``: dicts (``model(**b)``), tuples (``model(*b)``) or tensors (``model(b)``).
    """
    from tempo_ds.nn.fewbit import activation_name   # not at the top: tempo_ds.nn.fewbit imports this package

    edges = torch.from_numpy(solver.default_grid(range, grid))
    found = {}
    for name, module in model.named_modules():
        act = activation_name(module)
        if act is not None and act in SMOOTH:
            found[name] = (act, module, torch.zeros(grid - 1, dtype=torch.float64))
    if not found:
        raise ValueError("no activation module that few-bit tables can replace was found in the model")

    def hook_for(counts):
        def hook(module, args):
            x = args[0].detach().reshape(-1).double()
            x = x[~torch.isnan(x)].clamp(-range, range)
            bins = torch.bucketize(x, edges[1:-1].to(x.device), right=True)   # x in [edges[i], edges[i+1])
            counts.add_(torch.bincount(bins, minlength=grid - 1).double().cpu())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(c)) for _, m, c in found.values()]
    try:
        with torch.no_grad():
            for batch in batches:
                _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: (act, counts, edges) for name, (act, _, counts) in found.items()}


def calibrate(model: nn.Module, batches: Iterable, bits: int = 2, range: float = solver.DEFAULT_RANGE,
              grid: int = solver.DEFAULT_GRID) -> dict[str, Table]:
    """``{module name: Table}``: the optimal ``bits``-bit table of each activation module under the
    histogram of its inputs on ``batches`` (see the module docstring)."""
    out = {}
    for name, (act, counts, edges) in record_histograms(model, batches, range, grid).items():
        if not counts.sum() > 0:
            raise ValueError(f"activation {name!r} saw no input while calibrating")
        out[name] = solver.solve(act, bits, weight=(counts, edges))
    return out

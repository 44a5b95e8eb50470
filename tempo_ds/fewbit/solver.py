"""Optimal piecewise-constant approximations of a derivative, by exact dynamic programming.

Problem. Given f', a weight w >= 0 and K = 2**bits, find borders b_1 < ... < b_{K-1} and levels
q_1..q_K minimising the weighted L2 error

    E = integral (f'(x) - q(x))^2 w(x) dx,      q(x) = q_k on (b_{k-1}, b_k],  b_0 = -inf, b_K = +inf.

For fixed borders the best level on an interval is the w-weighted mean of f' there, and the interval
then costs S2 - S1^2 / S0 with S0 = int w, S1 = int w f', S2 = int w f'^2 over it. So only the borders
are free, and restricted to a grid x_0 < ... < x_{N-1} the problem is a shortest path with exactly K
edges: D_k(j) = min_{i<j} D_{k-1}(i) + cost(i, j), D_0 = [0, inf, ...], answer D_K(N-1). Prefix sums of
w, w f', w f'^2 at the grid points make each cost O(1), so one pass is O(K N^2) additions, vectorised
over the split point i. The D_k of one pass hold the optimum for every k <= K, so one run at K = 16
gives the 1-, 2-, 3- and 4-bit tables together. The result is the exact optimum over borders on the
grid (the global one, up to grid resolution). A polish then moves the borders off the grid to the
continuous optimum nearby, where the optimality conditions hold to rounding: each level is the
w-weighted mean of f' on its interval, and at each inner border f' equals the mean of the two
neighbouring levels (unless the border sits on a jump of f').

Weights (``weight=``):

* ``"uniform"`` (default): w = 1 on [-range, range];
* ``"gaussian"``: the standard normal density on [-range, range];
* a callable: a density evaluated on float64 tensors, on [-range, range];
* a histogram ``(counts, edges)`` as ``torch.histogram`` / ``numpy.histogram`` return it: w is
  counts / width on each bin, and the bin edges are the grid (``range`` and ``grid`` are then unused).

Tails. The weight is zero outside the range (outside the histogram's edges), so the outer levels are
the means of f' over [-range, b_1] and [b_{K-1}, range]; the codes extend the outer intervals to
-inf and +inf. With the default range 10 every smooth function in the registry but softsign (f' decays
like 1/x^2; f'(10) = 0.008) has reached its limits at the ends to within 5e-4 (GELU: f'(-10) = -8e-22),
so inputs beyond +-10 get an outer level that is the mean of f' over a long, nearly flat stretch: for
GELU -0.016 and 1.016 at 2 bits, -0.0026 and 1.0026 at 3 bits (limits 0 and 1). A wider range pulls
the outer levels closer to the limits at the price of the middle.

The function's breakpoints (kinks and jumps of f', e.g. Hardswish's +-3) are added to the grid, so f'
is smooth inside every cell and 8-point Gauss-Legendre quadrature per cell is exact to rounding. f' is
centred on its weighted mean before the prefix sums, which keeps the cancellation in S2 - S1^2/S0 small.
A polish step then moves the borders off the grid to the continuous optimum (``_polish``).
"""
from __future__ import annotations

import builtins
from typing import Callable, NamedTuple, Union

import numpy as np
import torch

from .functions import get

__all__ = ["Table", "solve", "solve_all", "l2_error", "default_grid", "DEFAULT_RANGE", "DEFAULT_GRID"]

DEFAULT_RANGE = 10.0
DEFAULT_GRID = 4001          # grid step 0.005 on [-10, 10]; the 4-bit pass takes about a second
_GAUSS_NODES = 8
_BLOCK_ROWS = 512            # rows of the N x N cost matrix built at once
_NEWTON_STEPS = 50

Weight = Union[str, Callable[[torch.Tensor], torch.Tensor], tuple]


class Table(NamedTuple):
    """A piecewise-constant derivative: ``levels[k]`` on the k-th interval between ``borders``.

    ``borders``: float64 tensor [K - 1], increasing; ``levels``: float64 tensor [K]. An input x falls
    in interval ``sum_j (x > borders[j])`` (a border belongs to the interval on its left).
    """

    borders: torch.Tensor
    levels: torch.Tensor


def default_grid(range: float = DEFAULT_RANGE, grid: int = DEFAULT_GRID) -> np.ndarray:
    """The solver's grid of candidate borders: ``grid`` evenly spaced points on [-range, range]."""
    if not range > 0 or grid < 3:
        raise ValueError(f"need range > 0 and grid >= 3, got range={range!r}, grid={grid!r}")
    return np.linspace(-range, range, grid)


def _fprime_of(name_or_fprime) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[float, ...]]:
    if isinstance(name_or_fprime, str):
        act = get(name_or_fprime)
        return act.derivative, act.breakpoints
    if callable(name_or_fprime):
        return name_or_fprime, ()
    raise TypeError(f"expected an activation name or a callable f', got {type(name_or_fprime).__name__}")


def _grid_and_density(weight: Weight, range: float, grid: int):
    """The base grid and w as a function of a float64 array (w at points strictly inside grid cells)."""
    if isinstance(weight, str):
        x = default_grid(range, grid)
        if weight == "uniform":
            return x, np.ones_like
        if weight == "gaussian":
            return x, lambda t: np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
        raise ValueError(f"unknown weight {weight!r}; use 'uniform', 'gaussian', a density or (counts, edges)")
    if callable(weight):
        return default_grid(range, grid), lambda t: torch.as_tensor(weight(torch.from_numpy(t))).double().numpy()
    counts, edges = (np.asarray(torch.as_tensor(t, dtype=torch.float64)) for t in weight)
    if edges.ndim != 1 or counts.shape != (edges.size - 1,) or np.any(np.diff(edges) <= 0) or np.any(counts < 0):
        raise ValueError("a histogram weight is (counts [B], edges [B + 1]) with increasing edges and counts >= 0")
    density = counts / np.diff(edges)
    return edges, lambda t: density[np.clip(np.searchsorted(edges, t, side="right") - 1, 0, density.size - 1)]


class _Moments:
    """Prefix integrals P(t) = int_{x_0}^t of (w, w g, w g^2, 1, g), g = f' - centre, at any t in range.

    ``grid`` holds P at the grid points; ``at(t)`` adds the partial cell up to t by quadrature.
    """

    def __init__(self, x: np.ndarray, fprime, density, breakpoints, centre: float | None = None):
        self.breakpoints = np.asarray(sorted(b for b in breakpoints if x[0] < b < x[-1]), dtype=np.float64)
        x = np.union1d(x, self.breakpoints)       # breakpoints are candidate borders too
        self.x, self.fprime, self.density = x, fprime, density
        self.nodes, self.node_weights = np.polynomial.legendre.leggauss(_GAUSS_NODES)
        if centre is None:
            raw = self._pieces(x[:-1], x[1:], 0.0)
            if not raw[0].sum() > 0:
                raise ValueError("the weight has no mass on the grid")
            centre = float(raw[1].sum() / raw[0].sum())
        self.centre = centre
        per_cell = self._pieces(x[:-1], x[1:], centre)
        self.grid = np.concatenate([np.zeros((5, 1)), np.cumsum(per_cell, axis=1)], axis=1)

    def _pieces(self, a: np.ndarray, b: np.ndarray, centre: float) -> np.ndarray:
        """Integrals over [a, b] (both in one grid cell, where f' is smooth): [5, len(a)]."""
        t = 0.5 * (b - a)[:, None] * self.nodes[None, :] + 0.5 * (a + b)[:, None]
        qw = 0.5 * (b - a)[:, None] * self.node_weights[None, :]
        w = self.density(t) * qw
        g = self.fprime(torch.from_numpy(t)).double().numpy() - centre
        return np.stack([w.sum(1), (w * g).sum(1), (w * g * g).sum(1), qw.sum(1), (qw * g).sum(1)])

    def at(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        cell = np.clip(np.searchsorted(self.x, t, side="right") - 1, 0, self.x.size - 2)
        return self.grid[:, cell] + self._pieces(self.x[cell], t, self.centre)


def _segment_cost(Pa: np.ndarray, Pb: np.ndarray) -> np.ndarray:
    s0, s1, s2 = Pb[0] - Pa[0], Pb[1] - Pa[1], Pb[2] - Pa[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(np.where(s0 > 0, s2 - s1 * s1 / s0, 0.0), 0.0)


def _levels(m: _Moments, b: np.ndarray):
    """Prefix moments at [x_0, borders, x_N], interval weights S0 and levels (means of f' - centre)."""
    P = m.at(np.concatenate([[m.x[0]], b, [m.x[-1]]]))
    s0 = np.diff(P[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return P, s0, np.diff(P[1]) / s0


def _residual(m: _Moments, b: np.ndarray):
    """F_i = 2 f'(b_i) - q_i - q_{i+1} (zero at an optimal border) and its tridiagonal Jacobian."""
    _, s0, q = _levels(m, b)
    q = q + m.centre
    h = 1e-6 * np.maximum(1.0, np.abs(b))
    fp = m.fprime(torch.from_numpy(b)).double().numpy()
    fpp = (m.fprime(torch.from_numpy(b + h)) - m.fprime(torch.from_numpy(b - h))).double().numpy() / (2 * h)
    w = m.density(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_left = w * (fp - q[:-1]) / s0[:-1]         # d q_i / d b_i      (b_i is q_i's right end)
        d_right = -w * (fp - q[1:]) / s0[1:]         # d q_{i+1} / d b_i  (b_i is q_{i+1}'s left end)
    J = np.diag(2 * fpp - d_left - d_right)
    i = np.arange(b.size - 1)
    J[i + 1, i] = -d_right[:-1]                      # d F_{i+1} / d b_i = -d q_{i+1} / d b_i
    J[i, i + 1] = -d_left[1:]                        # d F_i / d b_{i+1} = -d q_{i+1} / d b_{i+1}
    return 2 * fp - q[:-1] - q[1:], J


def _newton(m: _Moments, b: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Newton's method on F(b) = 0 for the free borders, halving steps that do not shrink max |F|."""
    F, J = _residual(m, b)
    size = np.abs(F[free]).max(initial=0.0)
    for _ in builtins.range(_NEWTON_STEPS):
        if not size > 1e-14:
            break
        try:
            delta = np.zeros_like(b)
            delta[free] = np.linalg.solve(J[np.ix_(free, free)], -F[free])
        except np.linalg.LinAlgError:
            break
        for lam in 0.5 ** np.arange(12):
            nb = b + lam * delta
            if not (np.all(np.diff(nb) > 0) and nb[0] > m.x[0] and nb[-1] < m.x[-1]):
                continue
            nF, nJ = _residual(m, nb)
            if np.isfinite(nF[free]).all() and np.abs(nF[free]).max() < size:
                b, F, J, size = nb, nF, nJ, np.abs(nF[free]).max()
                break
        else:
            break
    return b


def _polish(m: _Moments, borders: np.ndarray) -> np.ndarray:
    """Move the grid-optimal borders off the grid to the continuous optimum nearby.

    At an optimum with w > 0 and f' continuous at the border, the error's derivative in border b_i,
    w(b_i) (q_{i+1} - q_i) (2 f'(b_i) - q_i - q_{i+1}), vanishes: F_i = 2 f'(b_i) - q_i - q_{i+1} = 0.
    Borders on a breakpoint of f' (a jump, as Hardswish's at +-3) stay there. Newton's method on F
    (tridiagonal Jacobian, f'' by central differences, steps halved until max |F| shrinks), started from
    the grid optimum, converges in a few steps. Should it stall, the point it reached is returned; the
    caller keeps it only if its error is not larger than the grid optimum's.
    """
    free = ~np.isin(borders, m.breakpoints)
    if not free.any():
        return borders
    return _newton(m, borders.astype(np.float64), free)


def _table_from_borders(m: _Moments, borders: np.ndarray) -> tuple[Table, float]:
    P, s0, q = _levels(m, borders)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(s0 > 0, q, np.diff(P[4]) / np.diff(P[3])) + m.centre   # zero weight: plain mean of f'
    error = float(_segment_cost(P[:, :-1], P[:, 1:]).sum())
    return Table(torch.from_numpy(borders.copy()), torch.from_numpy(levels)), error


def _costs(P: np.ndarray) -> np.ndarray:
    """C[j, i] = cost of one interval from grid point i to grid point j (inf unless i < j)."""
    n = P.shape[1]
    C = np.empty((n, n))
    for lo in builtins.range(0, n, _BLOCK_ROWS):
        hi = min(n, lo + _BLOCK_ROWS)
        c = _segment_cost(P[:3, None, :], P[:3, lo:hi, None])
        c[np.arange(lo, hi)[:, None] <= np.arange(n)[None, :]] = np.inf
        C[lo:hi] = c
    return C


def _dp(C: np.ndarray, K: int) -> np.ndarray:
    """arg[k - 1, j]: where the last of the best k intervals from point 0 to point j starts, k = 1..K."""
    n = C.shape[0]
    D = np.full(n, np.inf)
    D[0] = 0.0
    arg = np.empty((K, n), dtype=np.int64)
    for k in builtins.range(K):
        Dn = np.empty(n)
        for lo in builtins.range(0, n, _BLOCK_ROWS):
            T = C[lo:lo + _BLOCK_ROWS] + D[None, :]
            a = T.argmin(axis=1)
            arg[k, lo:lo + _BLOCK_ROWS] = a
            Dn[lo:lo + _BLOCK_ROWS] = T[np.arange(T.shape[0]), a]
        D = Dn
    return arg


def _backtrack(arg: np.ndarray, k: int) -> list[int]:
    """Grid indices 0 = i_0 < i_1 < ... < i_k = N - 1 of the best k intervals."""
    j, points = arg.shape[1] - 1, [arg.shape[1] - 1]
    for step in builtins.range(k - 1, -1, -1):
        j = int(arg[step, j])
        points.append(j)
    assert points[-1] == 0
    return points[::-1]


def solve_all(name_or_fprime, bits=(1, 2, 3, 4), weight: Weight = "uniform", range: float = DEFAULT_RANGE,
              grid: int = DEFAULT_GRID, polish: bool = True) -> dict[int, tuple[Table, float]]:
    """Optimal tables for several bit widths from one DP pass: ``{bits: (table, error)}``.

    ``error`` is the minimised integral of (f' - q)^2 w. ``polish=False`` returns the exact optimum
    over borders on the grid; by default the borders then move to the continuous optimum nearby.
    """
    bits = sorted(set(bits))
    if not bits or bits[0] < 1 or bits[-1] > 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    fprime, breakpoints = _fprime_of(name_or_fprime)
    x, density = _grid_and_density(weight, range, grid)
    K = 2 ** bits[-1]
    if x.size - 1 < K:
        raise ValueError(f"a grid of {x.size} points cannot hold {K} intervals")
    m = _Moments(x, fprime, density, breakpoints)
    arg = _dp(_costs(m.grid), K)
    out = {}
    for b in bits:
        borders = m.x[_backtrack(arg, 2 ** b)[1:-1]]
        out[b] = _table_from_borders(m, borders)
        if polish:
            polished = _table_from_borders(m, _polish(m, borders))
            if polished[1] <= out[b][1]:
                out[b] = polished
    return out


def solve(name_or_fprime, bits: int, weight: Weight = "uniform", range: float = DEFAULT_RANGE,
          grid: int = DEFAULT_GRID, polish: bool = True) -> Table:
    """The optimal ``2**bits``-interval table for f' (a registry name or a callable) under ``weight``.

    See the module docstring for the weights, the tails, the grid and the polish.
    """
    return solve_all(name_or_fprime, (bits,), weight, range, grid, polish)[bits][0]


def l2_error(name_or_fprime, table, weight: Weight = "uniform", range: float = DEFAULT_RANGE,
             grid: int = DEFAULT_GRID) -> float:
    """integral of (f' - q)^2 w for any table ``(borders, levels)`` (ours or someone else's).

    The same weight conventions as :func:`solve`; the integrals run exactly from border to border (not
    from grid point to grid point), so the figure does not depend on where the borders fall.
    """
    fprime, breakpoints = _fprime_of(name_or_fprime)
    borders = np.asarray(torch.as_tensor(table[0], dtype=torch.float64)).reshape(-1)
    levels = np.asarray(torch.as_tensor(table[1], dtype=torch.float64)).reshape(-1)
    if levels.size != borders.size + 1:
        raise ValueError(f"a table of {levels.size} levels needs {levels.size - 1} borders, got {borders.size}")
    x, density = _grid_and_density(weight, range, grid)
    ends = np.concatenate([[x[0]], np.clip(borders, x[0], x[-1]), [x[-1]]])
    m = _Moments(x, fprime, density, breakpoints)
    P = m.at(ends)
    s0, s1, s2 = (P[r, 1:] - P[r, :-1] for r in (0, 1, 2))
    q = levels - m.centre               # moments are of g = f' - centre
    return float(np.sum(s2 - 2 * q * s1 + q * q * s0))   # int w (g - q)^2 on each interval

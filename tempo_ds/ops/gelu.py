"""In-place GELU: keep the output and one bit per element for backward, never the input.

Forward::

    y = GELU(x) = x * Phi(x)                                  (approximate="none", Phi the normal cdf)
    y = x * sigmoid(2u),  u = sqrt(2/pi) * (x + 0.044715 x^3)  (approximate="tanh")

computed by ``F.gelu`` itself, so the output is bit-for-bit PyTorch's. GELU has one minimum, at
(x_min, y_min); each y in (y_min, 0) has two preimages, one on each side of x_min, so the forward
also keeps the branch bit ``x >= x_min``, packed eight to a byte by ``pack_bits``.

Backward finds x again from (y, bit), with a fixed amount of work per element (no data-dependent
loop), in float32 (float64 for float64 inputs), and returns ``dy * GELU'(x)``:

1. ``s = +-sqrt(y - y_min)``, signed by the bit. In s the inverse is analytic through the minimum,
   where dx/dy is infinite (GELU'(x) ~ +-sqrt(y - y_min) there); y - y_min is formed exactly.
2. Near the minimum (|s| <= S_A, |x - x_min| < ~0.2) a degree-8 polynomial ``x = A(s)`` is the answer
   (error < 2e-8 in x). No Newton step there: y is known to ~1 ulp, which pins x down only to
   ~sqrt(ulp), and the polynomial already does better than a residual evaluated in float32.
3. Elsewhere a guess good to ~3e-3 -- ``R(s)`` on the right branch up to s = S_R and ``x = y`` beyond
   (GELU(x) = x to float precision there), ``L(s)`` on the left branch down to S_L and, on the left
   tail where y ~ phi(x) -> 0-, ``T(log(-log(-y)))`` -- refined by Newton steps on GELU(x) = y: 2 in
   float32, 3 in float64, 1 for fp16/bf16 inputs (whose own rounding is far coarser than what is
   left). All but the last step use PyTorch's own GELU and GELU backward (fast); the last takes
   GELU, GELU' and GELU'' from erfc (erf form) or sigmoid (tanh form), because F.gelu's 1 + erf(.)
   and 1 + tanh(.) cancel as x -> -inf (and the vectorised CPU kernels are noisy there). The step is
   ``f * d / (d^2 + damping)`` with f = GELU(x) - y, d = GELU'(x), damping 1 inside the minimum's
   region (where the step is then a rounding error) and TAU elsewhere, so a derivative that
   underflowed gives a zero step, not NaN.
4. GELU'(x) of the last iterate is carried to the corrected x to first order (d - GELU''(x) * step),
   and ``dx = dy * GELU'(x)``.

An output on the left branch that underflowed to 0 or -0 maps to the x of y = -Y_TINY (about -13 for
erf, -10 for tanh), where |GELU'| < 1e-35: the limit 0 to well below any dtype's resolution of a
gradient. NaN in y gives NaN in dx; x = +-inf give NaN, as PyTorch's own GELU backward does.

The PyTorch backward works through CHUNK elements at a time in one reused float32 workspace of
8 x CHUNK (8 MiB), so its temporaries do not grow with the activation. On CUDA (or under Triton's
interpreter with TEMPO_DS_TRITON=1) both passes run the kernels of ``tempo_ds.kernels.gelu``, the
same maths fused into one pass each.

Accuracy. Even an exact inverse cannot beat the floor GELU'(GELU^-1(y)) - GELU'(x) set by y having
been rounded to the working dtype (near the minimum it is ~sqrt(ulp(y_min))). ``tests/test_gelu.py``
derives it with a float64 bisection inverse of the very outputs saved, and this op meets it (ratio
<= 1.01 to that floor rounded to the dtype) in fp32, fp16 and bf16, for both forms, in max abs error
over [-10, 10], near the minimum and for x < -3, and in RMS relative error over N(0, 1).

Saved for backward: y (n * element size: the next Linear saves that very tensor, so it costs nothing
extra) and the packed branch bits (ceil(n / 8) bytes). Nothing is saved, and no bit computed, when
grad is disabled or x does not require grad. The input is never modified: "in place" is about what is
kept, not about writing over x.

Custom ops: ``tempo_ds::inplace_gelu_fwd(x, approximate) -> (y, bits)`` and ``tempo_ds::inplace_gelu_bwd(y,
bits, dy, approximate) -> dx``, triton ops (``tempo_ds.ops._library``: on CUDA torch.compile sees the kernel
launches, elsewhere they call the opaque ``_fwd_opaque`` / ``_bwd_opaque``), joined by ``register_autograd``. Both are
out of place (``mutates_args=()``). Writing y over x would need ``mutates_args={"x"}``: functionalization
would then turn it back into a copy under torch.compile/export (no memory saved there), and in eager it
would break every other reader of x -- autograd's saved copies of x elsewhere (version check), the
residual stream, a checkpointed region's input (rule 3). What makes the op lean is what it keeps, not
where it writes, so the out-of-place form is the sound one and loses nothing. y is always contiguous.

Constants. The erf form's minimum is x_min = -0.75179152469356446, y_min = -0.16997120747990366
(mpmath.findroot of Phi(x) + x phi(x) at 40 digits; the -0.751791631228899 quoted by Tempo is off by
1.1e-7, which moves y_min by 2e-15). The tanh form's, found the same way on the mpmath derivative of
0.5 x (1 + tanh(u)): x_min = -0.75246142207101626, y_min = -0.17004075057125405. The polynomials are
float64 least-squares fits on Chebyshev nodes against a bisection inverse (the procedure is
``_fit_tables`` in tests/test_gelu.py, which re-fits them and checks their errors).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._bits import pack_bits, unpack_bits
from ._dispatch import use_triton
from ._library import LIB, host_constant, kernels_visible, no_autocast, triton_op

__all__ = ["inplace_gelu", "APPROXIMATE"]

APPROXIMATE = ("none", "tanh")

S_A = 0.1      # |s| <= S_A: the minimum's polynomial region (|x - x_min| < ~0.2)
S_R = 2.0      # right branch: R(s) for S_A < s <= S_R, x ~ y beyond (y > 3.83)
S_L = -0.36    # left branch: L(s) for S_L <= s < -S_A (x > ~-2.07), the tail polynomial below
Y_TINY = 1e-37  # the tail guess clamps -y to >= Y_TINY (log is slow below ~1e-38); |GELU'| < 1e-35 there
CHUNK = 1 << 18  # elements per block of the PyTorch backward (a multiple of 8: whole bytes of bits)
TAU = 1e-30    # Newton damping outside the minimum's region: only matters where GELU'(x)^2 < 1e-30
_K0, _K1 = math.sqrt(2 / math.pi), 0.044715  # the tanh form's u = K0 * (x + K1 * x^3)


class InverseTable(NamedTuple):
    """Constants of one GELU form for the inverse (polynomial coefficients from degree 0 up)."""

    x_min: float
    y_min: float
    a: tuple[float, ...]  # x = A(s), |s| <= S_A
    r: tuple[float, ...]  # guess x = R(s), S_A < s <= S_R
    l: tuple[float, ...]  # guess x = L(s), S_L <= s < -S_A
    t: tuple[float, ...]  # guess x = T(log(-log(-y))), -y in [Y_TINY, -y_l]
    y_l: float            # y at s = S_L: S_L^2 + y_min


TABLES = {
    "none": InverseTable(
        x_min=-0.7517915246935645,
        y_min=-0.16997120747990366,
        a=(-0.7517915247291208, 2.152918605219663, -1.3903039082200448, 2.3498547131586967,
           -3.9110155622511495, 7.319620253999913, -14.303802566136367, 32.26470982149203,
           -68.02876790004922),
        r=(-0.7317825415168066, 1.880051677604761, -0.1757139916264353, -0.35981930135936685,
           0.47408282724334144, -0.10001775630542555),
        l=(-0.9155392487261291, -1.7197252999558774, -34.26375888444915, -117.6866888750493,
           -167.5065586106617),
        t=(-0.05400488078412949, -2.0609517378814273, 0.5403820858364967, -0.2490971477341584,
           0.03307786572133397, -0.003158621780073519),
        y_l=-0.040371207479903665,
    ),
    "tanh": InverseTable(
        x_min=-0.7524614220710163,
        y_min=-0.17004075057125405,
        a=(-0.7524614221307667, 2.155652790555623, -1.3946213820595088, 2.347558260744891,
           -3.883221775301575, 7.227671861324253, -14.053665614121785, 31.549003138903434,
           -66.35150642712878),
        r=(-0.7325086665213395, 1.883797999330855, -0.1858777611849714, -0.34585336274468287,
           0.46548816997259296, -0.0981550566840149),
        l=(-0.9101081823589032, -1.5740786004264395, -33.07168023692029, -113.412583879268,
           -161.87526478677418),
        t=(-0.16715756698784526, -1.7830383246707093, 0.2824582149273324, -0.14828973239222706,
           0.021363433044371556, -0.0016211452799200041),
        y_l=-0.04044075057125407,
    ),
}


def check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate={approximate!r} is not supported; allowed values: "
                         + ", ".join(repr(a) for a in APPROXIMATE))


@host_constant
def branch_threshold(approximate: str, dtype: torch.dtype) -> float:
    """The least ``dtype`` value >= x_min: for x of that dtype, ``x >= threshold`` iff x >= x_min."""
    x_min = TABLES[approximate].x_min
    t = torch.tensor(x_min, dtype=torch.float64).to(dtype)
    if t.item() < x_min:
        t = torch.nextafter(t, torch.zeros((), dtype=dtype))
    return t.item()


@host_constant
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``: a host constant, computed once (no tensor read per call)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def newton_steps(dtype: torch.dtype) -> int:
    """Newton steps after the guess: enough for the compute precision of ``dtype`` inputs."""
    return {torch.float64: 3, torch.float32: 2}.get(dtype, 1)


_COEFFICIENTS: dict = {}


def _coefficients(approximate: str, key: str, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One polynomial of ``TABLES[approximate]`` as 0-dim tensors (for ``addcmul``), cached per dtype/device."""
    cache_key = (approximate, key, like.dtype, like.device)
    if cache_key not in _COEFFICIENTS:
        values = getattr(TABLES[approximate], key)
        _COEFFICIENTS[cache_key] = tuple(torch.tensor(c, dtype=like.dtype, device=like.device) for c in values)
    return _COEFFICIENTS[cache_key]


def _horner(approximate: str, key: str, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = polynomial ``key`` of the table at ``t``; ``out`` must not alias ``t``."""
    c = _coefficients(approximate, key, t)
    torch.mul(t, getattr(TABLES[approximate], key)[-1], out=out).add_(c[-2])
    for ck in reversed(c[:-2]):
        torch.addcmul(ck, out, t, out=out)
    return out


def gelu_derivatives(x: torch.Tensor, approximate: str, out: tuple[torch.Tensor, ...]) -> None:
    """Write GELU(x), GELU'(x), GELU''(x) into ``out[0:3]`` (``out[3]`` is scratch), accurate as x -> -inf.

    ``F.gelu`` and PyTorch's GELU backward form 1 + erf(.) and 1 + tanh(.), which cancel for x < -3
    (and the vectorised CPU kernels are noisy there); erfc and sigmoid do not.
    """
    g, d, h, k = out
    if approximate == "none":
        torch.mul(x, -math.sqrt(0.5), out=g)
        torch.mul(g, g, out=k).neg_().exp_().mul_(1 / math.sqrt(2 * math.pi))  # phi(x)
        torch.special.erfc(g, out=g).mul_(0.5)                                 # Phi(x)
        torch.mul(x, x, out=h).neg_().add_(2).mul_(k)                          # phi (2 - x^2)
        torch.addcmul(g, x, k, out=d)                                          # Phi + x phi
        g.mul_(x)
        return
    # v = 2u, p = sigmoid(v): G = x p, G' = p + x p (1 - p) v', G'' = p (1 - p) (2 v' + x ((1 - 2p) v'^2 + v''))
    torch.mul(x, x, out=g).mul_(2 * _K0 * _K1).add_(2 * _K0).mul_(x)            # v
    torch.neg(g, out=d).sigmoid_()                                                # 1 - p, exact near p = 1
    g.sigmoid_()                                                                  # p
    d.mul_(g)                                                                     # p (1 - p)
    torch.mul(x, x, out=k).mul_(6 * _K0 * _K1).add_(2 * _K0)                    # v'
    torch.mul(g, -2, out=h).add_(1).mul_(k).mul_(k).mul_(x).add_(k, alpha=2)
    h.addcmul_(x, x, value=12 * _K0 * _K1).mul_(d)
    d.mul_(k).mul_(x).add_(g)
    g.mul_(x)


def gelu_slope_from_output(y: torch.Tensor, right: torch.Tensor, approximate: str, steps: int,
                           work: torch.Tensor) -> torch.Tensor:
    """GELU'(x) for the x with GELU(x) = y on the branch ``right`` (1.0: x >= x_min, 0.0: x < x_min).

    ``y`` and ``right`` are flat float tensors of the compute dtype (float32 or float64), only read;
    ``work`` is scratch of shape [6, len(y)], and the result is one of its rows. Fixed work per
    element: no data-dependent loop.
    """
    tab = TABLES[approximate]
    s, x, in_a, u, v, w = work
    y_hi = _rounded(tab.y_min, y.dtype)
    torch.sub(y, y_hi, out=s).sub_(tab.y_min - y_hi).clamp_min_(0).sqrt_()  # y - y_hi is exact
    s.copysign_(torch.sub(right, 0.5, out=w))

    torch.clamp(s, -S_A, S_A, out=w)
    torch.eq(w, s, out=in_a)
    _horner(approximate, "a", w, out=x)                        # the answer near the minimum
    torch.neg(y, out=w).clamp_(Y_TINY, -tab.y_l).log_().neg_().log_()
    _horner(approximate, "t", w, out=u)                        # left tail guess
    torch.clamp(s, S_L, -S_A, out=w)
    u.lerp_(_horner(approximate, "l", w, out=v), torch.ge(s, S_L, out=w))  # left branch guess
    torch.clamp(s, S_A, S_R, out=w)
    _horner(approximate, "r", w, out=v).add_(torch.sub(y, S_R * S_R + tab.y_min, out=w).clamp_min_(0))
    u.lerp_(v, right)                                           # guess off the minimum
    x.lerp_(u, torch.sub(1, in_a, out=w))

    damping = in_a.add_(TAU)
    step, slope, curvature, scratch = s, u, v, w
    ones = torch.ones((), dtype=y.dtype, device=y.device).expand(y.shape)
    for _ in range(steps - 1):  # the cheap kind: PyTorch's own (vectorised, but noisy for x < -3) GELU
        torch.ops.aten.gelu.out(x, approximate=approximate, out=step).sub_(y)
        torch.ops.aten.gelu_backward.grad_input(ones, x, approximate=approximate, grad_input=slope)
        step.mul_(slope).div_(slope.mul_(slope).add_(damping))
        x.sub_(step)
    gelu_derivatives(x, approximate, (step, slope, curvature, scratch))  # the last step: accurate everywhere
    step.sub_(y).mul_(slope).div_(torch.mul(slope, slope, out=scratch).add_(damping))
    x.sub_(step)
    return slope.addcmul_(curvature, step, value=-1)  # GELU' at the new x, to first order in the step


def _grad_from_output(y: torch.Tensor, packed: torch.Tensor, dy: torch.Tensor, approximate: str) -> torch.Tensor:
    """PyTorch path of the backward: dx = dy * GELU'(GELU^-1(y)) on the branch stored in ``packed``.

    Works through CHUNK elements at a time in one reused workspace (8 x CHUNK floats), so the
    temporaries of the backward stay a few MiB whatever the size of y.
    """
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    n, steps = y.numel(), newton_steps(y.dtype)
    y, dy = y.reshape(-1), dy.reshape(-1)
    dx = torch.empty(n, dtype=y.dtype, device=y.device)
    workspace = torch.empty(8, min(n, CHUNK), dtype=compute, device=y.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        work = workspace[:, :stop - start]
        right = work[6].copy_(unpack_bits(packed[start // 8:(stop + 7) // 8], 1, stop - start))
        yc = y[start:stop] if y.dtype == compute else work[7].copy_(y[start:stop])
        slope = gelu_slope_from_output(yc, right, approximate, steps, work[:6])
        torch.mul(slope, dy[start:stop], out=dx[start:stop])
    return dx


def _kernel_path(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this tensor (they compute in float32: never for float64)."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and use_triton(x)


def _triton_forward(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tempo_ds.kernels import gelu as kernel

    y, packed = kernel.forward(x, approximate)
    return y.view(x.shape), packed


def _triton_backward(y: torch.Tensor, packed: torch.Tensor, dy: torch.Tensor, approximate: str) -> torch.Tensor:
    from tempo_ds.kernels import gelu as kernel

    return kernel.backward(y, packed, dy, approximate).view(y.shape)


@torch.library.custom_op(f"{LIB}::inplace_gelu_fwd_opaque", mutates_args=())
def _fwd_opaque(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GELU(x) contiguous, packed branch bits uint8 [ceil(n / 8)])``: the PyTorch path (or the interpreted
    kernels), opaque to torch.compile (``_library``)."""
    with no_autocast(x):
        if _kernel_path(x):
            return _triton_forward(x, approximate)
        # F.gelu itself (an out= into another layout can take another, differently rounding CPU loop);
        # a non-contiguous x costs one copy so the output's layout is known to the fake implementation
        y = F.gelu(x, approximate=approximate).contiguous()
        return y, pack_bits(x >= branch_threshold(approximate, x.dtype), 1)


@_fwd_opaque.register_fake
def _(x, approximate):
    return x.new_empty(x.shape), x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op(f"{LIB}::inplace_gelu_bwd_opaque", mutates_args=())
def _bwd_opaque(y: torch.Tensor, packed: torch.Tensor, dy: torch.Tensor, approximate: str) -> torch.Tensor:
    """``dy * GELU'(GELU^-1(y))`` on the branch in ``packed``: the PyTorch path (or the interpreted kernels)."""
    with no_autocast(y):
        if _kernel_path(y):
            return _triton_backward(y, packed, dy, approximate)
        return _grad_from_output(y, packed, dy, approximate).view(y.shape)


@_bwd_opaque.register_fake
def _(y, packed, dy, approximate):
    return y.new_empty(y.shape)


def _kernels():
    from tempo_ds.kernels import gelu as kernel

    return kernel._forward_kernel, kernel._backward_kernel


@triton_op(f"{LIB}::inplace_gelu_fwd", kernels=_kernels)
def _fwd(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GELU(x) contiguous, packed branch bits uint8 [ceil(n / 8)])``: the kernel launch itself on CUDA
    (visible to torch.compile), the opaque op elsewhere."""
    if kernels_visible(x) and _kernel_path(x):
        with no_autocast(x):
            return _triton_forward(x, approximate)
    return _fwd_opaque(x, approximate)


@triton_op(f"{LIB}::inplace_gelu_bwd", kernels=_kernels)
def _bwd(y: torch.Tensor, packed: torch.Tensor, dy: torch.Tensor, approximate: str) -> torch.Tensor:
    """``dy * GELU'(GELU^-1(y))`` on the branch in ``packed``: y's shape and dtype, contiguous."""
    if kernels_visible(y) and _kernel_path(y):
        with no_autocast(y):
            return _triton_backward(y, packed, dy, approximate)
    return _bwd_opaque(y, packed, dy, approximate)


def _setup_context(ctx, inputs, output):
    ctx.approximate = inputs[1]
    ctx.save_for_backward(*output)  # y (shared with the next Linear) and the packed bits


def _backward(ctx, dy, _dbits):
    y, packed = ctx.saved_tensors
    return _bwd(y, packed, dy, ctx.approximate), None


torch.library.register_autograd(f"{LIB}::inplace_gelu_fwd", _backward, setup_context=_setup_context)


def inplace_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate)`` that keeps its output and 1 bit per element for backward, not x.

    Returns a new tensor (x is never overwritten); since backward reads that output, modifying it in
    place before backward is an error (autograd's version check says so). Where no gradient is
    needed it is ``F.gelu``.
    """
    check_approximate(approximate)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.gelu(x, approximate=approximate)
    return _fwd(x, approximate)[0]

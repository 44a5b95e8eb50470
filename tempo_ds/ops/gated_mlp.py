"""A gated MLP's elementwise part fused into its down projection: keep the gate and up outputs only.

Forward (g, u: [..., i]; weight: [o, i]; bias: [o] or None)::

    a = act(g);  h = a * u;  out = h @ weight^T + bias          act = SiLU ("silu") or tanh-GELU ("gelu_tanh")

With ``up=None`` the first argument is a fused ``gate_up_proj`` output gu [..., 2i], split as
``g, u = gu.chunk(2, -1)`` (Phi-3, and the 3-D MoE experts of transformers 5).

Backward, given dout::

    dh = dout @ weight;   h = act(g) * u (recomputed);   dweight = dout^T h;   dbias = sum_rows dout
    da = dh * u;   dg = act_backward(da, g);   du = dh * act(g)          (d gu = [dg | du])

HF's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` keeps four [..., i] tensors for backward: g (for
act'), a and u (for the product) and h (for dweight). This op keeps g and u only -- or gu, the same bytes --
plus the weight and bias Parameter objects themselves (ZeRO-3: the Parameter, never a cast copy or a view),
at the cost of recomputing ``act(g) * u`` once in backward. Saved: ``2 * n * element size`` (n =
g.numel()), where HF saves ``4 * n``; the gate and up Linears' own input (the norm output) is unchanged.

Exact. The PyTorch path runs the very kernels autograd runs for HF's module, in the same order on the same
operands: ``F.silu`` / ``F.gelu(approximate="tanh")``, ``*``, ``F.linear``; in backward ``mm`` with
``dout2.mm(weight)`` and ``dout2.t().mm(h2)`` (what ``mm``'s backward picks for a Linear's row-major input
and transposed weight), ``sum(0)`` for the bias, ``aten.silu_backward`` / ``aten.gelu_backward``. So the
forward output and every gradient equal the unfused model's bit for bit, in float32, in bfloat16/float16,
and under autocast (the matmuls run in the autocast dtype, dweight/dbias are cast back to the
Parameters' dtype as autograd does for autocast's cast copies). The Triton path (CUDA) computes the
elementwise part in one kernel with the same rounding points (``tempo_ds.kernels.gated_mlp``).

The ops ``tempo_ds::gated_mlp_fwd`` / ``_bwd`` are triton ops (``tempo_ds.ops._library``): on CUDA torch.compile
sees the matmuls and the kernel launches; elsewhere they call the opaque ``gated_mlp_fwd_opaque`` /
``_bwd_opaque``, whose PyTorch path Inductor must not refuse (it is exact against HF's module bit for bit).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from ._library import LIB, autocast_dtype, kernels_visible, no_autocast, triton_op
from ._zero import gathered, held_parameters, hold_parameters

__all__ = ["gated_mlp", "ACTIVATIONS", "check_activation"]

ACTIVATIONS = ("silu", "gelu_tanh")


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_mlp: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, "
                         f"got {activation!r}")
    return activation


# -- the elementwise part ----------------------------------------------------------------------------
def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def _act_backward(da: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(da, g)
    return torch.ops.aten.gelu_backward(da, g, approximate="tanh")


def _split(g: torch.Tensor, u: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return g.chunk(2, dim=-1) if u is None else (g, u)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a [rows, cols] view with unit column stride, or None if no such view exists."""
    try:
        t2 = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return t2 if t2.stride(1) == 1 or t2.shape[1] <= 1 else None


def _kernel_views(*tensors: torch.Tensor):
    """[rows, cols] views the Triton kernels take, or None (then the PyTorch path runs)."""
    if not use_triton(tensors[0]):
        return None
    from tempo_ds.kernels import gated_mlp as kernel

    views = [_rows(t) for t in tensors]
    if any(v is None for v in views) or not kernel.supports(*views):
        return None
    return kernel, views


def _hidden(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(g) * u, contiguous, in the promoted dtype of g and u."""
    found = _kernel_views(g, u)
    if found is None:
        return _act(g, activation) * u
    kernel, (g2, u2) = found
    return kernel.forward(g2, u2, activation).view(g.shape)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """As autocast casts a matmul operand: eligible floating tensors to ``dtype``; float64 stays."""
    if t is None or dtype is None or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def _out_dtype(g: torch.Tensor, u: Optional[torch.Tensor], weight: torch.Tensor,
               compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    h_dtype = g.dtype if u is None else torch.promote_types(g.dtype, u.dtype)
    if compute_dtype is None or h_dtype == torch.float64:
        return h_dtype
    return compute_dtype


# -- custom ops ----------------------------------------------------------------------------------------
def _forward(g, u, weight, bias, activation: str, compute_dtype) -> torch.Tensor:
    with no_autocast(g):
        gg, uu = _split(g, u)
        h = _hidden(gg, uu, activation)
        return F.linear(_cast(h, compute_dtype), _cast(weight, compute_dtype), _cast(bias, compute_dtype))


@torch.library.custom_op(f"{LIB}::gated_mlp_fwd_opaque", mutates_args=())
def _fwd_opaque(g: torch.Tensor, u: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: str, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``_fwd`` by HF's exact operations (or the interpreted kernel), opaque to torch.compile."""
    return _forward(g, u, weight, bias, activation, compute_dtype)


@_fwd_opaque.register_fake
def _(g, u, weight, bias, activation, compute_dtype):
    shape = (*g.shape[:-1], weight.shape[0])
    return g.new_empty(shape, dtype=_out_dtype(g, u, weight, compute_dtype))


def _backward_impl(dout, g, u, weight, bias, activation: str, compute_dtype, needs) -> list[torch.Tensor]:
    need_in, need_w, need_b = needs
    dg, du, dw, db = (dout.new_empty(0) for _ in range(4))
    with no_autocast(dout):
        gg, uu = _split(g, u)
        dout2 = dout.reshape(-1, dout.shape[-1])
        h_dtype = torch.promote_types(gg.dtype, uu.dtype)
        dh = None
        if need_in:
            with gathered(weight):
                dh = dout2.mm(_cast(weight, compute_dtype)).view(*gg.shape[:-1], -1).to(h_dtype)
        found = _kernel_views(dh, gg, uu) if dh is not None else None
        if found is not None:
            kernel, (dh2, g2, u2) = found
            if u is None:
                dgu = torch.empty(g.shape, dtype=g.dtype, device=g.device)
                i = gg.shape[-1]  # narrow, not [..., :i]: indexing takes a device guard (see layer_norm)
                dg_out, du_out = _rows(dgu.narrow(-1, 0, i)), _rows(dgu.narrow(-1, i, i))
            else:
                dg_out, du_out = torch.empty_like(g2), torch.empty_like(u2)
            h2 = torch.empty_like(g2) if need_w else None
            kernel.backward(dh2, g2, u2, activation, dg_out, du_out, h2)
            if u is None:
                dg = dgu
            else:
                dg, du = dg_out.view(g.shape), du_out.view(u.shape)
            h = h2.view(gg.shape) if need_w else None
        elif not need_in:
            h = _hidden(gg, uu, activation) if need_w else None
        else:
            a = _act(gg, activation)
            h = a * uu if need_w else None
            dgg = _act_backward(dh * uu, gg, activation)
            duu = dh * a
            if u is None:
                dg = torch.cat([dgg, duu], dim=-1)
            else:
                dg, du = dgg, duu
        if need_w:
            h2 = _cast(h, compute_dtype).reshape(-1, h.shape[-1])
            dw = dout2.t().mm(h2).to(weight.dtype)
        if need_b:
            db = dout2.sum(0).to(bias.dtype)
    return [dg, du, dw, db]


@torch.library.custom_op(f"{LIB}::gated_mlp_bwd_opaque", mutates_args=())
def _bwd_opaque(dout: torch.Tensor, g: torch.Tensor, u: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str, compute_dtype: Optional[torch.dtype],
                needs: list[bool]) -> list[torch.Tensor]:
    """``_bwd`` by HF's exact operations (or the interpreted kernel), opaque to torch.compile."""
    return _backward_impl(dout, g, u, weight, bias, activation, compute_dtype, needs)


@_bwd_opaque.register_fake
def _(dout, g, u, weight, bias, activation, compute_dtype, needs):
    need_in, need_w, need_b = needs
    i = g.shape[-1] if u is not None else g.shape[-1] // 2
    dg = g.new_empty(g.shape) if need_in else dout.new_empty(0)
    du = u.new_empty(u.shape) if need_in and u is not None else dout.new_empty(0)
    dw = dout.new_empty((dout.shape[-1], i), dtype=weight.dtype) if need_w else dout.new_empty(0)
    db = dout.new_empty((dout.shape[-1],), dtype=bias.dtype) if need_b and bias is not None else dout.new_empty(0)
    return [dg, du, dw, db]


def _visible(g: torch.Tensor, u: Optional[torch.Tensor]) -> bool:
    """Whether the triton ops run their body themselves: CUDA, compiled kernels, and views the kernels take (else
    the body is plain PyTorch, which stays behind the opaque op so Inductor does not re-round it)."""
    return kernels_visible(g) and _kernel_views(*_split(g, u)) is not None


def _kernels():
    from tempo_ds.kernels import gated_mlp as kernel

    return kernel.gated_forward_kernel, kernel.gated_backward_kernel


@triton_op(f"{LIB}::gated_mlp_fwd", kernels=_kernels)
def _fwd(g: torch.Tensor, u: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
         activation: str, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``F.linear(act(g) * u, weight, bias)``: on CUDA the kernel launch and the matmul themselves (visible to
    torch.compile), elsewhere the opaque op."""
    if _visible(g, u):
        return _forward(g, u, weight, bias, activation, compute_dtype)
    return _fwd_opaque(g, u, weight, bias, activation, compute_dtype)


@triton_op(f"{LIB}::gated_mlp_bwd", kernels=_kernels)
def _bwd(dout: torch.Tensor, g: torch.Tensor, u: Optional[torch.Tensor], weight: torch.Tensor,
         bias: Optional[torch.Tensor], activation: str, compute_dtype: Optional[torch.dtype],
         needs: list[bool]) -> list[torch.Tensor]:
    """[d gate (or d gate_up), d up (empty when fused), d weight, d bias]; an empty tensor for each
    gradient ``needs`` (gate/up, weight, bias) leaves out."""
    if _visible(g, u):
        return _backward_impl(dout, g, u, weight, bias, activation, compute_dtype, needs)
    return _bwd_opaque(dout, g, u, weight, bias, activation, compute_dtype, needs)


def _setup_context(ctx, inputs, output):
    g, u, weight, bias, activation, compute_dtype = inputs
    ctx.activation, ctx.compute_dtype = activation, compute_dtype
    ctx.save_for_backward(g, u, weight, bias)
    hold_parameters(ctx, weight, bias)


def _backward(ctx, dout):
    g, u, weight, bias = ctx.saved_tensors
    weight, bias = held_parameters(ctx, weight, bias)
    need_g, need_u, need_w, need_b = ctx.needs_input_grad[:4]
    need_in = need_g or (u is not None and need_u)
    dg, du, dw, db = _bwd(dout, g, u, weight, bias, ctx.activation, ctx.compute_dtype,
                          [need_in, need_w, need_b and bias is not None])
    return (dg if need_g else None, du if (need_u and u is not None) else None, dw if need_w else None,
            db if (need_b and bias is not None) else None, None, None)


torch.library.register_autograd(f"{LIB}::gated_mlp_fwd", _backward, setup_context=_setup_context)


# -- the public wrapper ------------------------------------------------------------------------------
def gated_mlp(gate: torch.Tensor, up: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None = None,
              activation: str = "silu") -> torch.Tensor:
    """``F.linear(act(gate) * up, weight, bias)``, keeping only ``gate`` and ``up`` for backward (the product
    and ``act(gate)`` are recomputed there, for the input gradients and for ``weight``'s gradient).

    ``up=None``: ``gate`` is a fused gate_up output [..., 2i] whose halves are gate and up; only it is kept.
    ``activation``: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU). ``weight`` [o, i], ``bias`` [o] are the
    down projection's Parameters, saved as the objects themselves. Under autocast the matmul runs in the
    autocast dtype, as ``F.linear`` would.
    """
    check_activation(activation)
    for name, t in (("gate", gate), ("up", up), ("weight", weight), ("bias", bias)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise TypeError(f"gated_mlp: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if gate.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"gated_mlp: gate must have at least one dimension and weight must be 2-D [out, in]; "
                         f"got gate {tuple(gate.shape)}, weight {tuple(weight.shape)}")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gated_mlp: a fused gate_up input (up=None) needs an even last dimension, got "
                             f"{tuple(gate.shape)}")
        i = gate.shape[-1] // 2
    else:
        if up.shape != gate.shape:
            raise ValueError(f"gated_mlp: gate and up must have one shape, got {tuple(gate.shape)} and "
                             f"{tuple(up.shape)}")
        i = gate.shape[-1]
    if weight.shape[1] != i:
        raise ValueError(f"gated_mlp: weight must be [out, {i}] for gate's last dimension {i}, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"gated_mlp: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return _fwd(gate, up, weight, bias, activation, autocast_dtype(gate))

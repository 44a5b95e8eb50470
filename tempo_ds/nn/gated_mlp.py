"""``GatedMLP``: a HF gated MLP (SwiGLU / GeGLU) whose down projection keeps only the gate and up outputs.

``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` -- Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo2, Granite,
Cohere, StableLM and the dense MLPs of MoE models -- and Phi-3's ``gate, up = gate_up_proj(x).chunk(2, -1);
down_proj(up * activation_fn(gate))``. ``GatedMLP.from_module`` recognises these by structure, never by
class name: the children (exactly ``nn.Linear`` projections and a SiLU / tanh-GELU module that computes
exactly ``F.silu`` / ``F.gelu(approximate="tanh")``) and the ``forward`` source, compared as a syntax tree
with the forms above. Anything else raises ``TypeError`` with the reason, so a policy skips and reports it.

The new module keeps the original Parameter objects in submodules of the same names (``gate_proj``,
``up_proj`` / ``gate_up_proj`` are the original ``nn.Linear`` objects; ``down_proj`` is a
:class:`GatedDownProjection` holding the original weight and bias), so ``state_dict`` keys, optimizers and
ZeRO-3 partitions carry over, and DeepSpeed's per-module hooks gather the down weight when it is called.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from tempo_ds.ops.gated_mlp import check_activation, gated_mlp

__all__ = ["GatedMLP", "GatedDownProjection", "gated_activation", "is_gated_mlp_candidate"]

_DENSE = ("gate_proj", "up_proj", "down_proj")
_FUSED = ("gate_up_proj", "down_proj")
_PLAIN_ATTRS = ("config", "hidden_size", "intermediate_size")

_FORMS = {
    "dense": [
        "def forward(self, x):\n    y = self.down_proj(self.ACT(self.gate_proj(x)) * self.up_proj(x))\n    return y",
        "def forward(self, x):\n    return self.down_proj(self.ACT(self.gate_proj(x)) * self.up_proj(x))",
        "def forward(self, x):\n    y = self.down_proj(self.up_proj(x) * self.ACT(self.gate_proj(x)))\n    return y",
        "def forward(self, x):\n    return self.down_proj(self.up_proj(x) * self.ACT(self.gate_proj(x)))",
    ],
    "fused": [
        "def forward(self, x):\n    y = self.gate_up_proj(x)\n    g, y = y.chunk(2, dim=-1)\n"
        "    y = y * self.ACT(g)\n    return self.down_proj(y)",
        "def forward(self, x):\n    y = self.gate_up_proj(x)\n    g, y = y.chunk(2, dim=-1)\n"
        "    y = self.ACT(g) * y\n    return self.down_proj(y)",
    ],
}


class GatedDownProjection(nn.Module):
    """A down projection applied to ``act(gate) * up``: ``forward(gate, up)`` returns
    ``F.linear(act(gate) * up, weight, bias)`` through :func:`tempo_ds.ops.gated_mlp`, which keeps only
    ``gate`` and ``up`` for backward. ``up=None``: ``gate`` is a fused [..., 2i] gate_up output.
    Parameters as ``nn.Linear``'s: ``weight`` [out, in], ``bias`` [out] or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "silu",
                 device=None, dtype=None) -> None:
        super().__init__()
        check_activation(activation)
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        if not self.weight.is_meta:
            nn.Linear.reset_parameters(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str) -> "GatedDownProjection":
        """Holding ``linear``'s own Parameter objects (nothing copied)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"the down projection must be an nn.Linear, not {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return gated_mlp(gate, up, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}")


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (or Phi-3's fused ``gate_up_proj``) keeping, for the
    elementwise part and the down projection, only the gate and up outputs: 2 tensors of [..., i] where HF
    keeps 4. Build it with :meth:`from_module`."""

    def __init__(self, projections: dict[str, nn.Module], down: GatedDownProjection, act_name: str,
                 act_module: nn.Module) -> None:
        super().__init__()
        for name, module in projections.items():
            self.add_module(name, module)
        self.down_proj = down
        self.fused = "gate_up_proj" in projections
        self.act_name = act_name
        self.add_module(act_name, act_module)  # kept for introspection; the op computes the activation

    @classmethod
    def from_module(cls, mlp: nn.Module) -> "GatedMLP":
        """The fused twin of a HF gated MLP, holding its Parameter objects; ``TypeError`` naming the reason when
        ``mlp`` is not a gated MLP this module reproduces exactly. Liger-Kernel's gated MLPs are taken where
        their maths is verified (``tempo_ds.liger``)."""
        from tempo_ds.liger import is_liger, mlp_from_liger

        if is_liger(mlp):
            return mlp_from_liger(mlp)
        children = dict(mlp.named_children())
        layout = "fused" if "gate_up_proj" in children else "dense"
        names = _FUSED if layout == "fused" else _DENSE
        act_names = [n for n in children if n not in names]
        if len(act_names) != 1 or any(n not in children for n in names):
            raise TypeError(f"{type(mlp).__name__} has children {sorted(children)}; a gated MLP has "
                            f"{' + '.join(names)} + one activation")
        act_name = act_names[0]
        for n in names:
            if type(children[n]) is not nn.Linear:
                raise TypeError(f"{type(mlp).__name__}.{n} is a {type(children[n]).__name__}, not an nn.Linear")
        if list(mlp._parameters) or list(mlp._buffers):
            raise TypeError(f"{type(mlp).__name__} holds parameters or buffers of its own")
        if any((m._forward_hooks or m._forward_pre_hooks) for m in (mlp, children["down_proj"], children[act_name])):
            raise TypeError(f"{type(mlp).__name__} (or its down projection or activation) has forward hooks that the "
                            "fused module would not run")
        activation = gated_activation(children[act_name])
        if activation is None:
            raise TypeError(f"{type(mlp).__name__}.{act_name} is {type(children[act_name]).__name__}, which is not "
                            "exactly SiLU or tanh-GELU (F.silu / F.gelu(approximate='tanh'))")
        if not _forward_matches(type(mlp), layout, act_name):
            raise TypeError(f"{type(mlp).__name__}.forward is not down_proj({act_name}(gate_proj(x)) * up_proj(x))"
                            + (" with gate, up = gate_up_proj(x).chunk(2, -1)" if layout == "fused" else ""))
        down = children["down_proj"]
        if layout == "fused":
            if children["gate_up_proj"].out_features != 2 * down.in_features:
                raise TypeError(f"{type(mlp).__name__}: gate_up_proj gives {children['gate_up_proj'].out_features} "
                                f"features, down_proj takes {down.in_features} (needs half)")
        elif not (children["gate_proj"].out_features == children["up_proj"].out_features == down.in_features):
            raise TypeError(f"{type(mlp).__name__}: gate_proj, up_proj and down_proj sizes do not chain")
        projections = {n: children[n] for n in names if n != "down_proj"}
        new = cls(projections, GatedDownProjection.from_linear(down, activation), act_name, children[act_name])
        for attr in _PLAIN_ATTRS:
            if attr in mlp.__dict__:
                setattr(new, attr, mlp.__dict__[attr])
        return new.train(mlp.training)

    @property
    def activation(self) -> str:
        return self.down_proj.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(self.gate_up_proj(x))
        return self.down_proj(self.gate_proj(x), self.up_proj(x))


def gated_activation(module: nn.Module) -> str | None:
    """``"silu"`` or ``"gelu_tanh"`` when ``module`` computes exactly ``F.silu`` or
    ``F.gelu(approximate="tanh")`` (the kernels the fused op runs), else None. HF's other tanh-GELU classes
    (NewGELU, FastGELU, ...) spell the formula out in other float orders and are not taken."""
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else None
    try:
        from transformers import activations as hf
    except ImportError:
        return None
    if type(module) is getattr(hf, "SiLUActivation", None) and _source_is(type(module).forward,
                                                                         "return nn.functional.silu(input)"):
        return "silu"
    if type(module) is getattr(hf, "GELUTanh", None) and type(module).forward is hf.GELUTanh.forward:
        act = getattr(module, "act", None)
        if (isinstance(act, functools.partial) and act.func is F.gelu and not act.args
                and act.keywords == {"approximate": "tanh"}):
            return "gelu_tanh"
    return None


def is_gated_mlp_candidate(module: nn.Module) -> bool:
    """Whether ``module`` is shaped like a gated MLP (gate/up/down or gate_up/down projections), so that a
    policy should try :meth:`GatedMLP.from_module` on it and report why when it fails."""
    if isinstance(module, GatedMLP):
        return False
    names = set(dict(module.named_children()))
    return set(_DENSE) <= names or set(_FUSED) <= names


# -- recognising the forward -----------------------------------------------------------------------------
def _source_is(fn, body: str) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    stmts = _strip_docstring(tree.body[0].body)
    return len(stmts) == 1 and ast.dump(stmts[0]) == ast.dump(ast.parse(body).body[0])


def _strip_docstring(body: list) -> list:
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        return body[1:]
    return body


class _Canonical(ast.NodeTransformer):
    """Local names renamed v0, v1, ... by first appearance; annotations, decorators and docstrings dropped."""

    def __init__(self, act_name: str | None = None):
        self.names: dict[str, str] = {}
        self.act_name = act_name

    def _rename(self, name: str) -> str:
        if name == "self":
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_FunctionDef(self, node):
        node.decorator_list, node.returns, node.name = [], None, "forward"
        node.body = _strip_docstring(node.body)
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg, node.annotation = self._rename(node.arg), None
        return node

    def visit_Name(self, node):
        node.id = self._rename(node.id)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if self.act_name and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and node.attr == self.act_name:
            node.attr = "ACT"
        return node


def _canonical(source: str, act_name: str | None) -> str | None:
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    fn = tree.body[0]
    if fn.args.vararg or fn.args.kwarg or fn.args.kwonlyargs or fn.args.defaults or len(fn.args.args) != 2:
        return None
    return ast.dump(_Canonical(act_name).visit(tree))


@functools.lru_cache(maxsize=None)
def _forms(layout: str) -> frozenset[str]:
    return frozenset(_canonical(src, "ACT") for src in _FORMS[layout])


def _forward_matches(cls: type, layout: str, act_name: str) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return _canonical(source, act_name) in _forms(layout)

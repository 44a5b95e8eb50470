"""``QKNormRopeAttention``: a HF attention whose q/k norms and RoPE run as one op keeping only the rotated q/k.

Qwen3, Gemma 3 and OLMo 2 normalise q and k before ``apply_rotary_pos_emb``; the norms' outputs feed RoPE, which
keeps nothing of them, so an in-place norm's kept output is held by nobody else. Here both norms and the
rotation run as :func:`tempo_ds.ops.qk_norm_rope`, which keeps the rotated q/k that attention keeps anyway.

Recognised by code, never by class name (as ``tempo_ds.nn.gated_mlp`` recognises MLPs): the attention's
``forward`` body, with local names canonicalised, must be one of the three forms below (transformers 5.x:
Qwen3 and its copies -- per-head norm, then RoPE; Gemma 3 -- the same after the transpose, and
``sliding_window`` passed on; OLMo 2/3 -- a norm over the whole projection); its module's
``apply_rotary_pos_emb`` and ``rotate_half`` must be HF's (plain, or OLMo 2's cast back to q's dtype); and
both norms must run one arithmetic tempo_ds reproduces (``tempo_ds.nn.rms_norm``: Llama's, OLMo 2's, Gemma's
``1 + w``). Anything else raises ``TypeError`` with the reason (the policy skips it, and the plain in-place
norms replace its q/k norms as before).

The new module holds the original children (``q_proj`` ... ``k_norm``, so ``state_dict`` keys, optimizers and
ZeRO-3 partitions carry over) and the original's plain attributes (``config``, ``layer_idx``, ``scaling``,
``sliding_window``, ...), which transformers' attention functions read. Its forward is HF's with
``q_norm``/``k_norm``/``apply_rotary_pos_emb`` replaced by the fused op: the same values bit for bit (the norm
is per row, so normalising before or after the transpose is the same arithmetic). With grad disabled
(evaluation, generation) or rotary tables that require grad it runs HF's own forward.
"""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap

import torch
from torch import nn

from tempo_ds.ops._zero import gathered
from tempo_ds.ops.qk_norm_rope import qk_norm_rope

from .rms_norm import _computes_like_gemma, _computes_like_llama, _computes_like_olmo2

__all__ = ["QKNormRopeAttention", "is_qk_norm_attention_candidate"]

_CHILDREN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_ARGS = ("self", "hidden_states", "position_embeddings", "attention_mask", "past_key_values")

_HEAD = """
input_shape = hidden_states.shape[:-1]
hidden_shape = (*input_shape, -1, self.head_dim)
"""
_TAIL = """
cos, sin = position_embeddings
query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
if past_key_values is not None:
    key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask, dropout=DROPOUT, scaling=self.scaling, SLIDING**kwargs)
attn_output = attn_output.reshape(*input_shape, -1).contiguous()
attn_output = self.o_proj(attn_output)
return (attn_output, attn_weights)
"""
_DROP_A, _DROP_B = "0.0 if not self.training else self.attention_dropout", "self.attention_dropout if self.training else 0.0"
_SLIDING = "sliding_window=self.sliding_window, "
# name: (body, norm over the whole projection, passes sliding_window)
_FORMS = {
    "qwen3": ("""
query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
""", False, True),
    "gemma3": ("""
query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
query_states = self.q_norm(query_states)
key_states = self.k_norm(key_states)
""", False, True),
    "olmo2": ("""
query_states = self.q_norm(self.q_proj(hidden_states))
key_states = self.k_norm(self.k_proj(hidden_states))
value_states = self.v_proj(hidden_states)
query_states = query_states.view(hidden_shape).transpose(1, 2)
key_states = key_states.view(hidden_shape).transpose(1, 2)
value_states = value_states.view(hidden_shape).transpose(1, 2)
""", True, False),
}
_ROPE = {
    "plain": """
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return (q_embed, k_embed)
""",
    "cast_back": """
q_type, k_type = (q.dtype, k.dtype)
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return (q_embed.to(q_type), k_embed.to(k_type))
""",
}
_ROTATE_HALF = """
x1 = x[..., :x.shape[-1] // 2]
x2 = x[..., x.shape[-1] // 2:]
return torch.cat((-x2, x1), dim=-1)
"""


class _Locals(ast.NodeTransformer):
    """Local names (arguments and assigned names) renamed v0, v1, ... by first appearance; globals kept."""

    def __init__(self, local: set[str]):
        self.local, self.names = local, {}

    def visit_Name(self, node):
        if node.id in self.local:
            node.id = self.names.setdefault(node.id, f"v{len(self.names)}")
        return node


def _body_key(stmts: list, args: tuple[str, ...]) -> str:
    local = set(args) - {"self"}
    for stmt in stmts:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                local.add(node.id)
    module = ast.Module(body=stmts, type_ignores=[])
    renamer = _Locals(local)
    for arg in args:  # arguments first, in order, so their canonical names do not depend on first use
        if arg != "self":
            renamer.names[arg] = f"v{len(renamer.names)}"
    return ast.dump(renamer.visit(module))


def _function(fn) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    node = tree.body[0]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.FunctionDef(name="f", args=node.args, body=body, decorator_list=[], returns=None, type_params=[])


@functools.lru_cache(maxsize=None)
def _source_key(source: str, args: tuple[str, ...]) -> str:
    return _body_key(ast.parse(textwrap.dedent(source)).body, args)


@functools.lru_cache(maxsize=None)  # keyed on the function object: a patched forward or RoPE is a new key
def _fn_key(fn, args: tuple[str, ...]) -> str | None:
    node = _function(fn)
    if node is None or tuple(a.arg for a in node.args.args) != args:
        return None
    return _body_key(node.body, args)


@functools.lru_cache(maxsize=None)
def _attention_forms() -> dict[str, tuple[str, bool, bool]]:
    forms = {}
    for name, (body, whole, sliding) in _FORMS.items():
        for drop in (_DROP_A, _DROP_B):
            tail = _TAIL.replace("DROPOUT", drop).replace("SLIDING", _SLIDING if sliding else "")
            forms[_source_key(_HEAD + body + tail, _ARGS)] = (name, whole, sliding)
    return forms


def _rope_kind(module_globals: dict) -> str | None:
    """"plain" or "cast_back" when the module's ``apply_rotary_pos_emb`` and ``rotate_half`` are HF's, else None."""
    rope, rotate = module_globals.get("apply_rotary_pos_emb"), module_globals.get("rotate_half")
    if not callable(rope) or not callable(rotate):
        return None
    return _rope_kind_of(rope, rotate)


@functools.lru_cache(maxsize=None)
def _rope_kind_of(rope, rotate) -> str | None:
    if _fn_key(rotate, ("x",)) != _source_key(_ROTATE_HALF, ("x",)):
        return None
    args = ("q", "k", "cos", "sin", "unsqueeze_dim")
    node = _function(rope)
    if node is None or [d.value for d in node.args.defaults if isinstance(d, ast.Constant)] != [1]:
        return None
    key = _fn_key(rope, args)
    return next((kind for kind, src in _ROPE.items() if key == _source_key(src, args)), None)


def _norm_kind(norm: nn.Module) -> str | None:
    if hasattr(norm, "variance_epsilon") and _computes_like_llama(norm):
        return "llama"
    if hasattr(norm, "variance_epsilon") and _computes_like_olmo2(norm):
        return "olmo2"
    if hasattr(norm, "eps") and _computes_like_gemma(norm):
        return "gemma"
    return None


def is_qk_norm_attention_candidate(module: nn.Module) -> bool:
    """Whether ``module`` looks like an attention with q/k norms (children ``q_proj`` ... ``k_norm``), so a
    policy should try :meth:`QKNormRopeAttention.from_module` and report why when it fails."""
    names = set(dict(module.named_children()))
    return set(_CHILDREN) <= names and not isinstance(module, QKNormRopeAttention)


class QKNormRopeAttention(nn.Module):
    """A HF q/k-norm attention (module docstring) whose norms and RoPE run as :func:`tempo_ds.ops.qk_norm_rope`.
    Build it with :meth:`from_module`."""

    @classmethod
    def from_module(cls, attention: nn.Module) -> "QKNormRopeAttention":
        """The fused twin of ``attention``, holding its children and attributes; ``TypeError`` naming the reason
        when its code is not one this module reproduces exactly."""
        name = type(attention).__name__
        children = dict(attention.named_children())
        missing = [c for c in _CHILDREN if c not in children]
        if missing:
            raise TypeError(f"{name} has no {', '.join(missing)}")
        if list(attention._parameters) or list(attention._buffers):
            raise TypeError(f"{name} holds parameters or buffers of its own")
        if any(m._forward_hooks or m._forward_pre_hooks for m in (attention, children["q_norm"], children["k_norm"])):
            raise TypeError(f"{name} (or its q_norm / k_norm) has forward hooks that the fused op would not run")
        # a forward set on the instance (a patch, accelerate's hooks) would be copied below and run the original
        if "forward" in attention.__dict__:
            raise TypeError(f"{name} has an instance-level forward (a patch or an accelerate hook), which the "
                            "fused module would not reproduce")
        form = _attention_forms().get(_fn_key(type(attention).forward, _ARGS))
        if form is None:
            raise TypeError(f"{name}.forward is not one of the q/k-norm attention forms tempo_ds fuses (Qwen3, "
                            "Gemma 3, OLMo 2 of transformers 5)")
        module_globals = getattr(sys.modules.get(type(attention).forward.__module__), "__dict__", {})
        rope = _rope_kind(module_globals)
        if rope is None:
            raise TypeError(f"{name}'s module does not define HF's apply_rotary_pos_emb and rotate_half (patched by "
                            "another library?)")
        kinds = {_norm_kind(children["q_norm"]), _norm_kind(children["k_norm"])}
        if len(kinds) != 1 or None in kinds:
            raise TypeError(f"{name}'s q_norm / k_norm ({type(children['q_norm']).__name__}, "
                            f"{type(children['k_norm']).__name__}) do not both run one RMSNorm arithmetic tempo_ds "
                            "reproduces (Llama's, OLMo 2's, Gemma's 1 + w)")
        _, whole, sliding = form
        head_dim = getattr(attention, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim % 2:
            raise TypeError(f"{name}.head_dim is {head_dim!r}, not an even int")
        new = _fused_instance(type(attention))
        nn.Module.__init__(new)
        for key, value in attention.__dict__.items():
            if not key.startswith("_") and key != "training":
                setattr(new, key, value)
        for child_name, child in children.items():
            new.add_module(child_name, child)
        new._hf_forward = type(attention).forward
        new._eager = module_globals.get("eager_attention_forward")
        new._attention_functions = module_globals.get("ALL_ATTENTION_FUNCTIONS")
        new._whole, new._sliding, new._cast_back, new._norm = whole, sliding, rope == "cast_back", kinds.pop()
        if new._attention_functions is None:
            raise TypeError(f"{name}'s module has no ALL_ATTENTION_FUNCTIONS")
        return new.train(attention.training)

    def _rotated(self, projection: torch.Tensor, norm: nn.Module, cos, sin) -> torch.Tensor:
        # the norm module is not called, so ZeRO-3's hooks do not gather its weight: gathered() does (the op keeps
        # the Parameter itself and gathers it again in backward)
        with gathered(norm.weight):
            return self._rotated_gathered(projection, norm, cos, sin)

    def _rotated_gathered(self, projection: torch.Tensor, norm: nn.Module, cos, sin) -> torch.Tensor:
        if self._norm == "gemma":  # HF's float32 scale 1 + w (float64 stays float64), as InplaceGemmaRMSNorm
            w = norm.weight
            return qk_norm_rope(projection, 1.0 + (w if w.dtype == torch.float64 else w.float()), cos, sin, norm.eps,
                                casting="torch", whole=self._whole, cast_back=self._cast_back)
        return qk_norm_rope(projection, norm.weight, cos, sin, norm.variance_epsilon,
                            casting="llama" if self._norm == "llama" else "torch", whole=self._whole,
                            cast_back=self._cast_back)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        if (not torch.is_grad_enabled() or cos is None or cos.requires_grad or sin.requires_grad
                or cos.dim() != 3):
            return self._hf_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                    **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self._rotated(self.q_proj(hidden_states).view(hidden_shape), self.q_norm, cos, sin)
        key_states = self._rotated(self.k_proj(hidden_states).view(hidden_shape), self.k_norm, cos, sin)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = self._attention_functions.get_interface(self.config._attn_implementation, self._eager)
        if self._sliding:
            kwargs["sliding_window"] = self.sliding_window
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def __reduce__(self):  # the class is made per HF class: pickled as (HF class, state), not by its name
        return _fused_instance, (type(self).__mro__[2],), self.__dict__

    def extra_repr(self) -> str:
        return (f"from={type(self).__mro__[2].__name__}, norm={self._norm!r}, "
                + ("over the projection" if self._whole else "per head"))


@functools.lru_cache(maxsize=None)
def _fused_class(hf_class: type) -> type:
    """``QKNormRopeAttention`` made a subclass of ``hf_class`` too (its ``__init__`` never runs), so that what
    looks for the HF class by ``isinstance`` still finds it: transformers' hooks that record ``output_attentions``,
    a user's own checks."""
    fused = type(f"QKNormRope{hf_class.__name__}", (QKNormRopeAttention, hf_class), {})
    fused.__module__ = __name__
    return fused


def _fused_instance(hf_class: type) -> QKNormRopeAttention:
    """An uninitialised instance of :func:`_fused_class` (what unpickling fills with the module's state)."""
    return object.__new__(_fused_class(hf_class))

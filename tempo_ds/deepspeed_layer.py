"""``TempoTransformerLayer``: a drop-in for DeepSpeed's training kernel layer, built from tempo_ds ops.

DeepSpeed's ``deepspeed.ops.transformer.DeepSpeedTransformerLayer`` fuses a BERT layer into CUDA kernels and
offers three memory switches, ``normalize_invertible``, ``gelu_checkpoint`` and ``attn_dropout_checkpoint``
(the ideas Tempo published). It needs CUDA, has no bfloat16 and fails on DeepSpeed's CPU accelerator. This
layer takes the same ``DeepSpeedTransformerConfig``, has the same constructor, parameters (names, shapes,
order), ``initial_weights`` / ``initial_biases`` ordering, ``init_transformer_weights`` and forward
signature, and computes the same maths with ``tempo_ds.ops`` on any device and in float32, float16 and
bfloat16. ``bert_layer_policy()`` swaps it into HF BERT models. DeepSpeed is imported only to build the
configs of that policy; transformers only when the policy or ``TempoBertLayer`` is used.

Forward (``x`` [B, S, h], ``a`` heads of size ``d = h / a``, ``i`` intermediate size, ``M`` the mask)::

    pre_layer_norm=True (DeepSpeed's default)          pre_layer_norm=False (post-LN, = HF BertLayer)
    u   = LN(x; norm_w, norm_b)                        u   = x
    q, k, v = split(u attn_qkvw^T + attn_qkvb)         (same)
    c   = drop_a(softmax(q k^T / sqrt(d) + M)) v       (same)
    r   = x + drop_h(c attn_ow^T + attn_ob)            (same)
    f   = LN(r; attn_nw, attn_nb)                      (same)
    g   = GELU(f inter_w^T + inter_b) output_w^T + output_b
    out = r + drop_h(g)                                out = LN(f + drop_h(g); norm_w, norm_b)

with dropout ``drop_a`` at ``attn_dropout_ratio`` and ``drop_h`` at ``hidden_dropout_ratio`` (training only),
``norm_*`` the LayerNorm at the layer's input (pre-LN) or output (post-LN) and ``attn_n*`` the one after
attention, as in DeepSpeed's kernel (``csrc/transformer/ds_transformer_cuda.cpp``). Backward is
autograd's through the tempo_ds Functions. The switches select what is kept for backward:

=========================  ==============================================  =========================================
switch                     on                                              off
=========================  ==============================================  =========================================
normalize_invertible       ``inplace_layer_norm``: LN output + rstd        LN input + float32 mean and rstd
                                                                           (``inplace_layer_norm(keep_input=True)``)
gelu_checkpoint            ``gelu_linear``: GELU input only, GELU          ``F.gelu`` + ``F.linear``: GELU input and
                           recomputed in backward (exact)                  GELU output
attn_dropout_checkpoint    ``attention(mode="lean")``: q, k, v, output,    ``attention(mode="tempo")``: q, k, v, the
                           log-sum-exp; scores recomputed in backward      softmax output and a 1-bit dropout mask
=========================  ==============================================  =========================================

Why ``attn_dropout_checkpoint`` maps that way. DeepSpeed's flag (= Tempo's attention-dropout recomputation)
keeps the softmax output and recomputes the dropped probabilities in backward; without it DeepSpeed also
keeps the dropped probabilities and a byte mask. Both states of the flag keep an s x s tensor per head.
Here "off" keeps what DeepSpeed keeps with its flag *on*, with the mask packed to 1 bit (``mode="tempo"``:
softmax output + 1-bit mask, no scores recomputed), already below DeepSpeed's off state; "on" goes further
in the direction the flag asks for — trade recompute for memory — and keeps no s x s tensor at all
(``mode="lean"``, FlashAttention-style recompute of the scores). So each switch, turned on, never costs memory and never changes the maths.

Bytes kept for backward per token, per layer of a stack (``e`` = element size, ``B*S`` tokens). All
switches on, either LayerNorm placement: ``(6h + i)*e + 2*4 + 4*a`` — q, k, v (3h, one fused QKV output), the
attention output (h, the very storage the output projection keeps), two LayerNorm outputs (2h, each also the
input the next Linear keeps anyway), the GELU input (i), two float32 rstd and a float32 log-sum-exp per head.
Dropout keeps nothing (masks come back from a seed, ``seed_dropout``). Turning a switch off adds:

* normalize_invertible: ``2*h*e`` (the LayerNorm inputs) plus both LayerNorms' float32 mean and rstd
  (``2*8`` bytes), minus the ``2*4`` bytes of rstd. Off, the LayerNorm backward runs in float32 (16-bit
  weight and bias gradients summed over rows in float32, unlike PyTorch's CPU kernel);
* gelu_checkpoint: ``i*e`` (the GELU output);
* attn_dropout_checkpoint: ``a*S*e - 4*a`` (the softmax output instead of the log-sum-exp), plus a 1-bit mask,
  ``ceil(B*a*S*S / 8)`` bytes per call, with attention dropout in training.

A layer measured alone differs by what its neighbours would hold: post-LN, its input (the previous layer's
output, ``h*e``) is kept by its QKV Linear, and with normalize_invertible off nothing keeps its own output.
The attention mask is kept as given, by reference (so once for all layers that share it).

Where it differs from DeepSpeed's layer:

* GELU: DeepSpeed's kernel computes the tanh approximation; so does this layer by default
  (``approximate="tanh"``). ``approximate="none"`` gives the exact erf GELU (HF BERT's ``"gelu"``).
* ``initial_biases[0:3]`` (q, k, v biases) become ``attn_qkvb``; DeepSpeed zeroes ``attn_qkvb`` whatever is
  passed (its tests pass zeros). As in DeepSpeed, the other given tensors are kept as the very same Parameter
  objects, and q, k, v are concatenated into a new ``attn_qkvw``. If only one of the two lists is given, the
  other group is initialised as ``init_transformer_weights`` would (DeepSpeed leaves it undefined).
* ``adjust_init_range`` rescales the output projections' init whenever it is true, as DeepSpeed documents;
  DeepSpeed's code applies it only when ``local_rank == 0``.
* Randomness: dropout seeds come from torch's global generator (so ``torch.manual_seed`` and every checkpoint
  flavour govern them); ``config.seed`` is not used. ``stochastic_mode`` (DeepSpeed's faster, non-deterministic
  kernels) is accepted and ignored: this layer is deterministic. ``batch_size`` (DeepSpeed's workspace bound),
  ``local_rank`` (DeepSpeed sets the CUDA device) and ``training`` (``module.train()`` decides) are not used.
* ``fp16``: the layer computes in its parameters' dtype (or the autocast dtype); with ``fp16=True`` it checks
  that this is a 16-bit type (DeepSpeed expects ``.half()`` and would misread float32 weights). bfloat16 works.
* ``attention_mask``: DeepSpeed's additive mask ([B, 1, 1, S], 0 = attend, -10000 = masked), or anything
  broadcastable to [B, a, S, S], additive or boolean (True = attend), or None. Sequence lengths need not be a
  multiple of 16. Arguments DeepSpeed ignores silently (``head_mask``, encoder states, ``past_key_value``,
  ``output_attentions``) raise ValueError when set.
* ``grads`` (DeepSpeed's testing hook): a list that receives ``[gradient, name]`` for every parameter as the
  backward of this call computes it, with DeepSpeed's names (``V_W`` and ``V_B`` the value slices of
  ``attn_qkvw`` / ``attn_qkvb``, ``O_W``, ``O_B``, ``N2_W``, ``N2_B``, ``int_W``, ``int_B``, ``out_W``, ``out_B``,
  ``norm_W``, ``norm_B``). Unlike DeepSpeed, whose hooks stay on the parameters and fire in every later
  backward, each hook here fires once, for the call that asked. The entries arrive in autograd's order.
* Parameter order: built fresh, ``PARAMETER_ORDER``; built from ``initial_weights`` / ``initial_biases``, the
  weights first and then the biases (``GIVEN_ORDER``), as DeepSpeed registers them; ``from_deepspeed_layer``
  keeps the given layer's order.
"""
from __future__ import annotations

import copy
import functools
import math
import types
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._shared_derived import SharedDerived
from .ops import attention, gelu_linear, inplace_layer_norm, seed_dropout
from .ops._zero import gathered
from .policies import Plan, Policy, Skip, Swap

__all__ = ["TempoTransformerLayer", "TempoBertLayer", "BertLayerPolicy", "bert_layer_policy", "DeepSpeedKernelPolicy",
           "deepspeed_kernel_policy", "PARAMETER_ORDER", "GIVEN_ORDER", "GRAD_NAMES",
           "BERT_PARAMETERS"]

# DeepSpeedTransformerLayer's parameters, in its declaration order.
PARAMETER_ORDER = ("attn_qkvw", "attn_qkvb", "attn_ow", "attn_ob", "attn_nw", "attn_nb", "inter_w", "inter_b",
                   "output_w", "output_b", "norm_w", "norm_b")
# DeepSpeedTransformerLayer's registration order when built from initial_weights / initial_biases.
GIVEN_ORDER = ("attn_qkvw", "attn_qkvb", "attn_ow", "attn_nw", "inter_w", "output_w", "norm_w", "attn_ob", "attn_nb",
               "inter_b", "output_b", "norm_b")
# DeepSpeed's names in the `grads` testing hook (for attn_qkvw / attn_qkvb: of the value slice).
GRAD_NAMES = {"attn_qkvw": "V_W", "attn_qkvb": "V_B", "attn_ow": "O_W", "attn_ob": "O_B", "attn_nw": "N2_W",
              "attn_nb": "N2_B", "inter_w": "int_W", "inter_b": "int_B", "output_w": "out_W", "output_b": "out_B",
              "norm_w": "norm_W", "norm_b": "norm_B"}
# initial_weights[n] / initial_biases[n] -> parameter (n = 0, 1, 2 are q, k, v: concatenated into attn_qkv*)
WEIGHT_SLOTS = ("attn_qkvw", "attn_qkvw", "attn_qkvw", "attn_ow", "attn_nw", "inter_w", "output_w", "norm_w")
BIAS_SLOTS = ("attn_qkvb", "attn_qkvb", "attn_qkvb", "attn_ob", "attn_nb", "inter_b", "output_b", "norm_b")
# Post-LN (HF BertLayer) source of each parameter, relative to the BertLayer.
BERT_PARAMETERS = {
    "attn_qkvw": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
    "attn_qkvb": ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"),
    "attn_ow": ("attention.output.dense.weight",), "attn_ob": ("attention.output.dense.bias",),
    "attn_nw": ("attention.output.LayerNorm.weight",), "attn_nb": ("attention.output.LayerNorm.bias",),
    "inter_w": ("intermediate.dense.weight",), "inter_b": ("intermediate.dense.bias",),
    "output_w": ("output.dense.weight",), "output_b": ("output.dense.bias",),
    "norm_w": ("output.LayerNorm.weight",), "norm_b": ("output.LayerNorm.bias",),
}
_UNSET = "(-1 is DeepSpeedTransformerConfig's 'not set')"


def _field(config: Any, name: str, default: Any = None, required: bool = False) -> Any:
    if not hasattr(config, name):
        if required:
            raise ValueError(f"config.{name} is missing: TempoTransformerLayer takes a DeepSpeedTransformerConfig")
        return default
    return getattr(config, name)


def _positive_int(config: Any, name: str) -> int:
    value = _field(config, name, required=True)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{name} must be a positive integer, got {value!r}"
                         + (f" {_UNSET}" if value == -1 else ""))
    return value


def _ratio(config: Any, name: str) -> float:
    value = _field(config, name, required=True)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"config.{name} must be a dropout ratio in [0, 1], got {value!r}"
                         + (f" {_UNSET}" if value == -1 else ""))
    return float(value)


class TempoTransformerLayer(nn.Module):
    """DeepSpeed's ``DeepSpeedTransformerLayer(config, initial_weights=None, initial_biases=None)`` on tempo_ds
    ops (module docstring: maths, what is kept, differences).

    ``config``: a ``deepspeed.ops.transformer.DeepSpeedTransformerConfig`` (or any object with its fields);
    required: ``hidden_size``, ``heads``, ``attn_dropout_ratio``, ``hidden_dropout_ratio``, and, when weights are
    initialised here, ``initializer_range`` (and ``num_hidden_layers`` with ``adjust_init_range``).
    ``initial_weights`` / ``initial_biases``: DeepSpeed's 8-entry lists, ordered q, k, v, attention output,
    attention LayerNorm, intermediate, output, output LayerNorm. ``approximate``: GELU form, ``"tanh"``
    (DeepSpeed's kernel) or ``"none"`` (erf).

    Like DeepSpeed, each instance takes the next ``TempoTransformerLayer.layer_id`` and writes it to
    ``config.layer_id``. The switches are read once, here.
    """

    layer_id = 0

    def __init__(self, config, initial_weights: Sequence[torch.Tensor] | None = None,
                 initial_biases: Sequence[torch.Tensor] | None = None, *, approximate: str = "tanh"):
        nn.Module.__init__(self)  # not super(): TempoBertLayer also derives from transformers' BertLayer
        from .ops.gelu import check_approximate

        check_approximate(approximate)
        h, heads = _positive_int(config, "hidden_size"), _positive_int(config, "heads")
        if h % heads:
            raise ValueError(f"config.hidden_size ({h}) must be divisible by config.heads ({heads})")
        inter = _field(config, "intermediate_size", -1)
        self.intermediate_size = inter if isinstance(inter, int) and inter > 0 else 4 * h
        self.attn_dropout_ratio = _ratio(config, "attn_dropout_ratio")
        self.hidden_dropout_ratio = _ratio(config, "hidden_dropout_ratio")
        eps = _field(config, "layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"config.layer_norm_eps must be a positive number, got {eps!r}")
        self.config = config
        self.hidden_size, self.heads, self.layer_norm_eps, self.approximate = h, heads, float(eps), approximate
        for name, default in (("pre_layer_norm", True), ("normalize_invertible", False), ("gelu_checkpoint", False),
                              ("attn_dropout_checkpoint", False), ("fp16", False), ("return_tuple", False),
                              ("stochastic_mode", False), ("adjust_init_range", True)):
            setattr(self, name, bool(_field(config, name, default)))
        if initial_weights is None or initial_biases is None:
            # DeepSpeed reads these only to initialise; check them before allocating anything
            self._init_std(self.adjust_init_range)

        config.layer_id = TempoTransformerLayer.layer_id
        TempoTransformerLayer.layer_id += 1

        i = self.intermediate_size
        shapes = {"attn_qkvw": (3 * h, h), "attn_qkvb": (3 * h,), "attn_ow": (h, h), "attn_ob": (h,),
                  "attn_nw": (h,), "attn_nb": (h,), "inter_w": (i, h), "inter_b": (i,), "output_w": (h, i),
                  "output_b": (h,), "norm_w": (h,), "norm_b": (h,)}
        given = {}
        for values, slots, kind in ((initial_weights, WEIGHT_SLOTS, "initial_weights"),
                                    (initial_biases, BIAS_SLOTS, "initial_biases")):
            if values is not None:
                given.update(self._take(values, slots, kind, shapes))
        like = next(iter(given.values()), None)
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        for name in (GIVEN_ORDER if given else PARAMETER_ORDER):
            param = given.get(name)
            if param is None:
                param = nn.Parameter(torch.empty(shapes[name], **factory))
            setattr(self, name, param)
        fresh = [name for name in PARAMETER_ORDER if name not in given]
        if fresh:
            self._init_parameters(fresh, self.adjust_init_range)

    @staticmethod
    def _take(values, slots, kind, shapes) -> dict[str, nn.Parameter]:
        if len(values) != len(slots):
            raise ValueError(f"{kind} must hold {len(slots)} tensors (q, k, v, attention output, attention "
                             f"LayerNorm, intermediate, output, output LayerNorm), got {len(values)}")
        h = shapes["attn_ow"][0]
        for n, (t, slot) in enumerate(zip(values, slots)):
            want = (h,) + shapes[slot][1:] if n < 3 else shapes[slot]
            shape = tuple(getattr(t, "ds_shape", t.shape)) if isinstance(t, torch.Tensor) else None  # ZeRO-3
            if shape != want:
                got = shape if shape is not None else type(t).__name__
                raise ValueError(f"{kind}[{n}] (for {slot}) must be a tensor of shape {want}, got {got}")
        with torch.no_grad(), gathered(*values[:3]):
            qkv = nn.Parameter(torch.cat([t.detach() for t in values[:3]]))
        out = {slots[0]: qkv}
        for t, slot in zip(values[3:], slots[3:]):
            out[slot] = t if isinstance(t, nn.Parameter) else nn.Parameter(t)  # a Parameter keeps its identity
        return out

    @classmethod
    def from_deepspeed_layer(cls, layer: nn.Module, **switches: bool) -> "TempoTransformerLayer":
        """The equivalent of DeepSpeed's ``DeepSpeedTransformerLayer`` ``layer``, holding its twelve Parameter
        objects (same names and layouts, nothing copied). ``switches`` (``normalize_invertible``,
        ``gelu_checkpoint``, ``attn_dropout_checkpoint``) override the layer's own config flags."""
        config = copy.copy(layer.config)
        for name, value in switches.items():
            setattr(config, name, value)
        layer_id = TempoTransformerLayer.layer_id
        new = cls(config)  # initialises fresh parameters that are replaced right below
        TempoTransformerLayer.layer_id = layer_id
        config.layer_id = getattr(layer.config, "layer_id", layer_id)
        new._parameters.clear()
        for name in layer._parameters:  # the given layer's registration order
            if name in PARAMETER_ORDER:
                setattr(new, name, getattr(layer, name))
        new.train(layer.training)
        return new

    def _init_std(self, adjust_init_range: bool) -> tuple[float, float]:
        """(std of attn_qkvw / inter_w, std of attn_ow / output_w) from the config."""
        std = _field(self.config, "initializer_range", required=True)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
            raise ValueError(f"config.initializer_range must be a number >= 0 to initialise the weights, got "
                             f"{std!r}" + (f" {_UNSET}" if std == -1 else ""))
        if not adjust_init_range:
            return std, std
        layers = _positive_int(self.config, "num_hidden_layers")
        return std, std / math.sqrt(2.0 * layers)

    def init_transformer_weights(self, adjust_init_range: bool = False) -> None:
        """DeepSpeed's initialisation: normal(0, initializer_range) for attn_qkvw and inter_w; for attn_ow and
        output_w the same std, divided by sqrt(2 * num_hidden_layers) when ``adjust_init_range``; biases 0 and
        LayerNorm weights 1."""
        self._init_parameters(PARAMETER_ORDER, adjust_init_range)

    def _init_parameters(self, names, adjust_init_range: bool) -> None:
        std, output_std = self._init_std(adjust_init_range)
        with torch.no_grad():
            for name in names:
                param = getattr(self, name)
                if name in ("attn_qkvw", "inter_w"):
                    param.normal_(0.0, std)
                elif name in ("attn_ow", "output_w"):
                    param.normal_(0.0, output_std)
                elif name in ("attn_nw", "norm_w"):
                    param.fill_(1.0)
                else:
                    param.zero_()

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, head_mask=None,
                layer_head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_value=None,
                output_attentions: bool = False, grads=None):
        """DeepSpeed's forward: ``hidden_states`` [B, S, h], ``attention_mask`` additive [B, 1, 1, S] (or any
        mask ``tempo_ds.ops.attention`` takes); returns [B, S, h], or ``(out,)`` with ``config.return_tuple``."""
        unsupported = {"head_mask": head_mask, "layer_head_mask": layer_head_mask,
                       "encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask,
                       "past_key_value": past_key_value}
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"TempoTransformerLayer does not support {name} (DeepSpeedTransformerLayer "
                                 "ignores it silently)")
        if output_attentions:
            raise ValueError("TempoTransformerLayer does not return attention probabilities (it never forms them)")
        if grads is not None:
            if not isinstance(grads, list):
                raise ValueError(f"grads must be a list (DeepSpeed's testing hook), got {type(grads).__name__}")
            self._record_grads_once(grads)
        out = self._layer(hidden_states, attention_mask)
        return (out,) if self.return_tuple else out

    def _record_grads_once(self, grads: list) -> None:
        """Append ``[gradient, DeepSpeed's name]`` to ``grads`` as the next backward computes each parameter's
        gradient (the value slice for attn_qkvw / attn_qkvb), then remove the hook."""
        h = self.hidden_size
        for name, param in self.named_parameters(recurse=False):
            if not param.requires_grad or name not in GRAD_NAMES:
                continue
            handles = []

            def hook(g, name=name, handles=handles):
                grads.append([g[2 * h:3 * h] if name in ("attn_qkvw", "attn_qkvb") else g, GRAD_NAMES[name]])
                handles.pop().remove()

            handles.append(param.register_hook(hook))

    def _layer(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [batch, seq, {self.hidden_size}], got {tuple(x.shape)}")
        self._check_precision(x)
        B, S, h = x.shape
        heads = self.heads
        p_attn = self.attn_dropout_ratio if self.training else 0.0
        p_hidden = self.hidden_dropout_ratio if self.training else 0.0

        u = self._norm(x, self.norm_w, self.norm_b) if self.pre_layer_norm else x
        qkv = F.linear(u, self.attn_qkvw, self.attn_qkvb)
        q, k, v = qkv.view(B, S, 3, heads, h // heads).permute(2, 0, 3, 1, 4).unbind(0)   # [B, a, S, d] views
        mode = "lean" if self.attn_dropout_checkpoint else "tempo"
        ctx = attention(q, k, v, attn_mask=mask, dropout_p=p_attn, mode=mode).transpose(1, 2).reshape(B, S, h)
        r = x + seed_dropout(F.linear(ctx, self.attn_ow, self.attn_ob), p_hidden, self.training)
        f = self._norm(r, self.attn_nw, self.attn_nb)
        hidden = F.linear(f, self.inter_w, self.inter_b)
        if self.gelu_checkpoint:
            g = gelu_linear(hidden, self.output_w, self.output_b, self.approximate)
        else:
            g = F.linear(F.gelu(hidden, approximate=self.approximate), self.output_w, self.output_b)
        g = seed_dropout(g, p_hidden, self.training)
        if self.pre_layer_norm:
            return r + g
        return self._norm(f + g, self.norm_w, self.norm_b)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return inplace_layer_norm(x, (self.hidden_size,), weight, bias, self.layer_norm_eps,
                                  keep_input=not self.normalize_invertible)

    def _check_precision(self, x: torch.Tensor) -> None:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.attn_qkvw.dtype
        if self.fp16 and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"config.fp16 is True but the layer computes in {dtype}: convert it with .half() (as "
                             "DeepSpeedTransformerLayer requires) or .bfloat16(), or run it under autocast")

    def extra_repr(self) -> str:
        flags = [n for n in ("pre_layer_norm", "normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint")
                 if getattr(self, n)]
        return (f"hidden_size={self.hidden_size}, heads={self.heads}, intermediate_size={self.intermediate_size}, "
                f"approximate={self.approximate!r}, attn_dropout={self.attn_dropout_ratio}, "
                f"hidden_dropout={self.hidden_dropout_ratio}, " + ", ".join(flags))


# ------------------------------------------------------------------------------------------------------
# HF BERT: the layer behind transformers' BertLayer calling convention
# ------------------------------------------------------------------------------------------------------
class _MaskCache:
    """Gives every layer of a model the same attention mask object for one forward pass, decided from shapes
    alone (nothing is read on the host).

    The attention keeps its mask for backward by reference, so the layers of a model keep one mask between
    them when they receive the same tensor: a mask given as None or 4-D (transformers' masks, already built
    once per forward) is passed on as it is. Injected through ``bert_layer_policy`` the encoder builds it
    with ``tempo_ds.hf_attention.padding_mask``, so it is None or the boolean [B, 1, 1, S] padding row; a
    [B, 1, S, S] mask built elsewhere is kept whole, once for all layers. Only a 2-D [B, S] padding mask
    (1 = attend, what flash-attention implementations get) is converted, to a boolean [B, 1, 1, S] row, and
    the conversion is shared by the layers while the mask is the same, unmodified tensor
    (``tempo_ds._shared_derived``) - so the meter charges it once, to the first layer.
    """

    def __init__(self):
        self._row = SharedDerived()

    def compact(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None or mask.dim() != 2:
            return mask
        return self._row(mask, lambda m: m.bool()[:, None, None, :])


def _bert_layer_class():
    from transformers.models.bert.modeling_bert import BertLayer

    return BertLayer


@functools.lru_cache(maxsize=None)
def _tempo_bert_layer_class() -> type:
    """``TempoBertLayer``, built on first use so that importing tempo_ds does not import transformers.

    It derives from transformers' ``BertLayer`` (and so ``GradientCheckpointingLayer``) without running its
    ``__init__``: ``model.gradient_checkpointing_enable()`` checkpoints it and ``output_hidden_states``
    records it, as for the layer it replaces. None of BertLayer's submodules exist.
    """
    BertLayer = _bert_layer_class()

    class TempoBertLayer(TempoTransformerLayer, BertLayer):
        """A ``TempoTransformerLayer`` (post-LN) behind HF ``BertLayer``'s forward: ``(hidden_states,
        attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
        **kwargs) -> hidden_states``. ``attention_mask`` is what the encoder passes: None or a [B, 1, 1, S]
        padding row (through ``bert_layer_policy``), any 4-D boolean or additive mask (used as it is), or [B, S]
        padding (1 = attend; see ``_MaskCache``). Other keyword
        arguments (``position_ids``, ...) are not used by a BERT layer; attention probabilities are never formed,
        so ``output_attentions`` records nothing for these layers.

        Parameters carry DeepSpeed's names; only ``attn_qkvw`` / ``attn_qkvb`` are new (the q, k, v weights
        concatenated), every other one is the BertLayer's own Parameter object.
        """

        def __init__(self, config, initial_weights=None, initial_biases=None, *, approximate="none"):
            super().__init__(config, initial_weights, initial_biases, approximate=approximate)
            self.mask_cache = _MaskCache()

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, past_key_values=None, **kwargs):
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError("TempoBertLayer has no cross-attention (bert_layer_policy leaves decoders alone)")
            if past_key_values is not None:
                raise ValueError("TempoBertLayer keeps no key/value cache (bert_layer_policy leaves decoders alone)")
            return self._layer(hidden_states, self.mask_cache.compact(attention_mask))

        @classmethod
        def from_bert_layer(cls, layer, *, normalize_invertible=True, gelu_checkpoint=True,
                            attn_dropout_checkpoint=True):
            """The layer equivalent to HF ``BertLayer`` ``layer``, holding its Parameter objects except the new
            concatenated ``attn_qkvw`` / ``attn_qkvb``. Raises ValueError when ``layer`` is something this layer
            cannot compute (decoder, cross-attention, an activation other than GELU, unequal dropouts, ...)."""
            config = _ds_config_from_bert_layer(layer, normalize_invertible=normalize_invertible,
                                                gelu_checkpoint=gelu_checkpoint,
                                                attn_dropout_checkpoint=attn_dropout_checkpoint)
            approximate = _bert_gelu(layer)
            modules = dict(layer.named_parameters())
            weights = [modules[n] for n in BERT_PARAMETERS["attn_qkvw"]] + \
                      [modules[BERT_PARAMETERS[s][0]] for s in WEIGHT_SLOTS[3:]]
            biases = [modules[n] for n in BERT_PARAMETERS["attn_qkvb"]] + \
                     [modules[BERT_PARAMETERS[s][0]] for s in BIAS_SLOTS[3:]]
            new = cls(config, weights, biases, approximate=approximate)
            new.train(layer.training)
            return new

        def write_back(self, layer) -> None:
            """Write this layer's current ``attn_qkvw`` / ``attn_qkvb`` back into ``layer``'s query, key and value
            (the only parameters not shared with it), e.g. before putting the original BertLayer back."""
            params = dict(layer.named_parameters())
            h = self.hidden_size
            with torch.no_grad(), gathered(self.attn_qkvw, self.attn_qkvb):
                for name in ("attn_qkvw", "attn_qkvb"):
                    for n, target in enumerate(BERT_PARAMETERS[name]):
                        with gathered(params[target]):
                            params[target].copy_(getattr(self, name)[n * h:(n + 1) * h])

    TempoBertLayer.__module__ = __name__
    TempoBertLayer.__qualname__ = "TempoBertLayer"
    return TempoBertLayer


def __getattr__(name: str):
    if name == "TempoBertLayer":
        return _tempo_bert_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bert_gelu(layer) -> str:
    from .nn.fewbit import activation_name

    act = activation_name(layer.intermediate.intermediate_act_fn)
    if act not in ("gelu", "gelu_tanh"):
        raise ValueError(f"its activation is {type(layer.intermediate.intermediate_act_fn).__name__}, "
                         "not a GELU")
    return "none" if act == "gelu" else "tanh"


def _ds_config_from_bert_layer(layer, **switches):
    """A DeepSpeedTransformerConfig (post-LN) describing HF BertLayer ``layer`` (a namespace with its fields
    where DeepSpeed is not installed); ValueError if none can."""
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        raise ValueError("it is a decoder layer (causal self-attention / cross-attention)")
    self_attn = layer.attention.self
    parts = {"query": self_attn.query, "key": self_attn.key, "value": self_attn.value,
             "attention.output.dense": layer.attention.output.dense, "intermediate.dense": layer.intermediate.dense,
             "output.dense": layer.output.dense}
    for name, module in parts.items():
        if type(module) is not nn.Linear or module.bias is None:
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear with a bias")
    norms = {"attention.output.LayerNorm": layer.attention.output.LayerNorm, "output.LayerNorm": layer.output.LayerNorm}
    for name, module in norms.items():
        if type(module) is not nn.LayerNorm or module.weight is None or module.bias is None:
            raise ValueError(f"{name} is not an nn.LayerNorm with weight and bias")
    eps = {m.eps for m in norms.values()}
    hidden_p = {layer.attention.output.dropout.p, layer.output.dropout.p}
    if len(eps) != 1 or len(hidden_p) != 1:
        raise ValueError("its two LayerNorms (or its two hidden dropouts) differ, DeepSpeed's layer has one setting")
    h = self_attn.query.in_features
    if self_attn.query.out_features != h or self_attn.num_attention_heads * self_attn.attention_head_size != h:
        raise ValueError("its attention width differs from its hidden size")
    _bert_gelu(layer)
    fields = dict(hidden_size=h, intermediate_size=layer.intermediate.dense.out_features,
                  heads=self_attn.num_attention_heads, attn_dropout_ratio=self_attn.dropout.p,
                  hidden_dropout_ratio=hidden_p.pop(), layer_norm_eps=eps.pop(), pre_layer_norm=False, **switches)
    try:
        from deepspeed.ops.transformer import DeepSpeedTransformerConfig as config_class
    except ImportError:
        config_class = types.SimpleNamespace
    return config_class(**fields)


# ------------------------------------------------------------------------------------------------------
# Injection policy
# ------------------------------------------------------------------------------------------------------
class BertLayerPolicy(Policy):
    """Replace every HF ``BertLayer`` with a ``TempoBertLayer``; the rest of the model is handled as by the
    ``bert`` policy (embeddings' LayerNorm and dropout, the MLM head, and any BertLayer left alone).

    Opt-in only (``matches`` is False): ``tempo_ds.inject(model, policy="bert_layer")``. Unlike every other
    policy it creates new Parameter objects — ``attn_qkvw`` / ``attn_qkvb``, the concatenated q, k, v — and its
    parameters carry DeepSpeed's names (``encoder.layer.0.attn_qkvw``, ...), so it must run before an optimizer
    is built or ``deepspeed.initialize`` is called, and a ``state_dict`` saved afterwards has DeepSpeed's keys.
    ``tempo_ds.revert`` writes the trained q, k, v back into the original BertLayers
    (``TempoBertLayer.write_back``). TempoConfig -> DeepSpeed switches: ``norm`` inplace/off -> ``normalize_invertible``;
    ``gelu`` recompute (also for inplace: fewer bytes, exact) / off -> ``gelu_checkpoint``; ``attention`` lean / tempo
    -> ``attn_dropout_checkpoint`` True / False. A layer is left alone (and reported) with ``gelu=fewbit``,
    ``attention=off`` or ``dropout=off``, which this layer cannot honour, or when it is not a plain BERT
    encoder layer.

    The model's attention implementation is set to tempo_ds's (``hf_attention``, with ``mask_check``), as by
    the ``bert`` policy, even when every BertLayer is replaced: the encoder then builds its mask with
    ``hf_attention.padding_mask``, so the layers receive None or one boolean [B, 1, 1, S] padding row (not a
    [B, 1, S, S] mask), decided without reading it on the host under ``mask_check="never"``.
    """

    def matches(self, model: nn.Module) -> bool:
        return False

    def plan(self, model: nn.Module, cfg) -> Plan:
        plan = super().plan(model, cfg)
        cache = _MaskCache()
        layer_cls = _tempo_bert_layer_class()
        for swap in plan.swaps:
            if isinstance(swap.new, layer_cls):
                swap.new.mask_cache = cache  # one compacted mask per forward pass, for all layers
        return plan

    def _plan_module(self, name, module, cfg, pairs, plan) -> bool:
        if type(module) is not _bert_layer_class():
            return super()._plan_module(name, module, cfg, pairs, plan)
        why = self._unsupported(cfg)
        if why is None:
            try:
                new = _tempo_bert_layer_class().from_bert_layer(
                    module, normalize_invertible=cfg.norm == "inplace", gelu_checkpoint=cfg.gelu != "off",
                    attn_dropout_checkpoint=cfg.attention == "lean")
            except ValueError as exc:
                why = f"TempoTransformerLayer cannot compute this layer: {exc}"
        if why is not None:
            plan.skips.append(Skip(name, type(module).__name__, why))
            return False
        technique = (f"TempoTransformerLayer (norm={cfg.norm}, gelu={'recompute' if cfg.gelu != 'off' else 'off'}, "
                     f"attention={cfg.attention}, dropout=seed; new QKV Parameter)")
        plan.swaps.append(Swap(name, module, new, technique))
        return True

    @staticmethod
    def _unsupported(cfg) -> str | None:
        if cfg.gelu == "fewbit":
            return "gelu=fewbit: TempoTransformerLayer computes GELU exactly (use the 'bert' policy for few-bit)"
        if cfg.attention == "off":
            return "attention=off: TempoTransformerLayer always runs tempo_ds attention"
        if cfg.dropout == "off":
            return "dropout=off: TempoTransformerLayer always regenerates dropout masks from a seed"
        return None


def _is_deepspeed_kernel_layer(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "DeepSpeedTransformerLayer" and kind.__module__.startswith("deepspeed.")


class DeepSpeedKernelPolicy(Policy):
    """Models built from DeepSpeed's CUDA training kernel (``DeepSpeedTransformerLayer``, e.g. DeepSpeedExamples'
    BERT with ``--deepspeed_transformer_kernel``): each such layer becomes a ``TempoTransformerLayer`` holding
    the same Parameter objects under the same names, so it runs on any device and in bf16. TempoConfig ->
    DeepSpeed switches as for the ``bert_layer`` policy; the rest of the model is handled as by any policy."""

    def matches(self, model: nn.Module) -> bool:
        return any(_is_deepspeed_kernel_layer(m) for m in model.modules())

    def _plan_module(self, name, module, cfg, pairs, plan) -> bool:
        if not _is_deepspeed_kernel_layer(module):
            return super()._plan_module(name, module, cfg, pairs, plan)
        why = BertLayerPolicy._unsupported(cfg)
        if why is not None:
            plan.skips.append(Skip(name, type(module).__name__, why))
            return False
        new = TempoTransformerLayer.from_deepspeed_layer(
            module, normalize_invertible=cfg.norm == "inplace", gelu_checkpoint=cfg.gelu != "off",
            attn_dropout_checkpoint=cfg.attention == "lean")
        plan.swaps.append(Swap(name, module, new, f"TempoTransformerLayer (norm={cfg.norm}, attention={cfg.attention})"))
        return True

    def _plan_attention(self, model, cfg, plan):
        return None  # the kernel layers compute their own attention; nothing dispatches through transformers


def deepspeed_kernel_policy() -> DeepSpeedKernelPolicy:
    """The ``deepspeed_kernel`` policy (DeepSpeedTransformerLayer -> TempoTransformerLayer, Parameters kept)."""
    return DeepSpeedKernelPolicy("deepspeed_kernel")


def bert_layer_policy() -> BertLayerPolicy:
    """The ``bert_layer`` policy (HF BertLayer -> TempoTransformerLayer), for ``tempo_ds.register_policy``."""
    return BertLayerPolicy("bert_layer", ("bert",), (("intermediate.intermediate_act_fn", "output.dense"),))

"""Megatron-core layer specs that run tempo's memory-lean norm, activation and core attention.

Megatron builds a transformer layer from a ``ModuleSpec``. This module gives the local (non-Transformer-
Engine) GPT and BERT layer specs of megatron-core 0.16 with three substitutions:

* ``input_layernorm`` / ``pre_mlp_layernorm``: ``TempoNorm``, a builder with Megatron's norm signature
  ``(config, hidden_size, eps)`` returning ``InplaceLayerNorm`` or ``InplaceRMSNorm`` (by
  ``config.normalization``), with ``weight.sequence_parallel`` / ``bias.sequence_parallel`` set from
  ``config.sequence_parallel`` as Megatron's own norms do. It keeps its output (which ``linear_qkv`` /
  ``linear_fc1`` keep anyway) plus 4 bytes per row, not its input.
* ``mlp``: ``TempoMLP``, Megatron's ``MLP`` whose GELU is tempo's (``InplaceGELU`` for ``gelu="inplace"``
  or ``"recompute"``; few-bit GELU for ``"fewbit"``). It needs ``bias_activation_fusion=False`` (the fused
  bias-GELU only takes ``F.gelu``): building it with the fusion on raises a ``ValueError`` naming
  ``bias_activation_fusion``. Only a non-gated ``F.gelu`` MLP is swapped; any other activation (SwiGLU,
  squared ReLU, ...) is left as Megatron runs it. ``gelu="recompute"`` (GELU fused into the next Linear)
  is not available here: ``linear_fc2`` is Megatron's ``RowParallelLinear``, so the in-place GELU is used.
* ``core_attention``: ``TempoDotProductAttention``, with ``DotProductAttention``'s constructor and
  ``forward`` (query/key/value ``[s, b, heads, d]``, ``attention_mask`` boolean with True = masked out,
  ``attn_mask_type`` causal / padding / padding_causal / no_mask / arbitrary, grouped-query, output
  ``[s, b, heads * d]``), computing through ``tempo_ds.ops.attention(mode="lean")``: it keeps q, k, v, the
  output and a float32 log-sum-exp per row, never an ``s x s`` tensor (Megatron's keeps the scores'
  softmax, the dropout mask and the dropped probabilities: three ``b * heads * s * s`` tensors). Dropout
  is ``config.attention_dropout`` (or the ``attention_dropout`` argument) in training mode only, its
  mask regenerated from a seed. A fully masked row gives 0 here (Megatron's -10000 fill gives a uniform
  row); ``packed_seq_params`` and ``attention_bias`` must be None, as in ``DotProductAttention``. What the
  mask holds is decided from ``attn_mask_type`` and shapes, never by reading it on the host (a causal type
  ignores the mask, as Megatron's fused softmax does; ``_mask_and_causal``).

Usage (the three lines a Megatron user adds)::

    from tempo_ds.megatron import tempo_layer_spec
    spec = tempo_layer_spec({"attention": "lean"}, kind="gpt")   # or gpt_layer_tempo_spec
    model = GPTModel(config, transformer_layer_spec=spec, ...)   # config.bias_activation_fusion=False

With Megatron-LM's training script: ``--spec tempo_ds.megatron gpt_layer_tempo_spec`` (or
``bert_layer_tempo_spec``), plus ``--no-bias-gelu-fusion``.

Selective recompute
-------------------
Megatron's ``recompute_granularity="selective"`` with ``recompute_modules=["core_attn"]`` wraps the
``core_attention`` submodule's call in ``tensor_parallel.checkpoint``, whatever its class: it keeps
q, k, v (and the mask) and runs ``TempoDotProductAttention.forward`` again in backward. The two
compose but overlap: the lean attention already keeps no ``s x s`` tensor, so core_attn recompute
saves only the output and the log-sum-exp on top of it (the output is kept anyway by ``linear_proj``
in ``[s, b, h]`` layout, a second copy when ``b > 1``), at the cost of a second attention forward.
With the tempo spec, leave ``core_attn`` out of ``recompute_modules`` (keep ``layernorm`` / ``mlp``
recompute as you like: tempo's norm and GELU recompute exactly, their dropout-free outputs being
deterministic; the attention dropout seed is drawn, on CUDA, under Megatron's CUDA RNG tracker as
``DotProductAttention`` draws its dropout, and on CPU from the CPU generator, both of which Megatron's
checkpoint restores, so a recompute draws the same mask).

Transformer Engine
------------------
TE's specs fuse the norm into the next Linear (``TELayerNormColumnParallelLinear``): the layer then has
no separate ``input_layernorm`` / ``pre_mlp_layernorm`` (they are ``IdentityOp``) and TE saves the
norm's input, its statistics and (unless ``return_layernorm_output`` / FP8) the norm output inside the
fused module. Tempo's norm cannot be swapped into that module; a tempo spec replaces the fused
``TELayerNormColumnParallelLinear`` by a separate ``TempoNorm`` + ``ColumnParallelLinear`` pair (what
this local spec does), trading TE's fused kernel for the smaller saved set. TE's own
``TEDotProductAttention`` (flash / cuDNN) already keeps no ``s x s`` tensor, so with TE keep its core
attention and take only tempo's norm and activation (``tempo_layer_spec`` builds local specs only).

megatron-core is imported lazily: importing ``tempo_ds`` (or this module) never requires it.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Optional

import torch

from ._shared_derived import SharedDerived

__all__ = ["tempo_layer_spec", "TempoNorm", "TempoDotProductAttention", "TempoMLP",
           "get_gpt_layer_tempo_spec", "get_bert_layer_tempo_spec"]

KINDS = ("gpt", "bert")


def _require_megatron():
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without megatron-core
        raise ImportError("tempo_ds.megatron needs megatron-core (pip install megatron-core); "
                          "tempo_ds itself does not") from exc


def _mark_sequence_parallel(module: torch.nn.Module, value: bool) -> None:
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if isinstance(param, torch.nn.Parameter):
            setattr(param, "sequence_parallel", value)


class TempoNorm:
    """Megatron norm builder ``TempoNorm(config, hidden_size, eps)``: ``InplaceLayerNorm`` or
    ``InplaceRMSNorm`` per ``config.normalization``, parameters marked ``sequence_parallel``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        from tempo_ds.nn import InplaceLayerNorm, InplaceRMSNorm

        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("TempoNorm does not support layernorm_zero_centered_gamma=True")
        kind = getattr(config, "normalization", normalization)
        dtype = getattr(config, "params_dtype", None)
        if kind == "LayerNorm":
            norm = InplaceLayerNorm(hidden_size, eps=eps, dtype=dtype)
        elif kind == "RMSNorm":
            norm = InplaceRMSNorm(hidden_size, eps=eps, casting="torch", dtype=dtype)
        else:
            raise ValueError(f"TempoNorm: normalization={kind!r}; allowed values: 'LayerNorm', 'RMSNorm'")
        _mark_sequence_parallel(norm, bool(getattr(config, "sequence_parallel", False)))
        return norm


def _mlp_class():
    from megatron.core.transformer.mlp import MLP

    class TempoMLP(MLP):
        """Megatron's ``MLP`` with tempo's GELU (needs ``bias_activation_fusion=False``)."""

        tempo_gelu = "inplace"
        tempo_bits = 2

        def __init__(self, config, submodules, *args, **kwargs):
            import torch.nn.functional as F

            super().__init__(config, submodules, *args, **kwargs)
            swap = (self.tempo_gelu != "off" and config.activation_func is F.gelu
                    and not config.gated_linear_unit and not config.use_te_activation_func)
            if swap and config.bias_activation_fusion:
                raise ValueError(
                    "tempo_ds.megatron: the tempo layer spec replaces the MLP's GELU, which Megatron's fused "
                    "bias-GELU kernel cannot run: build the TransformerConfig with "
                    "bias_activation_fusion=False (Megatron-LM: --no-bias-gelu-fusion), or use a spec with "
                    "gelu='off'")
            if swap:
                from tempo_ds.nn import FewBitGELU, InplaceGELU

                self.activation_func = (FewBitGELU(self.tempo_bits) if self.tempo_gelu == "fewbit"
                                        else InplaceGELU())

    return TempoMLP


def _attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import divide

    class TempoDotProductAttention(MegatronModule):
        """``DotProductAttention``'s interface over ``tempo_ds.ops.attention`` (lean by default)."""

        tempo_mode = "lean"
        tempo_block_size: Optional[int] = None

        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                     attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                     cp_comm_type: Optional[str] = None, pg_collection=None):
            super().__init__(config=config)
            from megatron.core.process_groups_config import ProcessGroupCollection

            self.config = config
            if config.context_parallel_size != 1:
                raise ValueError("TempoDotProductAttention: context_parallel_size must be 1")
            if config.softmax_type != "vanilla":
                raise ValueError(f"TempoDotProductAttention: softmax_type={config.softmax_type!r} is not "
                                 "supported; only 'vanilla'")
            if config.window_size is not None:
                raise ValueError("TempoDotProductAttention: sliding-window attention is not supported")
            self.layer_number = max(1, layer_number)
            self.attn_mask_type = attn_mask_type
            self.attention_type = attention_type
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
            self.pg_collection = pg_collection
            self.tp_group = pg_collection.tp
            world = self.tp_group.size()
            projection_size = config.kv_channels * config.num_attention_heads
            self.hidden_size_per_partition = divide(projection_size, world)
            self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
            self.num_attention_heads_per_partition = divide(config.num_attention_heads, world)
            self.num_query_groups_per_partition = divide(config.num_query_groups, world)
            # apply_query_key_layer_scaling divides the scores by layer_number and the softmax multiplies
            # them back: the net scale is softmax_scale, which is what we apply (in float32).
            self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                                  if softmax_scale is None else softmax_scale)
            self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
            self.softmax_offset = None

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            from tempo_ds.ops import attention

            if packed_seq_params is not None:
                raise ValueError("TempoDotProductAttention does not support packed sequences "
                                 "(packed_seq_params must be None)")
            if attention_bias is not None:
                raise ValueError("TempoDotProductAttention does not support attention_bias")
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            sq, sk = query.shape[0], key.shape[0]
            attend, causal = _mask_and_causal(attention_mask, mask_type, sq, sk)
            # [s, b, n, d] -> [b, n, s, d] (views; grouped-query k/v keep their own head count)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            p = self.dropout_p if self.training else 0.0
            run = lambda: attention(q, k, v, attn_mask=attend, dropout_p=p, is_causal=causal,  # noqa: E731
                                    scale=self.softmax_scale, mode=self.tempo_mode,
                                    block_size=self.tempo_block_size)
            if p > 0:
                with _dropout_stream(q.device, self.config, self.tp_group):
                    out = run()
            else:
                out = run()
            # [b, n, s, d] -> [s, b, n * d]
            out = out.permute(2, 0, 1, 3).contiguous()
            return out.view(out.shape[0], out.shape[1], self.hidden_size_per_partition)

        sharded_state_dict = DotProductAttention.sharded_state_dict

    return TempoDotProductAttention


def _mask_and_causal(attention_mask: Optional[torch.Tensor], mask_type, sq: int, sk: int):
    """``(attend, is_causal)`` for ``tempo_ds.ops.attention`` from Megatron's ``attention_mask`` (boolean, True =
    masked out, or None) and ``attn_mask_type``, decided from the type and shapes only (no value is read):

    * ``causal`` / ``causal_bottom_right``: is_causal and no mask. Megatron's mask is then the causal
      triangle, which its fused softmax (``scaled_upper_triang_masked_softmax``), Transformer Engine and flash
      attention ignore too; put other structure (per-document masks) in a ``padding_causal`` or
      ``arbitrary`` mask. With ``sq != sk`` (a cache continuation) a given mask is used as it is, without
      is_causal, as Megatron's unfused softmax does;
    * ``padding`` / ``arbitrary``: the mask as it is ([b, 1, 1, sk] row or [b, 1, sq, sk]), inverted;
    * ``padding_causal``: the same mask and is_causal;
    * ``no_mask``: neither.

    One query (``sq == 1``) is never causal (it sees every key, as in Megatron). The inverted mask is shared by
    every layer that receives the same unmodified mask (:func:`_attend_mask`), so it is kept once."""
    from megatron.core.transformer.enums import AttnMaskType

    if mask_type == AttnMaskType.causal_bottom_right and sq != sk:
        raise ValueError("TempoDotProductAttention: causal_bottom_right needs sq == sk")
    if mask_type not in (AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding,
                         AttnMaskType.padding_causal, AttnMaskType.no_mask, AttnMaskType.arbitrary):
        raise ValueError(f"TempoDotProductAttention: attn_mask_type {mask_type} is not supported")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError("TempoDotProductAttention: attention_mask must be boolean (True = masked out), as "
                        "Megatron's attention_mask_func expects")
    causal = sq > 1 and mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right,
                                      AttnMaskType.padding_causal)
    if attention_mask is None or mask_type == AttnMaskType.no_mask:
        return None, causal
    if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
        if sq == sk or sq == 1:
            return None, causal
        return _attend_mask(attention_mask), False
    return _attend_mask(attention_mask), causal


_INVERTED = SharedDerived()  # ~ Megatron's last mask, while that mask lives unmodified


def _attend_mask(masked_out: torch.Tensor) -> torch.Tensor:
    """``~masked_out`` (tempo's convention: True = attend), the same tensor for every layer of a forward pass
    while Megatron hands them the same unmodified mask: the attention keeps its mask for backward, and one
    inversion per layer would keep one copy per layer (``tempo_ds._shared_derived``)."""
    return _INVERTED(masked_out, torch.bitwise_not)


def _dropout_stream(device: torch.device, config, tp_group):
    """The generator state the attention's dropout seed is drawn under (checkpoint recompute repeats it):

    * CUDA: Megatron's CUDA RNG tracker (``get_cuda_rng_tracker().fork()``, the ``model-parallel-rng`` stream,
      one per tensor-parallel rank) unless ``config.sequence_parallel``, exactly where Megatron's
      ``DotProductAttention`` draws its dropout; its ``tensor_parallel.checkpoint`` restores the tracker;
    * CPU with tensor parallelism: the CPU generator, re-seeded per rank inside ``fork_rng`` (so the ranks'
      streams differ and the global state is untouched): the base seed is read from the CPU generator, a host
      value, not a device sync;
    * otherwise the device's default generator as it is."""
    if device.type == "cuda":
        if getattr(config, "sequence_parallel", False):
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()
    if tp_group.size() > 1:
        return _cpu_rank_stream(tp_group.rank())
    return contextlib.nullcontext()


@contextlib.contextmanager
def _cpu_rank_stream(rank: int):
    base = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the CPU generator's: no device sync
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(base + 7919 * rank)
        yield


def _class(name: str) -> type:
    return globals()[name] if name in globals() else __getattr__(name)


def __getattr__(name: str):
    """``TempoMLP`` / ``TempoDotProductAttention`` and the ready specs are built on first access, so
    importing this module never imports megatron-core."""
    builders = {"TempoMLP": _mlp_class, "TempoDotProductAttention": _attention_class,
                "gpt_layer_tempo_spec": get_gpt_layer_tempo_spec,
                "bert_layer_tempo_spec": get_bert_layer_tempo_spec}
    if name not in builders:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _require_megatron()
    # Stored as a module global, so the class (and the ready spec) is built once.
    value = globals()[name] = builders[name]()
    return value


def _variant(base: type, attrs: dict) -> type:
    """A subclass of ``base`` with class attributes set (``base`` itself when they already match)."""
    if all(getattr(base, k) == v for k, v in attrs.items()):
        return base
    return type(base.__name__, (base,), dict(attrs, __module__=__name__, __qualname__=base.__qualname__))


def tempo_layer_spec(config=None, *, kind: str = "gpt"):
    """A Megatron ``ModuleSpec`` for a ``TransformerLayer`` (local variant) with tempo's modules, chosen
    by a ``TempoConfig`` (or a dict / None for the defaults). ``kind``: ``"gpt"`` (causal self-attention)
    or ``"bert"`` (padding mask). ``norm="off"`` keeps Megatron's local norm, ``attention="off"`` its
    ``DotProductAttention``, ``gelu="off"`` its MLP; ``attention="tempo"`` uses Tempo's mode of the op.
    """
    _require_megatron()
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from tempo_ds.config import TempoConfig

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed values: {', '.join(map(repr, KINDS))}")
    cfg = TempoConfig.build(config)
    enabled = cfg.enabled
    if enabled and cfg.norm == "inplace":
        norm = TempoNorm
    else:
        from megatron.core.models.backends import LocalSpecProvider

        norm = LocalSpecProvider().layer_norm()
    if enabled and cfg.attention != "off":
        core_attention = _variant(_class("TempoDotProductAttention"),
                                  {"tempo_mode": cfg.attention, "tempo_block_size": cfg.attention_block_size})
    else:
        core_attention = DotProductAttention
    if enabled and cfg.gelu != "off":
        mlp_module = _variant(_class("TempoMLP"),
                              {"tempo_gelu": cfg.gelu, "tempo_bits": cfg.fewbit.bits_for("gelu")})
    else:
        mlp_module = MLP
    mask = AttnMaskType.causal if kind == "gpt" else AttnMaskType.padding
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=mlp_module,
                           submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_gpt_layer_tempo_spec(config=None):
    """Tempo's GPT layer spec (``get_gpt_layer_local_spec`` with tempo's norm, GELU and core attention)."""
    return tempo_layer_spec(config, kind="gpt")


def get_bert_layer_tempo_spec(config=None):
    """Tempo's BERT layer spec (``bert_layer_local_spec`` with tempo's norm, GELU and core attention)."""
    return tempo_layer_spec(config, kind="bert")


if sys.modules.get("megatron.core") is not None:
    # Megatron-LM's ``--spec tempo_ds.megatron gpt_layer_tempo_spec`` reads ``vars(module)[name]`` (no
    # module ``__getattr__``): when megatron-core is already loaded, define the ready specs eagerly.
    gpt_layer_tempo_spec = get_gpt_layer_tempo_spec()
    bert_layer_tempo_spec = get_bert_layer_tempo_spec()

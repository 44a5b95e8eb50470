"""tempo_ds attention inside transformers: registered in ``AttentionInterface`` and selected per model.

Two implementations are registered, each under two names (one per ``TempoConfig.mask_check``), each name
with its own mask builder (``AttentionMaskInterface``); without a mask builder transformers would hand a
custom implementation no mask at all:

* ``"tempo"`` / ``"tempo_syncfree"`` - ``tempo_ds.ops.attention(mode="lean")``: saves q, k, v, the output
  and a per-row log-sum-exp, never an s x s tensor;
* ``"tempo_recompute"`` / ``"tempo_recompute_syncfree"`` - Tempo's attention-dropout recomputation (softmax
  output + a 1-bit mask).

The name carries the mask check, so the choice travels with the model (``model.config._attn_implementation``)
and no global switch is needed.

The mask builder (:func:`padding_mask`) is what lets the attention decide the mask's structure without
reading it. transformers' own builders materialize a [b, 1, s_q, s_kv] mask even when it only says
"causal" and "these keys are padding"; telling that apart again would mean reading the mask on the host
(a device sync, and a graph break under ``torch.compile``). Ours returns, for the plain causal and
bidirectional masks that BERT, GPT-2, Llama and their kin build in training:

* ``None`` when no 2-D padding mask was given;
* ``None`` when it masks nothing, with ``mask_check="host"`` (the default) and outside tracing: one host read
  (``bool(padding.all())``, a device sync on CUDA) per forward pass - the mask is built once per forward,
  never per layer - the same read transformers' ``sdpa_mask`` makes. It lets unpadded batches run with no
  mask (SDPA's flash backend on CUDA). Under ``torch.compile`` / ``torch.export`` the read is skipped and
  the row kept;
* otherwise the padding row itself, boolean [b, 1, 1, s_kv] (True = attend): one byte per key, shared by
  every layer, instead of b * s_q * s_kv bytes. With ``mask_check="never"`` an all-ones row is passed too:
  the results are the same and nothing is read on the host (on CUDA SDPA's memory-efficient backend then
  takes the call instead of flash). An encoder (BERT) given ``attention_mask=None`` for unpadded batches has
  both; a causal LM without a mask has transformers read its ``position_ids`` instead (packed-sequence
  detection, outside tracing), so pass it the mask.

Causality is then the attention module's (``module.is_causal``, or an ``is_causal`` keyword, and the
config's ``is_causal`` switch), exactly as transformers' sdpa attention does when it receives no mask.
Anything else (sliding windows, chunked or packed-sequence masks, a KV cache with offsets, custom mask
functions) falls back to transformers' ``sdpa_mask``, and a materialized mask reaches the attention as it
is: it then carries causality itself and is kept for backward (once for all layers). With
``mask_check="never"`` and a padding mask given, ``sdpa_mask``'s skips (which read the padding mask on the
host) are turned off, so it always materializes.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["IMPLEMENTATIONS", "MASK_CHECKS", "implementation_name", "register", "padding_mask",
           "hf_attention_forward"]

IMPLEMENTATIONS = {"lean": "tempo", "tempo": "tempo_recompute"}  # the names for mask_check="host"
MASK_CHECKS = ("host", "never")
_SUFFIX = {"host": "", "never": "_syncfree"}


def _check_mask_check(mask_check: str) -> None:
    if mask_check not in MASK_CHECKS:
        raise ValueError(f"mask_check={mask_check!r}; allowed values: {', '.join(map(repr, MASK_CHECKS))}")


def implementation_name(mode: str, mask_check: str = "host") -> str:
    """The registered transformers name for an attention mode of ``TempoConfig`` and its ``mask_check``
    (registering on first use)."""
    if mode not in IMPLEMENTATIONS:
        raise ValueError(f"attention mode {mode!r}; allowed values: {', '.join(map(repr, IMPLEMENTATIONS))}")
    _check_mask_check(mask_check)
    register()
    return IMPLEMENTATIONS[mode] + _SUFFIX[mask_check]


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register both implementations, each under one name per mask check with its mask builder, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for mode, base in IMPLEMENTATIONS.items():
        for mask_check, suffix in _SUFFIX.items():
            AttentionInterface.register(base + suffix, functools.partial(hf_attention_forward, mode=mode))
            AttentionMaskInterface.register(base + suffix, functools.partial(padding_mask, mask_check=mask_check))


def _plain(mask_function, q_length, kv_length, q_offset, kv_offset, local_size, allow_causal, allow_bidirectional):
    """True when the mask is exactly (causal or nothing) and key padding: what the attention can rebuild."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if local_size is not None or isinstance(q_offset, torch.Tensor) or q_offset != 0 or kv_offset != 0:
        return False
    if mask_function is causal_mask_function:
        return allow_causal and q_length == kv_length
    return mask_function is bidirectional_mask_function and allow_bidirectional


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 local_size=None, allow_is_causal_skip=True, allow_is_bidirectional_skip=False, *,
                 mask_check="host", **kwargs):
    """A transformers mask builder (``AttentionMaskInterface``, same arguments as ``sdpa_mask``) that returns
    None or the [b, 1, 1, s_kv] boolean padding row for plain causal / bidirectional masks, and
    ``sdpa_mask``'s materialized mask otherwise (module docstring).

    ``mask_check="host"``: an all-ones padding mask gives None, decided by one host read per call (a device
    sync on CUDA; transformers calls this once per forward pass, not per layer), skipped under tracing -
    transformers' own ``sdpa_mask`` makes the same read. ``"never"``: nothing is read, the row is returned
    even when it masks nothing (same results), and a mask that falls back to ``sdpa_mask`` (sliding window,
    ...) is always materialized, without its skips' reads."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    _check_mask_check(mask_check)
    if mask_function is None:
        mask_function = causal_mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)
    if not _plain(mask_function, q_length, kv_length, q_offset, kv_offset, local_size, allow_is_causal_skip,
                  allow_is_bidirectional_skip):
        if mask_check == "never" and attention_mask is not None:  # sdpa_mask's skips read the padding mask
            args.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**args)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, :kv_length]
    if mask_check == "host" and not torch.compiler.is_compiling() and bool(padding.all()):  # a host read,
        return None                                                                        # as sdpa_mask's skip
    return padding[:, None, None, :]


def _module_is_causal(module, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    config = getattr(module, "config", None)
    return bool(is_causal) and bool(getattr(config, "is_causal", True) if config is not None else True)


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, mode="lean",
                         **kwargs):
    """A transformers 5.x attention function (``AttentionInterface.register(name, hf_attention_forward)``).

    Follows ``sdpa_attention_forward``: query [b, h, s_q, d], key/value [b, h_kv, s_k, d] (grouped-query
    heads are handled natively, ``module.num_key_value_groups`` is not needed); ``attention_mask`` is
    None, a boolean [b, 1, 1, s_k] padding row (from :func:`padding_mask`), or a materialized 4-d mask -
    boolean (True = attend, from ``sdpa_mask``) or additive float (from ``eager_mask``). With None or a
    padding row, causality comes from ``kwargs["is_causal"]`` or ``module.is_causal`` (and a config's
    ``is_causal=False``), as sdpa does without a mask; a materialized mask carries it itself. Nothing is read
    from a device tensor. ``dropout`` is already 0 in eval mode (the HF modules pass ``0.0 if not
    self.training``). An additive ``position_bias`` (T5-style) is added to the mask. ``mode`` is
    ``attention``'s. Returns ``(attn_output [b, s_q, h, d], None)``, or the attention probabilities in place of
    None when the model is asked for ``output_attentions`` (:func:`attention_probabilities`).
    """
    from tempo_ds.ops.attention import attention

    if kwargs.get("softcap") is not None:
        raise ValueError("hf_attention_forward does not support `softcap`; use the eager attention")
    if kwargs.get("cache") is not None:
        raise ValueError("hf_attention_forward does not support a paged `cache`; use sdpa or eager for generation")
    q_len = query.shape[2]
    mask = attention_mask
    row = mask is not None and mask.dim() == 4 and mask.shape[-2] == 1 and q_len > 1
    is_causal = q_len > 1 and (mask is None or row) and _module_is_causal(module, kwargs)
    if is_causal and mask is None and key.shape[2] > q_len:  # prefill of an empty static cache, like sdpa
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias[..., : key.shape[2]]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    out = attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                    mode=mode)
    weights = None
    if kwargs.get("output_attentions"):
        if dropout > 0:
            _warn_once("output_attentions=True with attention dropout: tempo_ds returns the probabilities before "
                       "dropout (its dropout masks are regenerated from a seed inside the attention op)")
        weights = attention_probabilities(query, key, mask, is_causal, scaling)
    return out.transpose(1, 2).contiguous(), weights


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                            scaling: float | None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask)`` [b, h, s_q, s_k] in the query's dtype, as transformers' eager attention
    returns for ``output_attentions=True``: computed only when asked, with ordinary autograd ops (so a loss
    on the probabilities gets its gradient), and kept by nothing else. Masked keys get float32's minimum, so a
    row with no visible key is uniform, as in eager."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale
    lowest = torch.finfo(torch.float32).min
    if mask is not None:
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask.float()
    if is_causal:
        s_q, s_k = scores.shape[-2:]
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).tril(s_k - s_q)
        scores = scores.masked_fill(~visible, lowest)
    return scores.softmax(-1).to(query.dtype)

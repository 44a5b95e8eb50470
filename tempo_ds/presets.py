"""Model presets: HuggingFace model classes built from small configs (no downloads).

Sizes follow the published models: BERT/RoBERTa base and large, GPT-2 small (124M, ``base``), medium (355M)
and large (774M), Llama-3.2-1B-shaped ``base`` and Llama-2-7B-shaped ``large``, Qwen3-0.6B-shaped ``base``,
Gemma-3-1B-shaped ``base`` and Mixtral-8x7B-shaped ``large``. ``tiny`` is a 2-layer, h=128 model for tests
and CPU runs.

``small`` is one modern-decoder shape for every decoder family, so that families compare at equal size:
8 layers, h=512, 8 query heads / 2 KV heads (head_dim 64), MLP 1536 (each of 8 experts, top-2, for
Mixtral), with the family's published vocabulary: Llama 3 128256, Qwen3 151936, Gemma 3 262144, Mixtral
32000. ``llama-small`` is the Llama-3-shaped model of issue 13 (DESIGN.md section 4b).

Vocabulary: presets with a published vocabulary (``VOCAB``) keep it whatever ``vocab_size`` the caller
passes; the others take ``vocab_size`` (the callers pass their tokenizer's length). Token ids from a smaller
tokenizer are valid ids of a larger vocabulary, and the bytes the LM head and loss keep depend on the
vocabulary, not on which ids occur, so the embedded corpus measures them.

Gemma is Gemma 3's text model (``Gemma3ForCausalLM``): RMSNorm scaled by ``1 + w`` before and after each
sublayer, q/k norms, GeGLU (tanh GELU), sliding-window layers; Qwen3 has per-head q/k RMSNorms.
"""
from __future__ import annotations

import importlib

import torch

ARCHS = ("bert", "roberta", "gpt2", "llama", "qwen3", "gemma", "mixtral")
SIZES = ("tiny", "small", "base", "medium", "large")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN = ("eager", "sdpa")
MLM_ARCHS = ("bert", "roberta")

# (layers, hidden, heads, intermediate[, kv_heads[, head_dim]])
_SMALL = (8, 512, 8, 1536, 2, 64)
_SHAPES = {
    "bert": {"tiny": (2, 128, 2, 512), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)},
    "roberta": {"tiny": (2, 128, 2, 512), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)},
    "gpt2": {"tiny": (2, 128, 2, 512), "base": (12, 768, 12, 3072), "medium": (24, 1024, 16, 4096),
             "large": (36, 1280, 20, 5120)},
    "llama": {"tiny": (2, 128, 4, 344, 2), "small": _SMALL, "base": (16, 2048, 32, 8192, 8),
              "large": (32, 4096, 32, 11008, 32)},
    "qwen3": {"tiny": (2, 128, 4, 384, 2, 32), "small": _SMALL, "base": (28, 1024, 16, 3072, 8, 128)},
    "gemma": {"tiny": (2, 128, 4, 384, 2, 32), "small": _SMALL, "base": (26, 1152, 4, 6912, 1, 256)},
    "mixtral": {"tiny": (2, 128, 4, 256, 2), "small": _SMALL, "large": (32, 4096, 32, 14336, 8)},
}
# Published vocabularies, kept whatever vocab_size the caller passes (module docstring).
VOCAB = {("llama", "small"): 128256, ("qwen3", "small"): 151936, ("qwen3", "base"): 151936,
         ("gemma", "small"): 262144, ("gemma", "base"): 262144, ("mixtral", "small"): 32000,
         ("mixtral", "large"): 32000}
EXPERTS = (8, 2)  # Mixtral: experts per layer, experts per token
_DECODERS = {  # arch: (config class, causal LM class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(str, allowed))}")


def model_config(arch: str, size: str = "tiny", *, vocab_size: int = 8192, max_seq: int = 512,
                 attn: str = "eager", layers: int | None = None):
    """The transformers config of a preset. ``layers`` overrides the depth (per-layer figures don't change);
    ``vocab_size`` is ignored by presets with a published vocabulary (``VOCAB``)."""
    _choice("arch", arch, ARCHS)
    _choice("size", size, SIZES)
    _choice("attn", attn, ATTN)
    import transformers

    if size not in _SHAPES[arch]:
        raise ValueError(f"size={size!r} is not defined for {arch}; allowed values: {', '.join(_SHAPES[arch])}")
    n_layers, hidden, heads, inter, *kv = _SHAPES[arch][size]
    vocab_size = VOCAB.get((arch, size), vocab_size)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers={layers} must be >= 1")
        n_layers = layers
    if arch in MLM_ARCHS:
        cls = transformers.BertConfig if arch == "bert" else transformers.RobertaConfig
        # RoBERTa offsets positions by padding_idx + 1.
        cfg = cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                  num_attention_heads=heads, intermediate_size=inter,
                  max_position_embeddings=max_seq + (2 if arch == "roberta" else 0), pad_token_id=0)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=heads,
                                      n_inner=inter, n_positions=max_seq, bos_token_id=1, eos_token_id=2)
    else:
        extra = {"head_dim": kv[1]} if len(kv) > 1 else {}
        if arch == "mixtral":
            extra.update(num_local_experts=EXPERTS[0], num_experts_per_tok=EXPERTS[1])
        if (arch, size) == ("qwen3", "base"):
            extra["tie_word_embeddings"] = True  # as published (Gemma 3's config ties by default)
        cfg = getattr(transformers, _DECODERS[arch][0])(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=kv[0], intermediate_size=inter, max_position_embeddings=max_seq,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    cfg._attn_implementation = attn
    # Training never reads a KV cache, and filling one copies k and v in every layer (GPT-2, Llama, ...).
    cfg.use_cache = False
    return cfg


def build_model(arch: str, size: str = "tiny", *, dtype: str = "fp32", seed: int = 0,
                zero3_config: dict | None = None, **config_kwargs):
    """A randomly initialised LM-head model of the preset (MLM for BERT/RoBERTa, causal otherwise).

    ``zero3_config``: a DeepSpeed config with ZeRO stage 3; the model is then built partitioned, under
    ``deepspeed.zero.Init``, the way transformers does it (an ``HfDeepSpeedConfig`` alive during construction,
    weights initialised inside ``GatheredParameters``; the same weights as without it for the same seed).
    """
    _choice("dtype", dtype, tuple(DTYPES))
    import transformers

    cfg = model_config(arch, size, **config_kwargs)
    cls = {"bert": transformers.BertForMaskedLM, "roberta": transformers.RobertaForMaskedLM,
           "gpt2": transformers.GPT2LMHeadModel,
           **{a: getattr(transformers, names[1]) for a, names in _DECODERS.items()}}[arch]
    torch.manual_seed(seed)
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        importlib.import_module("torch._dynamo")  # torch 2.13 + DeepSpeed 0.19.8: imported before zero.Init

        keep = HfDeepSpeedConfig(zero3_config)  # noqa: F841  (transformers holds a weak reference)
        return cls._from_config(cfg)
    return cls(cfg).to(DTYPES[dtype])


def dims(config) -> dict[str, int]:
    """Hidden size, heads and layers of any of the presets' configs, under common names."""
    return {
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "layers": config.num_hidden_layers,
        "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        or 4 * config.hidden_size,
    }

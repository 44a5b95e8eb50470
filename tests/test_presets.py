"""The decoder presets of issue 13: one shape for every family at ``small``, published vocabularies kept."""
import pytest

from tempo_ds import presets


@pytest.mark.parametrize("arch, vocab, config", [("llama", 128256, "LlamaConfig"), ("qwen3", 151936, "Qwen3Config"),
                                                 ("gemma", 262144, "Gemma3TextConfig"),
                                                 ("mixtral", 32000, "MixtralConfig")])
def test_small_decoders_share_the_llama3_shape_with_their_own_vocabulary(arch, vocab, config):
    cfg = presets.model_config(arch, "small", vocab_size=8192, max_seq=512)
    assert type(cfg).__name__ == config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (vocab, 512, 8, 8, 2, 64, 1536)
    assert cfg.use_cache is False and cfg._attn_implementation == "eager"
    if arch == "mixtral":
        assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)


def test_published_shapes_and_caller_vocabulary_elsewhere():
    qwen = presets.model_config("qwen3", "base")           # Qwen3-0.6B
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.num_key_value_heads, qwen.head_dim,
            qwen.tie_word_embeddings) == (28, 1024, 8, 128, True)
    gemma = presets.model_config("gemma", "base")          # Gemma-3-1B
    assert (gemma.num_hidden_layers, gemma.hidden_size, gemma.num_attention_heads, gemma.num_key_value_heads,
            gemma.head_dim, gemma.intermediate_size, gemma.vocab_size) == (26, 1152, 4, 1, 256, 6912, 262144)
    mixtral = presets.model_config("mixtral", "large")     # Mixtral-8x7B
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_local_experts) == (4096, 14336, 8)
    assert presets.model_config("llama", "tiny", vocab_size=999).vocab_size == 999
    with pytest.raises(ValueError, match="size='small' is not defined for bert; allowed values: tiny, base, large"):
        presets.model_config("bert", "small")

"""Training data: the embedded Shakespeare corpus, a locally trained tokenizer, LM batches."""

from .batches import embedded_token_stream, lm_batches, sample_batch, token_stream
from .corpus import DataError, load_texts
from .tokenizer import load_tokenizer

__all__ = ["DataError", "load_texts", "load_tokenizer", "token_stream", "embedded_token_stream", "lm_batches", "sample_batch"]

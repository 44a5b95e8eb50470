"""A byte-level BPE tokenizer trained locally on the embedded corpus, cached on disk.

Byte-level BPE (as GPT-2/RoBERTa) rather than WordPiece: every string encodes without [UNK] and
decodes back exactly, which causal LM needs, while MLM does not care how pieces were learned.
Special tokens [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0-4; BOS is [CLS] and EOS is [SEP], so one
token stream serves both objectives, and ``tokenizer(text)`` yields ``[CLS] text [SEP]``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .corpus import EMBEDDED_CORPUS, DataError, split_documents

FORMAT_VERSION = 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_TOKEN_ROLES = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
}


def cache_root() -> Path:
    """``$TEMPO_DS_CACHE``, default ``~/.cache/tempo_ds``."""
    return Path(os.environ.get("TEMPO_DS_CACHE") or "~/.cache/tempo_ds").expanduser()


def load_tokenizer(path: str | os.PathLike | None = None, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Load the tokenizer at ``path`` (a ``save_pretrained`` directory or a ``tokenizer.json``),
    or with ``path=None`` the one trained on the embedded corpus (trained once, then cached
    under ``cache_root()`` keyed by corpus bytes, ``vocab_size`` and ``FORMAT_VERSION``)."""
    if path is not None:
        return _load_saved(Path(path).expanduser())
    corpus = EMBEDDED_CORPUS.read_bytes()
    key = hashlib.sha256(f"tempo_ds-bpe-v{FORMAT_VERSION}-{vocab_size}\n".encode() + corpus).hexdigest()
    target = cache_root() / f"tokenizer-bpe{vocab_size}-{key[:16]}"
    if not (target / "tokenizer.json").is_file():
        _train_to(target, gzip.decompress(corpus).decode("utf-8"), vocab_size)
    return _load_saved(target)


def _train_to(target: Path, text: str, vocab_size: int) -> None:
    """Train on ``text`` and publish the result at ``target`` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(split_documents(text), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKEN_ROLES
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        fast.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_saved(path: Path) -> PreTrainedTokenizerFast:
    expected = "expected a directory written by save_pretrained or a tokenizer.json file"
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer; {expected}")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"{path}: directory has no tokenizer.json; {expected}")
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # a broken tokenizer.json or config: JSON, tokenizers or transformers errors
            raise DataError(f"{path}: cannot read it as a tokenizer ({e}); {expected}") from e
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        raise DataError(f"{path}: cannot read it as a tokenizer ({e}); {expected}") from e
    vocab = tok.get_vocab()
    tok.add_special_tokens({role: t for role, t in SPECIAL_TOKEN_ROLES.items() if t in vocab})
    return tok

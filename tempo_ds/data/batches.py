"""Token streams and fixed-length LM batches (BERT-style MLM or causal) ready for HF models."""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterator, Sequence

import torch

from .corpus import EMBEDDED_CORPUS, load_texts

ARCH_IS_MLM = {"bert": True, "roberta": True, "gpt2": False, "llama": False, "qwen3": False, "gemma": False,
               "mixtral": False}
_EMBEDDED_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ids


def token_stream(texts: Sequence[str], tokenizer) -> torch.LongTensor:
    """Tokenize ``texts`` (no special tokens) into one 1-D tensor, each document followed by EOS
    (the SEP token when the tokenizer has no EOS)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("tokenizer has neither an eos_token nor a sep_token to separate documents")
    ids = []
    for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lm_batches(
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    *,
    mlm: bool,
    tokenizer,
    seed: int = 0,
    mlm_probability: float = 0.15,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seed-deterministic iterator of batches cut from the token stream ``ids``.

    The stream is cut into non-overlapping windows (``seq_len - 1`` tokens after a leading [CLS]
    for MLM, ``seq_len`` tokens for causal LM); rows are drawn from a fresh seeded permutation of
    the windows on every pass, so no window repeats before all have been used.
    MLM batches: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``; each
    non-special token is selected with ``mlm_probability`` and then replaced by [MASK] (80%), a
    random ordinary token (10%) or kept (10%); labels are -100 except at selected positions.
    Causal batches: ``input_ids``, ``attention_mask``, ``labels`` (= ``input_ids``; HF models
    shift them internally). No padding: ``attention_mask`` is all ones.
    Data parallel: with ``world_size`` ranks, every rank draws the same global batch of
    ``batch_size * world_size`` rows (masking included) and keeps rows ``rank * batch_size`` onward,
    so the ranks read disjoint windows and the global batch does not depend on how it is split.
    """
    if ids.dim() != 1 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a 1-D LongTensor, got shape {tuple(ids.shape)} {ids.dtype}")
    if batch_size < 1 or seq_len < (2 if mlm else 1):
        raise ValueError(
            f"need batch_size >= 1 and seq_len >= {2 if mlm else 1}, got {batch_size}, {seq_len}"
        )
    if mlm and (tokenizer.cls_token_id is None or tokenizer.mask_token_id is None):
        raise ValueError("MLM batches need a tokenizer with cls_token and mask_token")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    width = seq_len - 1 if mlm else seq_len
    n_windows = ids.numel() // width
    if n_windows == 0:
        raise ValueError(f"token stream of {ids.numel()} tokens is shorter than one row of {width}")
    windows = ids[: n_windows * width].view(n_windows, width)
    batches = _batches(windows, batch_size * world_size, mlm, tokenizer, seed, mlm_probability)
    if world_size == 1:
        return batches
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    return ({k: v[rows] for k, v in batch.items()} for batch in batches)


def _batches(windows, batch_size, mlm, tokenizer, seed, mlm_probability):
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    ordinary = torch.tensor(sorted(set(range(len(tokenizer))) - set(special.tolist())), dtype=torch.long)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(len(windows), generator=gen)])
        rows, order = windows[order[:batch_size]], order[batch_size:]
        if not mlm:
            yield {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}
            continue
        cls = torch.full((batch_size, 1), tokenizer.cls_token_id, dtype=torch.long)
        labels = torch.cat([cls, rows], dim=1)
        prob = torch.full(labels.shape, mlm_probability)
        prob[torch.isin(labels, special)] = 0.0
        selected = torch.bernoulli(prob, generator=gen).bool()
        to_mask = selected & torch.bernoulli(torch.full(labels.shape, 0.8), generator=gen).bool()
        half = torch.bernoulli(torch.full(labels.shape, 0.5), generator=gen).bool()
        to_random = selected & ~to_mask & half
        input_ids = labels.clone()
        input_ids[to_mask] = tokenizer.mask_token_id
        draws = torch.randint(len(ordinary), (int(to_random.sum()),), generator=gen)
        input_ids[to_random] = ordinary[draws]
        labels[~selected] = -100
        yield {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids),
            "labels": labels,
        }


def sample_batch(
    arch: str, tokenizer, seq_len: int, batch_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One batch from the embedded corpus: MLM for bert/roberta, causal LM for gpt2/llama.

    The corpus token stream comes from :func:`embedded_token_stream` (cached).
    """
    if arch not in ARCH_IS_MLM:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(sorted(ARCH_IS_MLM))}")
    ids = embedded_token_stream(tokenizer)
    mlm = ARCH_IS_MLM[arch]
    return next(lm_batches(ids, seq_len, batch_size, mlm=mlm, tokenizer=tokenizer, seed=seed))


def embedded_token_stream(tokenizer) -> torch.LongTensor:
    """``token_stream(load_texts(), tokenizer)`` of the embedded corpus, which takes seconds: kept while the
    tokenizer object lives, and cached on disk under ``cache_root()`` keyed by the corpus and the tokenizer's
    serialised form (written atomically, so processes starting together never read half a file)."""
    ids = _EMBEDDED_STREAMS.get(tokenizer)
    if ids is not None:
        return ids
    from .tokenizer import cache_root

    key = hashlib.sha256(EMBEDDED_CORPUS.read_bytes() + tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    path = cache_root() / f"corpus-ids-{key[:16]}.pt"
    if path.is_file():
        ids = torch.load(path)
    else:
        ids = token_stream(load_texts(), tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    _EMBEDDED_STREAMS[tokenizer] = ids
    return ids

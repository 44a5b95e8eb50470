"""Text corpora: the embedded Shakespeare corpus and user-supplied text.

Documents: plain-text input is cut into documents of about ``DOC_CHARS`` characters made of
whole paragraphs (blocks separated by a blank line; in the embedded corpus a paragraph is one
speech, stage direction or heading). A run of two or more blank lines is a hard boundary that no
document spans (the embedded corpus separates its plays that way). Rows of a saved
``datasets`` dataset are taken as documents unchanged.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

EMBEDDED_CORPUS = Path(__file__).with_name("shakespeare.txt.gz")
DOC_CHARS = 2000
TEXT_SUFFIXES = (".txt", ".txt.gz")
_EXPECTED = "a .txt/.txt.gz file, a directory of .txt files, or a datasets.save_to_disk directory"


class DataError(ValueError):
    """A corpus or tokenizer path that does not hold what was expected."""


def split_documents(text: str, target_chars: int = DOC_CHARS) -> list[str]:
    """Group whole paragraphs of ``text`` into documents of about ``target_chars`` characters."""
    docs = []
    for section in re.split(r"\n(?:[ \t\f\v]*\n){2,}", text):
        group, size = [], 0
        for para in re.split(r"\n(?:[ \t\f\v]*\n)+", section):
            if not para.strip():
                continue
            para = re.sub(r"^(?:[ \t\f\v]*\n)+", "", para.rstrip())
            group.append(para)
            size += len(para) + 2
            if size >= target_chars:
                docs.append("\n\n".join(group))
                group, size = [], 0
        if group:
            docs.append("\n\n".join(group))
    return docs


def load_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Return the documents of the embedded corpus (``path=None``) or of ``path``.

    ``path`` is a ``.txt``/``.txt.gz`` file, a directory searched recursively (sorted) for such
    files, or a directory written by ``datasets`` ``save_to_disk`` (its ``text`` column; of a
    ``DatasetDict`` the ``train`` split if present, else every split in sorted order).
    """
    if path is None:
        return split_documents(_read_text(EMBEDDED_CORPUS))
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory; expected {_EXPECTED}")
    if root.is_file():
        if not root.name.endswith(TEXT_SUFFIXES):
            raise DataError(f"{root}: expected a .txt or .txt.gz file")
        text = _read_text(root)
        if not text:
            raise DataError(f"{root}: file is empty; expected text")
        docs = split_documents(text)
    elif _is_saved_dataset(root):
        docs = _dataset_texts(root)
    else:
        files = sorted(
            (f for f in root.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES)),
            key=lambda f: f.relative_to(root).as_posix(),
        )
        if not files:
            raise DataError(f"{root}: directory holds no .txt or .txt.gz files; expected {_EXPECTED}")
        docs = [doc for f in files for doc in split_documents(_read_text(f))]
    if not docs:
        raise DataError(f"{root}: all text is empty or whitespace")
    return docs


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from e
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (
        (root / "state.json").is_file() and (root / "dataset_info.json").is_file()
    )


def _dataset_texts(root: Path) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{root} is a datasets.save_to_disk directory; reading it needs the `datasets` "
            "package: pip install datasets"
        ) from e
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        parts = [ds["train"]] if "train" in ds else [ds[name] for name in sorted(ds)]
    else:
        parts = [ds]
    texts = []
    for part in parts:
        if "text" not in part.column_names:
            raise DataError(f"{root}: dataset has no 'text' column (columns: {part.column_names})")
        for text in part["text"]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"{root}: 'text' column holds {type(text).__name__}, expected str")
            if text and text.strip():
                texts.append(text)
    return texts

"""Raw text as *records*: documents of a file or hub dataset, long ones cut at paragraph boundaries.
A record is the unit the content-hash splits place (``pipeline.data.splits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from pipeline.data.files import check_data_file, is_hub_dataset_name, iter_hub_rows, read_rows
from pipeline.errors import ConfigError


def iter_text_records(
    name: str, *, text_column: str = "text", txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000, field: str = "data.cpt_files",
) -> Iterator[str]:
    """Records of raw text from one local file or hub dataset, one at a time."""
    hub = is_hub_dataset_name(name)
    path = None if hub else check_data_file(name, field=field)
    if path is not None and path.suffix == ".txt":
        docs: Iterable[str] = _iter_txt_documents(path, txt_document_separator)
    else:
        docs = _column_values(iter_hub_rows(name, field=field) if hub else read_rows(path, field=field),
                              text_column, where=f"{field} ({name})")
    for doc in docs:
        doc = doc.strip()
        if doc:
            yield from _cut_paragraphs(doc, max_record_chars)


def _column_values(rows: Iterable[dict], column: str, *, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if column not in row:
            raise ConfigError(where, f"row {i} has no column '{column}' (columns: {sorted(row)})",
                              "set data.text_column to the column holding the text")
        yield row[column]


def _cut_paragraphs(doc: str, max_chars: int) -> Iterator[str]:
    """Cut a long document into pieces of at most ~max_chars at blank lines."""
    if len(doc) <= max_chars:
        yield doc
        return
    piece: list[str] = []
    size = 0
    for para in doc.split("\n\n"):
        if piece and size + len(para) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece:
        yield "\n\n".join(piece)


def _iter_txt_documents(path: Path, separator: str, chunk_chars: int = 8 << 20) -> Iterator[str]:
    """Documents of a .txt file read in chunks, so a corpus larger than memory is never read whole."""
    carry = ""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(chunk_chars):
            parts = (carry + chunk).split(separator)
            carry = parts.pop()
            yield from parts
    yield carry


def load_text_records(
    files: list[str], *, text_column: str = "text", txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000, field: str = "data.cpt_files",
) -> list[str]:
    """Records of raw text from local files and hub datasets, in memory (see ``pipeline.cpt_data``
    for corpora that should not be)."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .txt/.jsonl/.parquet file")
    records: list[str] = []
    for name in files:
        records.extend(iter_text_records(name, text_column=text_column, txt_document_separator=txt_document_separator,
                                         max_record_chars=max_record_chars, field=field))
    if not records:
        raise ConfigError(field, f"{files} contain no text", "check the files are not empty")
    return records

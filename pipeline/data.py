"""Loading, splitting, tokenizing and packing the training data.

Raw text becomes *records* (documents, long ones cut at paragraph boundaries); a record is
held out for evaluation when the hash of its text says so, which keeps the split stable across
runs, file orders and machines. Conversations are split the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Split:
    train: list
    heldout: list


def is_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records: Iterable, fraction: float, key=lambda r: r) -> Split:
    train, heldout = [], []
    for r in records:
        (heldout if is_heldout(key(r), fraction) else train).append(r)
    return Split(train, heldout)


def check_data_file(path: str, *, field: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, f"data file {path} does not exist", "fix the path or create the file")
    if p.suffix not in TEXT_SUFFIXES:
        raise ConfigError(field, f"{path}: unsupported file type '{p.suffix}'", f"use one of {', '.join(TEXT_SUFFIXES)}")
    return p


def _read_rows(path: Path, *, field: str) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ConfigError(field, f"{path}: a .json data file must hold a list of objects")
        yield from rows
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(field, f"{path}:{lineno} is not valid JSON ({e.msg})") from None


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


def load_text_records(
    files: list[str], *, text_column: str = "text", txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000, field: str = "data.cpt_files",
) -> list[str]:
    """Records of raw text from local files (hub dataset names: see ``load_hub_text``)."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .txt/.jsonl/.parquet file")
    records: list[str] = []
    for name in files:
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            docs: Iterable[str] = path.read_text(encoding="utf-8").split(txt_document_separator)
        else:
            docs = []
            for i, row in enumerate(_read_rows(path, field=field)):
                if text_column not in row:
                    raise ConfigError(
                        f"{field} ({path})",
                        f"row {i} has no column '{text_column}' (columns: {sorted(row)})",
                        "set data.text_column to the column holding the text",
                    )
                docs.append(row[text_column])
        for doc in docs:
            doc = doc.strip()
            if doc:
                records.extend(_cut_paragraphs(doc, max_record_chars))
    if not records:
        raise ConfigError(field, f"{files} contain no text", "check the files are not empty")
    return records


def load_conversations(
    files: list[str], *, messages_column: str = "messages", field: str = "data.sft_files"
) -> list[list[dict]]:
    """Conversations as lists of {role, content} dicts, checked for shape."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .jsonl/.json/.parquet file of conversations")
    conversations = []
    for name in files:
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            raise ConfigError(field, f"{path}: sft data must be .jsonl/.json/.parquet with a '{messages_column}' column")
        for i, row in enumerate(_read_rows(path, field=field)):
            msgs = row.get(messages_column)
            if msgs is None:
                raise ConfigError(
                    f"{field} ({path})",
                    f"row {i} has no column '{messages_column}' (columns: {sorted(row)})",
                    "set data.messages_column, or convert the data to chat format "
                    "([{role: user, content: ...}, {role: assistant, content: ...}])",
                )
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise ConfigError(f"{field} ({path})", f"row {i}: '{messages_column}' must be a list of {{role, content}} objects")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ConfigError(f"{field} ({path})", f"row {i} has no assistant message: nothing to learn from")
            conversations.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not conversations:
        raise ConfigError(field, f"{files} contain no conversations")
    return conversations


def conversation_key(conv: list[dict]) -> str:
    return json.dumps(conv, sort_keys=True)

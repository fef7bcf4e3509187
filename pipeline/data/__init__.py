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

from pipeline.data.mistral import text_token_ids
from pipeline.errors import ConfigError
from pipeline.hub import datasets_offline

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


def is_hub_dataset_name(name: str) -> bool:
    """``org/name`` (optionally ``org/name:split``) that is not a local path."""
    base = name.split(":", 1)[0]
    return (not Path(name).exists() and base.count("/") == 1 and not base.startswith((".", "/", "~"))
            and Path(base).suffix not in TEXT_SUFFIXES)


def require_hub_access(name: str, *, field: str) -> None:
    if datasets_offline():
        raise ConfigError(field, f"hub dataset '{name}' cannot be fetched offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)",
                          "run with network access, or download it and point at local .jsonl/.parquet files")


def check_data_file(path: str, *, field: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, f"data file {path} does not exist", "fix the path or create the file")
    if p.suffix not in TEXT_SUFFIXES:
        raise ConfigError(field, f"{path}: unsupported file type '{p.suffix}'", f"use one of {', '.join(TEXT_SUFFIXES)}")
    return p


def read_rows(path: Path, *, field: str) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        # Batch by batch, so a caller that needs only the first rows reads only those.
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
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


def _iter_txt_documents(path: Path, separator: str, chunk_chars: int = 8 << 20) -> Iterator[str]:
    """Documents of a .txt file read in chunks, so a corpus larger than memory is never read whole."""
    carry = ""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(chunk_chars):
            parts = (carry + chunk).split(separator)
            carry = parts.pop()
            yield from parts
    yield carry


def iter_hub_rows(name: str, *, field: str) -> Iterator[dict]:
    """Rows of a hub dataset ``org/name[:split]``, streamed (never materialised)."""
    repo, _, split = name.partition(":")
    require_hub_access(repo, field=field)
    import datasets

    try:
        yield from datasets.load_dataset(repo, split=split or "train", streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the name and cause
        raise ConfigError(field, f"hub dataset '{repo}' could not be streamed ({type(e).__name__}: {e})",
                          "check the name and split, or use local files") from None


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


def heldout_text_records(
    files: list[str], *, heldout_fraction: float, text_column: str = "text", txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000,
) -> list[str]:
    """The held-out records of raw-text files, in file order: what every stage scores (eval, quantize).
    Only these are kept in memory; the corpus itself may be far larger."""
    return [r for name in files
            for r in iter_text_records(name, text_column=text_column, txt_document_separator=txt_document_separator,
                                       max_record_chars=max_record_chars)
            if is_heldout(r, heldout_fraction)]


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


# ---------------------------------------------------------------------------------------------
# sft data formats
# ---------------------------------------------------------------------------------------------

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# ShareGPT speaker names (``from``) as written by the datasets people bring -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "system": "system"}


def detect_sft_format(row: dict, messages_column: str) -> str | None:
    """The format a row is in, from its columns (the first match in this order)."""
    if messages_column in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def _as_turns(value, role: str, where: str) -> list[dict]:
    """A prompt/completion side: a string (one turn of ``role``) or a list of role/content dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where} must be a string or a list of {{role, content}} objects")


def row_to_messages(row: dict, fmt: str, messages_column: str = "messages") -> list[dict]:
    """One row of any supported sft format as a list of {role, content} dicts.

    Raises ValueError with what is wrong with the row; callers add the file and row number.
    """
    if fmt == "messages":
        msgs = row.get(messages_column)
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError(f"'{messages_column}' must be a list of {{role, content}} objects")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            raise ValueError("'conversations' must be a list of {from, value} objects (ShareGPT)")
        msgs = []
        for t in turns:
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise ValueError(f"unknown ShareGPT speaker '{t['from']}' (known: {sorted(SHAREGPT_ROLES)})")
            msgs.append({"role": role, "content": t["value"]})
        return msgs
    if fmt == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise ValueError("alpaca rows need string 'instruction' and 'output' (and optional 'input')")
        # Alpaca's own prompt puts the input after the instruction; a chat template does the rest.
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        return _as_turns(row.get("prompt"), "user", "'prompt'") + _as_turns(row.get("completion"), "assistant", "'completion'")
    raise ValueError(f"unknown sft format '{fmt}'")


def sft_row_messages(row: dict, *, fmt: str, messages_column: str, where: str, field: str = "data.sft_format") -> list[dict]:
    """``row_to_messages`` with the format detected when ``fmt`` is auto, and a ConfigError naming
    the file and row for anything that is not a usable conversation."""
    if fmt not in ("auto", *SFT_FORMATS):
        raise ConfigError("data.sft_format", f"unknown format '{fmt}'", f"use auto or one of {', '.join(SFT_FORMATS)}")
    row_fmt = detect_sft_format(row, messages_column) if fmt == "auto" else fmt
    if row_fmt is None:
        raise ConfigError(
            where, f"no sft format recognised from the columns {sorted(row)}",
            f"give one of: '{messages_column}' (chat; or set data.messages_column), 'conversations' (ShareGPT "
            "from/value), 'instruction'/'input'/'output' (alpaca), 'prompt'/'completion'",
        )
    try:
        msgs = row_to_messages(row, row_fmt, messages_column)
    except ValueError as e:
        raise ConfigError(where, f"{e} (format: {row_fmt})", f"fix the row, or set {field} to the format of the file") from None
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise ConfigError(where, "has no assistant message: nothing to learn from")
    return msgs


def load_conversations(
    files: list[str], *, messages_column: str = "messages", sft_format: str = "auto", field: str = "data.sft_files"
) -> list[list[dict]]:
    """Conversations as lists of {role, content} dicts, from any supported format (converted once,
    here), checked for shape."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .jsonl/.json/.parquet file of conversations")
    conversations = []
    for name in files:
        hub = is_hub_dataset_name(name)
        path = None if hub else check_data_file(name, field=field)
        if path is not None and path.suffix == ".txt":
            raise ConfigError(field, f"{path}: sft data must be .jsonl/.json/.parquet rows (chat, ShareGPT, alpaca or prompt/completion)")
        for i, row in enumerate(iter_hub_rows(name, field=field) if hub else read_rows(path, field=field)):
            conversations.append(sft_row_messages(row, fmt=sft_format, messages_column=messages_column,
                                                  where=f"{field} ({name}) row {i}"))
    if not conversations:
        raise ConfigError(field, f"{files} contain no conversations")
    return conversations


def conversation_key(conv: list[dict]) -> str:
    return json.dumps(conv, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Packing for continued pretraining
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedBlocks:
    """Fixed-length blocks cut from the EOS-separated token stream of all records.

    ``position_ids`` restart at 0 at every document start, which transformers turns into a
    block-diagonal attention mask (flash-attention varlen, sdpa and eager alike): no token attends
    to another document. ``labels`` are -100 at document starts so no token is trained to be
    predicted from the previous document.
    """

    input_ids: list[list[int]]
    position_ids: list[list[int]]
    labels: list[list[int]]
    tokens_total: int  # tokens in the stream before cutting
    tokens_dropped: int  # the incomplete last block

    def stats(self, pad_token_id: int | None) -> dict:
        block_tokens = sum(len(b) for b in self.input_ids)
        real_tokens = sum(sum(1 for t in b if t != pad_token_id) for b in self.input_ids) if pad_token_id is not None else block_tokens
        return {
            "blocks": len(self.input_ids),
            # Share of block positions holding real tokens (stream packing adds no padding).
            "packing_efficiency": real_tokens / max(block_tokens, 1),
            # Share of the tokenized corpus that made it into blocks (the tail block is dropped).
            "tokens_used_fraction": (self.tokens_total - self.tokens_dropped) / max(self.tokens_total, 1),
            "tokens_in_blocks": block_tokens,
        }


def tokenize_records(tokenizer, records: list[str], *, batch_size: int = 256) -> list[list[int]]:
    """Token ids per record, wrapped as [bos] + text + [eos] (bos only if the model uses one). The
    text's ids come from ``pipeline.data.mistral.text_token_ids``: mistral-common's for a Mistral
    tokenizer (as Mistral and sft encode text), the tokenizer's own otherwise."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer", "has no eos_token: documents cannot be separated", "set tokenizer.eos_token")
    out: list[list[int]] = []
    for start in range(0, len(records), batch_size):
        out.extend(bos + ids + [eos] for ids in text_token_ids(tokenizer, records[start : start + batch_size]))
    return out


def iter_packed_blocks(docs: Iterable[list[int]], seq_len: int) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """(input_ids, position_ids, labels) blocks of ``seq_len`` cut from the concatenated documents;
    the incomplete tail is not yielded.

    A document split across two blocks continues in the next block as a new segment (positions
    restart at 0 there) - the standard trade-off of stream packing, and it keeps efficiency ~100%.
    """
    if seq_len < 2:
        raise ConfigError("cpt.seq_len", f"must be >= 2, got {seq_len}")
    ids: list[int] = []
    starts: list[bool] = []
    for doc in docs:
        ids.extend(doc)
        starts.extend([True] + [False] * (len(doc) - 1))
        while len(ids) >= seq_len:
            block, block_starts = ids[:seq_len], starts[:seq_len]
            del ids[:seq_len], starts[:seq_len]
            pos, lab = [], []
            p = 0
            for i, (tok, doc_start) in enumerate(zip(block, block_starts)):
                if doc_start or i == 0:
                    p = 0
                pos.append(p)
                lab.append(-100 if (doc_start and i > 0) else tok)
                p += 1
            yield block, pos, lab


def pack_documents(docs: list[list[int]], seq_len: int) -> PackedBlocks:
    """Concatenate documents and cut into blocks of ``seq_len`` (the incomplete tail is dropped)."""
    input_ids, position_ids, labels = [], [], []
    for block, pos, lab in iter_packed_blocks(docs, seq_len):
        input_ids.append(block)
        position_ids.append(pos)
        labels.append(lab)
    total = sum(len(d) for d in docs)
    return PackedBlocks(input_ids, position_ids, labels, total, total - len(input_ids) * seq_len)


def check_data_files(files: list[str], *, field: str, column: str, column_field: str, txt_ok: bool, what: str) -> None:
    """Each file exists (or is a reachable hub dataset), is not empty, and has ``column``."""
    if not files:
        raise ConfigError(field, "is empty", f"list the {what}")
    for name in files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field=field)
            continue
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            if not txt_ok:
                raise ConfigError(field, f"{name} is a .txt file", f"give .jsonl/.json/.parquet rows with a '{column}' column")
            if path.stat().st_size == 0:
                raise ConfigError(field, f"{name} is empty")
            continue
        row = next(read_rows(path, field=field), None)
        if row is None:
            raise ConfigError(field, f"{name} has no rows")
        if column not in row:
            raise ConfigError(column_field, f"'{column}' is not a column of {name} (columns: {sorted(row)})",
                              f"set {column_field} to the right column, or convert the data")

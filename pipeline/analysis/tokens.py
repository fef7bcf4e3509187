"""Token blocks for the analysis: the same tokens for the similarity pass and every scored merge, from
the selection split (``pipeline.data.splits``: never the held-out records eval scores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from pipeline.data import check_data_files, iter_text_records, tokenize_records
from pipeline.data.splits import HELDOUT, SELECTION, RecordSplits
from pipeline.errors import ConfigError

DEFAULT_HELDOUT_FRACTION = 0.05
# The selection split's share by default (the analysis CLI; merge=auto reads data.selection_fraction).
DEFAULT_SELECTION_FRACTION = 0.05


@dataclass
class TokenBatches:
    """[B, T] LongTensors of packed tokens of one split (documents joined as bos + text + eos)."""

    batches: List
    num_tokens: int
    num_records: int
    seq_len: int

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def check_analysis_data(files: Sequence[str], *, text_column: str, field: str = "--data") -> None:
    """The data files as every stage checks them (``pipeline.data.check_data_files``: each exists or is a
    reachable hub dataset, is not empty, and has ``text_column``), before any model or tokenizer loads."""
    check_data_files(list(files), field=field, column=text_column, column_field="--text-column", txt_ok=True,
                     what="data files (.txt/.jsonl/.json/.parquet)")


def heldout_token_batches(
    tokenizer,
    data_files: Sequence[str],
    *,
    num_tokens: int,
    seq_len: int,
    batch_size: int = 4,
    heldout_fraction: Optional[float] = DEFAULT_HELDOUT_FRACTION,
    text_column: str = "text",
    field: str = "--data",
) -> TokenBatches:
    """The first ``num_tokens`` tokens of the *held-out* records (``is_heldout(text, fraction)``: the
    test set eval scores; None keeps every record): for scoring, never for choosing (``split_token_batches``
    with the selection split is for that)."""
    return split_token_batches(tokenizer, data_files, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size,
                               splits=None if heldout_fraction is None else RecordSplits(heldout_fraction),
                               which=HELDOUT, text_column=text_column, field=field)


def split_token_batches(
    tokenizer,
    data_files: Sequence[str],
    *,
    num_tokens: int,
    seq_len: int,
    batch_size: int = 4,
    splits: Optional[RecordSplits],
    which: str = SELECTION,
    text_column: str = "text",
    txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000,
    field: str = "--data",
    tokens_field: str = "--tokens",
    fraction_field: str = "--selection-fraction",
) -> TokenBatches:
    """The first ``num_tokens`` tokens of the records of one split (``pipeline.data.splits``) of
    ``data_files``, cut into blocks of ``seq_len`` (the last block may be shorter) and grouped
    ``batch_size`` blocks per batch.

    ``which=SELECTION`` (the default): the records that choose (a seam, a checkpoint), neither held
    out for eval nor trained on by cpt. ``splits=None`` keeps every record (a file set aside for
    this). Records are cut as the pipeline cuts them (``txt_document_separator``, ``max_record_chars``:
    pass the run's ``data`` settings, or the hash would place other pieces of text). Raises ConfigError when the split holds fewer tokens than asked, naming ``tokens_field``
    and ``fraction_field``.
    """
    import torch

    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 2:
        raise ConfigError(tokens_field, f"must be an integer >= 2, got {num_tokens!r}", f"e.g. {tokens_field} 4096")
    if seq_len < 2:
        raise ConfigError("--seq-len", f"must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    if splits is not None and which == SELECTION and splits.selection_fraction <= 0:
        raise ConfigError(fraction_field, "is 0: the selection split is empty",
                          f"set {fraction_field} > 0 (e.g. 0.05): the held-out records are eval's test set")
    check_analysis_data(data_files, text_column=text_column, field=field)
    ids: List[int] = []
    records = 0
    for name in data_files:
        for text in iter_text_records(name, text_column=text_column, txt_document_separator=txt_document_separator,
                                      max_record_chars=max_record_chars, field=field):
            if splits is not None and splits.of(text) != which:
                continue
            ids.extend(tokenize_records(tokenizer, [text])[0])
            records += 1
            if len(ids) >= num_tokens:
                break
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        if splits is None:
            which_records = "records"
        elif which == SELECTION:
            which_records = splits.describe()
        else:
            which_records = f"{which} records (held-out fraction {splits.heldout_fraction})"
        more = f", raise {fraction_field}" if splits is not None and which == SELECTION else ""
        raise ConfigError(tokens_field, f"asked for {num_tokens} tokens but {which_records} of {list(data_files)} "
                          f"hold only {len(ids)} ({records} records)",
                          f"use {tokens_field} {len(ids)} or less{more}, or give more data")
    ids = ids[:num_tokens]
    blocks = [ids[i:i + seq_len] for i in range(0, num_tokens, seq_len)]
    full = [b for b in blocks if len(b) == seq_len]
    batches = [torch.tensor(full[i:i + batch_size], dtype=torch.long) for i in range(0, len(full), batch_size)]
    if len(blocks[-1]) != seq_len:
        if len(blocks[-1]) >= 2:  # a 1-token block predicts nothing
            batches.append(torch.tensor([blocks[-1]], dtype=torch.long))
    return TokenBatches(batches=batches, num_tokens=sum(int(b.numel()) for b in batches), num_records=records,
                        seq_len=seq_len)

"""Held-out token blocks for the analysis: the same tokens for the similarity pass and every scored merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from pipeline.data import check_data_file, is_heldout, is_hub_dataset_name, iter_text_records, tokenize_records
from pipeline.errors import ConfigError

DEFAULT_HELDOUT_FRACTION = 0.05


@dataclass
class TokenBatches:
    """[B, T] LongTensors of packed held-out tokens (documents joined as bos + text + eos)."""

    batches: List
    num_tokens: int
    num_records: int
    seq_len: int

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def check_data_files(files: Sequence[str], *, field: str = "--data") -> None:
    """Each file exists with a supported suffix (hub datasets are checked when streamed)."""
    if not files:
        raise ConfigError(field, "no data file given", "pass --data FILE (.txt/.jsonl/.json/.parquet)")
    for name in files:
        if not is_hub_dataset_name(name):
            check_data_file(name, field=field)


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
    """The first ``num_tokens`` tokens of the held-out records of ``data_files``, cut into blocks of
    ``seq_len`` (the last block may be shorter) and grouped ``batch_size`` blocks per batch.

    ``heldout_fraction``: keep only records with ``is_heldout(text, fraction)`` (the pipeline's
    split: the tokens were not trained on by cpt); None keeps every record (a file that is
    already held-out text). Raises ConfigError when the data holds fewer tokens than asked.
    """
    import torch

    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 2:
        raise ConfigError("--tokens", f"must be an integer >= 2, got {num_tokens!r}", "e.g. --tokens 4096")
    if seq_len < 2:
        raise ConfigError("--seq-len", f"must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    check_data_files(data_files, field=field)
    ids: List[int] = []
    records = 0
    for name in data_files:
        for text in iter_text_records(name, text_column=text_column, field=field):
            if heldout_fraction is not None and not is_heldout(text, heldout_fraction):
                continue
            ids.extend(tokenize_records(tokenizer, [text])[0])
            records += 1
            if len(ids) >= num_tokens:
                break
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        which = f"held-out records (fraction {heldout_fraction})" if heldout_fraction is not None else "records"
        raise ConfigError("--tokens", f"asked for {num_tokens} tokens but the {which} of {list(data_files)} hold "
                          f"only {len(ids)}", f"use --tokens {len(ids)} or less, or give more data")
    ids = ids[:num_tokens]
    blocks = [ids[i:i + seq_len] for i in range(0, num_tokens, seq_len)]
    full = [b for b in blocks if len(b) == seq_len]
    batches = [torch.tensor(full[i:i + batch_size], dtype=torch.long) for i in range(0, len(full), batch_size)]
    if len(blocks[-1]) != seq_len:
        if len(blocks[-1]) >= 2:  # a 1-token block predicts nothing
            batches.append(torch.tensor([blocks[-1]], dtype=torch.long))
    return TokenBatches(batches=batches, num_tokens=sum(int(b.numel()) for b in batches), num_records=records,
                        seq_len=seq_len)

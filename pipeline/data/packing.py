"""Tokenizing records and packing them into fixed-length blocks for continued pretraining."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.data.mistral import text_token_ids
from pipeline.errors import ConfigError


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

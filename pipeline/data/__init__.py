"""Loading, splitting, tokenizing and packing the training data.

Raw text becomes *records* (documents, long ones cut at paragraph boundaries); a record is
held out for evaluation when the hash of its text says so, which keeps the split stable across
runs, file orders and machines. Conversations are split the same way.

The modules: ``files.py`` (local files and hub datasets, the checks before any work),
``records.py`` (raw text as records), ``splits.py`` (train / selection / held-out by content
hash), ``conversations.py`` (sft formats to conversations), ``packing.py`` (tokenizing, packed
blocks); ``mistral.py``, ``chat_masking.py``, ``chat.py``, ``preference.py``, ``cpt_cache.py``.
The names below are the package's API for the stages (``from pipeline.data import ...``).
"""

from __future__ import annotations

from pipeline.data.conversations import (
    SFT_FORMATS,
    SHAREGPT_ROLES,
    conversation_key,
    detect_sft_format,
    load_conversations,
    row_to_messages,
    sft_row_messages,
)
from pipeline.data.files import (
    TEXT_SUFFIXES,
    check_data_file,
    check_data_files,
    is_hub_dataset_name,
    iter_hub_rows,
    read_rows,
    require_hub_access,
)
from pipeline.data.packing import PackedBlocks, iter_packed_blocks, pack_documents, tokenize_records
from pipeline.data.records import iter_text_records, load_text_records
from pipeline.data.splits import Split, heldout_text_records, is_heldout, split_records

__all__ = [
    "SFT_FORMATS", "SHAREGPT_ROLES", "TEXT_SUFFIXES", "PackedBlocks", "Split", "check_data_file", "check_data_files",
    "conversation_key", "detect_sft_format", "heldout_text_records", "is_heldout", "is_hub_dataset_name",
    "iter_hub_rows", "iter_packed_blocks", "iter_text_records", "load_conversations", "load_text_records",
    "pack_documents", "read_rows", "require_hub_access", "row_to_messages", "sft_row_messages", "split_records",
    "tokenize_records",
]

"""Preference pairs for DPO: read, convert to one shape, check, split.

Two row formats are accepted (``data.dpo_format``: ``auto`` detects each row from its columns,
or pin one of ``DPO_FORMATS``):

* ``strings``: ``prompt``, ``chosen`` and ``rejected`` are strings (a one-turn user prompt and two
  assistant replies; Anthropic-HH-style "prompt/chosen/rejected" text columns).
* ``messages``: ``chosen`` and ``rejected`` are lists of ``{role, content}`` messages. Either full
  conversations that share their prompt turns and end with the assistant reply being compared
  (UltraFeedback-binarized: its ``prompt`` *string* column repeats the first user turn and is not
  used), or, when ``prompt`` is itself a list of messages, TRL's explicit-prompt form where
  ``chosen``/``rejected`` hold only the reply.

Every row becomes TRL's conversational preference example (what ``trl.DPOTrainer`` 1.16
tokenizes with the chat template: ``prompt`` with ``add_generation_prompt=True``, then
``prompt + chosen`` and ``prompt + rejected``)::

    {"prompt": [{"role": "user", "content": ...}, ...],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Rows that cannot teach anything, or would teach the wrong thing, are refused with a ConfigError
naming the file and row: chosen equal to rejected, an empty prompt or reply, and a pair whose two
conversations have different prompt turns (their rewards would not be comparable).

``tokenize_pair`` splits a pair into prompt / chosen / rejected token ids exactly as
``trl.DPOTrainer`` does; the trainer's fixed batch and the held-out evaluation both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.data import check_data_file, is_hub_dataset_name, iter_hub_rows, read_rows, split_records
from pipeline.errors import ConfigError

DPO_FORMATS = ("strings", "messages")
ACCEPTED_FORMATS_TEXT = (
    "'prompt'/'chosen'/'rejected' strings (format strings), or 'chosen'/'rejected' as lists of "
    "{role, content} messages: full conversations sharing their prompt turns (UltraFeedback-binarized), or "
    "with 'prompt' as a message list and the replies alone (format messages)"
)
PREFERENCE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _is_message_list(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def detect_preference_format(row: dict) -> str | None:
    """The format a row is in, from its columns; None when it is in neither."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        return None
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(row.get("prompt"), str):
        return "strings"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "messages"
    return None


def _clean_messages(messages: list, *, side: str) -> list[dict]:
    """{role, content} only (extra keys such as UltraFeedback's scores are dropped), text content."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"'{side}' item {i} is not a {{role, content}} message")
        if not isinstance(m["content"], str):
            raise ValueError(f"'{side}' item {i} has non-text content ({type(m['content']).__name__}); "
                             "only text messages are supported")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _reply(messages: list[dict], *, side: str) -> dict:
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(f"'{side}' must end with an assistant message (it ends with role '{last['role']}')")
    if not last["content"].strip():
        raise ValueError(f"'{side}' reply is empty")
    return last


def row_to_preference(row: dict, fmt: str) -> dict:
    """One row as ``{"prompt": [...], "chosen": [reply], "rejected": [reply]}``.

    Raises ValueError saying what is wrong with the row; ``preference_row`` adds the file and row.
    """
    if fmt == "strings":
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        if not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            raise ValueError("'prompt', 'chosen' and 'rejected' must all be strings")
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"'{side}' reply is empty")
        pair = {"prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    elif fmt == "messages":
        chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
        if not _is_message_list(chosen_raw) or not _is_message_list(rejected_raw):
            raise ValueError("'chosen' and 'rejected' must be non-empty lists of {role, content} messages")
        chosen = _clean_messages(chosen_raw, side="chosen")
        rejected = _clean_messages(rejected_raw, side="rejected")
        explicit_prompt = row.get("prompt")
        if isinstance(explicit_prompt, list):
            if not _is_message_list(explicit_prompt):
                raise ValueError("'prompt' is a list but not of {role, content} messages")
            prompt = _clean_messages(explicit_prompt, side="prompt")
            for side, msgs in (("chosen", chosen), ("rejected", rejected)):
                if len(msgs) != 1:
                    raise ValueError(f"with 'prompt' given as messages, '{side}' must hold exactly the one assistant "
                                     f"reply (it has {len(msgs)} messages)")
        else:
            prompt = chosen[:-1]
            if rejected[:-1] != prompt:
                first = next((i for i, (a, b) in enumerate(zip(prompt, rejected[:-1])) if a != b),
                             min(len(prompt), len(rejected) - 1))
                raise ValueError(f"'chosen' and 'rejected' have different prompt turns (they differ at message {first}); "
                                 "both must be the same conversation up to the final assistant reply")
        if not prompt or not any(m["content"].strip() for m in prompt):
            raise ValueError("the prompt is empty (no message before the final assistant reply)")
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant message; it must end with the turn being answered")
        pair = {"prompt": prompt,
                "chosen": [_reply(chosen, side="chosen")],
                "rejected": [_reply(rejected, side="rejected")]}
    else:
        raise ValueError(f"unknown preference format '{fmt}'")
    if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
        raise ValueError("'chosen' and 'rejected' replies are the same text: the pair has no preference to learn")
    return pair


def preference_row(row, *, fmt: str, where: str, field: str = "data.dpo_format") -> dict:
    """``row_to_preference`` with the format detected when ``fmt`` is auto, and a ConfigError naming
    the file and row for anything that is not a usable pair."""
    if fmt not in ("auto", *DPO_FORMATS):
        raise ConfigError(field, f"unknown format '{fmt}'", f"use auto or one of {', '.join(DPO_FORMATS)}")
    row_fmt = detect_preference_format(row) if fmt == "auto" else fmt
    if row_fmt is None:
        columns = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(where, f"no preference format recognised from the columns {columns}",
                          f"give {ACCEPTED_FORMATS_TEXT}")
    try:
        return row_to_preference(row, row_fmt)
    except ValueError as e:
        raise ConfigError(where, f"{e} (format: {row_fmt})",
                          f"fix or drop the row (accepted: {ACCEPTED_FORMATS_TEXT})") from None


def iter_preference_rows(name: str, *, field: str = "data.dpo_files") -> Iterator[dict]:
    """Raw rows of one local file (.jsonl/.json/.parquet) or hub dataset ``org/name[:split]``."""
    if is_hub_dataset_name(name):
        yield from iter_hub_rows(name, field=field)
        return
    path = check_data_file(name, field=field)
    if path.suffix not in PREFERENCE_SUFFIXES:
        raise ConfigError(field, f"{path}: preference data must be {'/'.join(PREFERENCE_SUFFIXES)} rows",
                          f"give {ACCEPTED_FORMATS_TEXT}")
    yield from read_rows(path, field=field)


def load_preferences(files: list[str], *, dpo_format: str = "auto", field: str = "data.dpo_files",
                     limit: int | None = None) -> list[dict]:
    """Preference pairs from local files and hub datasets in TRL's conversational preference shape,
    every row checked (a bad row stops the load with its file and row number)."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .jsonl/.json/.parquet file of preference pairs")
    pairs: list[dict] = []
    for name in files:
        for i, row in enumerate(iter_preference_rows(name, field=field)):
            pairs.append(preference_row(row, fmt=dpo_format, where=f"{field} ({name}) row {i}"))
            if limit is not None and len(pairs) >= limit:
                return pairs
    if not pairs:
        raise ConfigError(field, f"{files} contain no preference pairs", "check the files are not empty")
    return pairs


def preference_key(pair: dict) -> str:
    """What decides whether a pair is held out: its prompt turns plus the chosen reply, serialised
    exactly as ``pipeline.data.conversation_key`` serialises a conversation. So a pair built from an
    sft conversation (the reference answer as chosen) is held out exactly when sft held that
    conversation out, and the held-out pairs score a model on prompts it was not trained on."""
    return json.dumps(pair["prompt"] + pair["chosen"], sort_keys=True)


def split_preferences(pairs: Iterable[dict], heldout_fraction: float):
    """``pipeline.data.Split`` of pairs (train, heldout) by ``preference_key``: stable across runs."""
    return split_records(pairs, heldout_fraction, preference_key)


def check_preference_files(files: list[str], *, dpo_format: str = "auto", field: str = "data.dpo_files",
                           max_rows: int | None = None) -> int:
    """Preflight: read and check every row (or the first ``max_rows`` of each file); the count of pairs."""
    if not files:
        raise ConfigError(field, "no files given", "list at least one .jsonl/.json/.parquet file of preference pairs")
    count = 0
    for name in files:
        for i, row in enumerate(iter_preference_rows(name, field=field)):
            if max_rows is not None and i >= max_rows:
                break
            preference_row(row, fmt=dpo_format, where=f"{field} ({name}) row {i}")
            count += 1
    if count == 0:
        raise ConfigError(field, f"{files} contain no preference pairs", "check the files are not empty")
    return count


# ---------------------------------------------------------------------------------------------
# Tokenization, as trl.DPOTrainer 1.16 does it (training and evaluation share this one rule)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(enc["input_ids"])


def tokenize_pair(tokenizer, pair: dict) -> TokenizedPair:
    """Prompt, chosen and rejected token ids, split where ``trl.DPOTrainer`` splits them."""
    prompt = _chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    full_chosen = _chat_ids(tokenizer, pair["prompt"] + pair["chosen"], add_generation_prompt=False)
    full_rejected = _chat_ids(tokenizer, pair["prompt"] + pair["rejected"], add_generation_prompt=False)
    n = min(_common_prefix_length(prompt, full_chosen), _common_prefix_length(prompt, full_rejected))
    return TokenizedPair(prompt[:n], full_chosen[n:], full_rejected[n:])

"""sft data: rows in any supported format (chat messages, ShareGPT, alpaca, prompt/completion) as
conversations of {role, content} dicts, converted once, here, for every stage that reads them.
"""

from __future__ import annotations

import json

from pipeline.data.files import check_data_file, is_hub_dataset_name, iter_hub_rows, read_rows
from pipeline.errors import ConfigError


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

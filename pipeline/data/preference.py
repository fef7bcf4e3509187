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

Every row becomes TRL's conversational preference example (a ``PreferencePair``: a dict that also
remembers its file and row), tokenized by ``tokenize_pair`` below::

    {"prompt": [{"role": "user", "content": ...}, ...],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Rows that cannot teach anything, or would teach the wrong thing, are refused with a ConfigError
naming the file and row: chosen equal to rejected, an empty prompt or reply, and a pair whose two
conversations have different prompt turns (their rewards would not be comparable).

``tokenize_pair`` splits a pair into prompt / chosen / rejected token ids with sft's encoder
(mistral-common for Mistral, the chat template otherwise) and refuses a pair whose prompt ids are not
a prefix of its prompt + reply ids; the trainer (which takes these ids instead of tokenizing
itself), its fixed batch and the held-out evaluation all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.data.chat_masking import common_prefix_length
from pipeline.data.files import check_data_file, is_hub_dataset_name, iter_hub_rows, read_rows
from pipeline.data.mistral import mistral_common_tokenizer_for
from pipeline.data.splits import split_records
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


class PreferencePair(dict):
    """A pair in TRL's conversational shape (a plain dict to every consumer, equal to one) that
    remembers the file and row it was read from, so that a problem found later - a prompt whose ids
    are not a prefix of prompt + reply (``tokenize_pair``) - names that row."""

    source: str | None = None


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
        pair = PreferencePair(row_to_preference(row, row_fmt))
    except ValueError as e:
        raise ConfigError(where, f"{e} (format: {row_fmt})",
                          f"fix or drop the row (accepted: {ACCEPTED_FORMATS_TEXT})") from None
    pair.source = where
    return pair


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
    """``pipeline.data.splits.Split`` of pairs (train, heldout) by ``preference_key``: stable across runs."""
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
# Tokenization (training and evaluation share this one rule)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the chosen reply's tokens as trained: the prompt's continuation
    rejected_ids: list[int]

    def as_row(self) -> dict[str, list[int]]:
        """The columns trl.DPOTrainer's collator takes."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


def _template_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(where, "the tokenizer has no chat template: prompts and replies cannot be rendered",
                          "use the sft model's tokenizer (it has one) or set tokenizer.chat_template")
    try:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception(...): the row's roles or order
        raise ConfigError(where, f"the chat template refused this pair: {type(e).__name__}: {e}",
                          "fix the row (roles, order) or use a template that accepts it") from None
    return list(enc["input_ids"])


def _mistral_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str) -> list[int]:
    """mistral-common's encoding, as sft encodes conversations: the prompt alone as at inference
    (validated as a request ending with the user's turn), prompt + reply as in fine-tuning."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mistral = mistral_common_tokenizer_for(tokenizer, mode="test" if add_generation_prompt else "finetuning")
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    unknown = next((m["role"] for m in messages if m["role"] not in kinds), None)
    if unknown is not None:
        raise ConfigError(where, f"has role '{unknown}', which the Mistral encoder does not take here",
                          "use system/user/assistant turns")
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    try:
        return list(mistral.encode_chat_completion(request).tokens)
    except Exception as e:  # mistral-common's validation: role order, empty turns, ...
        raise ConfigError(where, f"mistral-common refused this pair: {type(e).__name__}: {e}",
                          "fix the row (user/assistant turns alternating, non-empty turns)") from None


def pair_source(pair: dict, default: str = "preference pair") -> str:
    """The file and row a pair was read from (``load_preferences`` records it), else ``default``."""
    return getattr(pair, "source", None) or default


def tokenize_pair(tokenizer, pair: dict, *, where: str | None = None) -> TokenizedPair:
    """Prompt, chosen and rejected token ids of one pair.

    The encoder is sft's: mistral-common for a Mistral tokenizer (``pipeline.data.mistral``; the
    Hub's v0.3 template would drop the system prompt and move the split into the user turn), the
    chat template otherwise (the prompt rendered with the generation prompt, as at inference, then
    prompt + reply, as trl.DPOTrainer does). The prompt's ids must be a prefix of both prompt +
    reply renderings: otherwise the "reply" would hold template or prompt tokens, or the prompt
    trained on would not be the one the model sees at inference, and the pair is refused with a
    ConfigError naming ``where`` (default: the file and row the pair came from)."""
    where = where or pair_source(pair)
    encode = _mistral_ids if mistral_common_tokenizer_for(tokenizer) is not None else _template_ids
    prompt = encode(tokenizer, pair["prompt"], add_generation_prompt=True, where=where)
    replies = {}
    for side in ("chosen", "rejected"):
        full = encode(tokenizer, pair["prompt"] + pair[side], add_generation_prompt=False, where=where)
        n = common_prefix_length(prompt, full)
        if n < len(prompt):
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
            raise ConfigError(
                where,
                f"the prompt's {len(prompt)} token ids are not a prefix of prompt + {side} reply (they differ at token "
                f"{n}: the prompt continues {decode(prompt[n:n + 12])!r}, prompt + reply {decode(full[n:n + 12])!r})",
                "the chat template renders the prompt differently when a reply follows (or tokens merge across the "
                "boundary), so the reply's tokens cannot be told from the prompt's; use a template that renders the "
                "prompt the same way in both cases, or drop the row",
            )
        if len(full) == n:
            raise ConfigError(where, f"prompt + {side} reply renders no token after the prompt",
                              "the template drops the reply; fix the row or the template")
        replies[side] = full[n:]
    return TokenizedPair(prompt, replies["chosen"], replies["rejected"])

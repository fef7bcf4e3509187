"""Assistant-token masks for any chat template, verified on every example.

TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers in the chat template; the
templates real models ship (Llama 3.x, ChatML/Qwen2.5/SmolLM2, Qwen3, Gemma, Phi-3, Mistral) have
none. This module finds the trained tokens itself, from the rendered text, for a template without
markers (and for one with them: markers render to nothing):

1. Render the conversation once (``apply_chat_template(..., tokenize=False)``) and tokenize the
   text with character offsets (``add_special_tokens=False``: the template writes bos itself).
2. For each trained turn, render again with that turn's content replaced by a unique placeholder.
   The text after the placeholder must end the real rendering too (the suffix does not depend on
   the reply): where it starts is where the reply's rendering ends. The reply starts where the
   placeholder did, or, for a turn of the assistant, at the end of the generation prompt
   (``messages[:i]`` rendered with ``add_generation_prompt=True``) when that prompt is a prefix of
   the rendering: everything the model writes after its prompt is trained, including a reasoning
   block the template wraps around the reply (Qwen3's ``<think>...</think>``, as TRL's own
   ``qwen3_training.jinja`` does). Placeholder positions are never token-prefix lengths, so this
   holds for templates that move the system prompt, rewrite earlier turns, add a trailing eos, or
   whose BPE merges across a turn boundary.
3. The end-of-turn token is the first token after the reply, past any whitespace the template
   inserts; it must be one added/special token (``<|im_end|>``, ``<|eot_id|>``,
   ``<end_of_turn>``, ``<|end|>``, ``</s>``...).
4. Characters map to tokens through the offsets: a token overlapping the reply is trained.
5. Verification, per turn: the decoded trained tokens must equal the reply (whitespace at the ends
   or inside aside: templates ``|trim``, SentencePiece adds a leading space, Qwen3 reformats the
   reasoning block), followed by the end-of-turn token. A reasoning block the template drops from
   an earlier turn (Qwen3), or an empty one it adds, is accepted and named in ``MaskedTurn.note``.
   Anything else raises ``ConfigError`` naming the example (callers pass ``where=``, e.g. file and
   row): a mask is never returned unverified.

Mistral models are encoded by mistral-common, not by their Hub template (the v0.3 Hub template
drops the system prompt when the conversation ends with an assistant turn; mistral-common's
encoder keeps it, in the last user turn, as Mistral trained it). A tokenizer is Mistral's when its
vocabulary - the piece at every id - equals one of the tokenizers mistral-common ships
(SentencePiece v1, v2, v3, v7, tekken; ``pipeline.data.mistral``): names, paths and templates are
not trusted, and a Llama-2-style ``[INST]`` template on another vocabulary goes through the
template path. The ids are then exactly
mistral-common's, and the trained tokens are each assistant message's own encoding (reply + eos).

Truncation (``max_length``) keeps the first ``max_length`` tokens, after the whole example was
verified. A reply cut by the limit keeps its first tokens trained (a prefix of a verified turn;
``keep_truncated_reply=False`` untrains it). An example left with no trained token is returned with
``trained_tokens == 0`` for the caller to drop (``masked_rows`` does, and counts them).

Library code: plain functions with keyword arguments, no Hydra.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.conversations import sft_row_messages
from pipeline.data.files import read_rows
from pipeline.data.mistral import mistral_common_tokenizer_for
from pipeline.errors import ConfigError

IGNORE_INDEX = -100
# The reasoning tags the templates of reasoning models parse out of an assistant reply (Qwen3,
# DeepSeek-R1 distills): a template may drop the block from earlier turns or add an empty one.
REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class MaskedTurn:
    """Where one trained message landed in the token ids (before truncation)."""

    message_index: int
    role: str
    token_start: int  # first trained token
    token_end: int  # one past the last trained token (the end-of-turn token when trained)
    end_of_turn_id: int | None  # None when the end-of-turn token is not trained
    note: str = ""  # what the verification allowed, e.g. "reasoning dropped by the template"


@dataclass
class MaskedExample:
    """Token ids of one conversation and the 0/1 mask of the tokens to train on."""

    input_ids: list[int]
    assistant_mask: list[int]
    turns: list[MaskedTurn] = field(default_factory=list)
    truncated: bool = False  # max_length cut the ids
    encoder: str = "chat_template"  # or "mistral_common"

    @property
    def trained_tokens(self) -> int:
        return sum(self.assistant_mask)

    def labels(self) -> list[int]:
        return labels_from_mask(input_ids=self.input_ids, assistant_mask=self.assistant_mask)


def labels_from_mask(*, input_ids: Sequence[int], assistant_mask: Sequence[int]) -> list[int]:
    """Labels for a causal LM: the token id where the mask is 1, -100 elsewhere (not trained)."""
    if len(input_ids) != len(assistant_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and assistant_mask ({len(assistant_mask)}) differ in length")
    return [int(t) if m else IGNORE_INDEX for t, m in zip(input_ids, assistant_mask)]


# ---------------------------------------------------------------------------------------------
# Checks shared by both encoders
# ---------------------------------------------------------------------------------------------

def _check_messages(messages: Any, *, train_roles: Sequence[str], where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(where, "is not a non-empty list of {role, content} messages", "fix the row")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(where, f"message {i} is not a {{role, content}} object", "fix the row")
        if m["role"] in train_roles and not isinstance(m["content"], str):
            raise ConfigError(where, f"message {i} ({m['role']}) has non-text content ({type(m['content']).__name__})",
                              "trained turns must be plain text; convert or drop the row")
    if not any(m["role"] in train_roles and m["content"].strip() for m in messages):
        raise ConfigError(where, f"has no {'/'.join(train_roles)} turn with text: nothing to train on",
                          "drop the row, or add the reply")


def _squash_whitespace(text: str) -> str:
    return "".join(text.split())


def _strip_reasoning(text: str) -> str:
    """The reply after its reasoning block (the text after the last closing tag)."""
    return text.split(REASONING_CLOSE)[-1] if REASONING_CLOSE in text else text


def _reply_matches(rendered: str, reply: str) -> str | None:
    """How ``rendered`` (the decoded trained tokens, end-of-turn excluded) matches ``reply``:
    a note ("" when equal up to whitespace), or None when it does not."""
    if rendered.strip() == reply.strip():
        return ""
    if _squash_whitespace(rendered) == _squash_whitespace(reply):
        return "whitespace inside the reply differs from the message (the template reformats it)"
    if REASONING_CLOSE in reply and _squash_whitespace(rendered) == _squash_whitespace(_strip_reasoning(reply)):
        return "reasoning dropped by the template (trained: the reply after it)"
    empty_block = re.compile(re.escape(REASONING_OPEN) + r"\s*" + re.escape(REASONING_CLOSE))
    if REASONING_CLOSE not in reply and _squash_whitespace(empty_block.sub("", rendered, count=1)) == _squash_whitespace(reply):
        return "empty reasoning block added by the template (trained with the reply)"
    return None


def _verify_turn(*, tokenizer, ids: list[int], start: int, end: int, eot_id: int | None, reply: str,
                 message_index: int, role: str, where: str) -> str:
    """Decoded trained tokens == reply (+ end-of-turn token), else ConfigError. Returns the note."""
    content_ids = ids[start:end - 1] if eot_id is not None else ids[start:end]
    if eot_id is not None and ids[end - 1] != eot_id:
        raise ConfigError(where, f"message {message_index} ({role}): the last trained token is not its end-of-turn token",
                          "report this template: the mask would be wrong")
    decoded = tokenizer.decode(content_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    note = _reply_matches(decoded, reply)
    if note is None:
        raise ConfigError(
            where,
            f"message {message_index} ({role}): the tokens found for the reply decode to {decoded[:120]!r}, "
            f"not to the reply {reply[:120]!r}",
            "the chat template rewrites this reply (or the tokenizer does not round-trip it); fix the row or the "
            "template: training on these tokens would train on the wrong text",
        )
    return note


def _truncate(example: MaskedExample, *, max_length: int | None, keep_truncated_reply: bool) -> MaskedExample:
    if max_length is None or len(example.input_ids) <= max_length:
        return example
    if max_length < 1:
        raise ConfigError("max_length", f"must be >= 1, got {max_length}")
    mask = example.assistant_mask[:max_length]
    if not keep_truncated_reply:
        for turn in example.turns:
            if turn.token_start < max_length < turn.token_end:
                mask[turn.token_start:max_length] = [0] * (max_length - turn.token_start)
    example.input_ids = example.input_ids[:max_length]
    example.assistant_mask = mask
    example.truncated = True
    return example


# ---------------------------------------------------------------------------------------------
# Any chat template
# ---------------------------------------------------------------------------------------------

def _render(tokenizer, messages: list[dict], *, where: str, chat_template: str | None,
            add_generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template)
    except ConfigError:
        raise
    except Exception as e:  # jinja's raise_exception(...) and template errors: the user's data or template
        raise ConfigError(where, f"the chat template refused this conversation: {type(e).__name__}: {e}",
                          "fix the row (roles, order) or use a template that accepts it") from None
    if not isinstance(text, str):
        raise ConfigError(where, f"the chat template rendered {type(text).__name__}, not text",
                          "pass a single conversation (a list of messages)")
    return text


def _special_token_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in tokenizer.all_special_ids)
    # Added tokens count too: a template's turn delimiters are added tokens, some not flagged special.
    ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items ``a`` and ``b`` share: characters of two renderings here, token ids of a
    prompt and prompt + reply in ``pipeline.data.preference``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mask_with_template(tokenizer, messages: list[dict], *, train_roles: Sequence[str], train_end_of_turn: bool,
                        where: str, chat_template: str | None) -> MaskedExample:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(where, "the tokenizer has no chat template",
                          "use a tokenizer with a chat template, or set tokenizer.chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(where, f"{type(tokenizer).__name__} is not a fast tokenizer: no character offsets",
                          "load the tokenizer with use_fast=True (a tokenizer.json)")
    text = _render(tokenizer, messages, where=where, chat_template=chat_template)
    # verbose=False: a conversation longer than the model's context is expected (max_length cuts it).
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    special_ids = _special_token_ids(tokenizer)
    mask = [0] * len(ids)
    turns: list[MaskedTurn] = []
    # A placeholder no real text contains: random per call, letters only (no template trims or
    # escapes it), one per turn.
    nonce = secrets.token_hex(6).upper()

    for index, message in enumerate(messages):
        if message["role"] not in train_roles:
            continue
        reply = message["content"]
        placeholder = f"QQDUSREPLY{nonce}X{index}QQ"
        swapped = [dict(m) for m in messages]
        swapped[index]["content"] = placeholder
        probe = _render(tokenizer, swapped, where=where, chat_template=chat_template)
        if probe.count(placeholder) != 1 or probe == text:
            raise ConfigError(
                where,
                f"message {index} ({message['role']}): the chat template does not render this turn's content as given "
                f"(a placeholder put in its place appears {probe.count(placeholder)} times; the rendering "
                f"{'does not change' if probe == text else 'changes'} with the reply)",
                "use a template that writes each reply once and verbatim: its tokens cannot be located otherwise",
            )
        at = probe.index(placeholder)
        after = probe[at + len(placeholder):]
        # The text after this reply must not depend on it; where that text starts, the reply ends.
        if not text.endswith(after) or len(text) - len(after) < common_prefix_length(text, probe[:at]):
            raise ConfigError(
                where,
                f"message {index} ({message['role']}): the template renders the rest of the conversation differently "
                "depending on this reply's content, so the reply's end cannot be located",
                "use a template whose later turns do not depend on earlier replies",
            )
        content_end = len(text) - len(after)
        # Start: where the placeholder was when the text before it is unchanged; otherwise (the
        # template reworks the reply, e.g. a reasoning block) as far as the two renderings agree.
        content_start = at if text.startswith(probe[:at]) else common_prefix_length(text, probe[:at])
        if message["role"] == "assistant":
            # Everything the model writes after its generation prompt is its turn (Qwen3's empty
            # <think></think> too, as TRL's qwen3_training.jinja trains it).
            # Only a template that writes a generation prompt (the assistant's header) says where
            # the model starts writing; without one, the placeholder's position stands.
            if index > 0:
                history = _render(tokenizer, messages[:index], where=where, chat_template=chat_template)
                prompt = _render(tokenizer, messages[:index], where=where, chat_template=chat_template,
                                 add_generation_prompt=True)
                if prompt != history and text.startswith(prompt) and len(prompt) <= content_start:
                    content_start = len(prompt)

        # Tokens overlapping [content_start, content_end): the reply (a token straddling the start
        # because BPE merged it with the template's text is the model's to write), as one run.
        overlapping = [k for k, (s, e) in enumerate(offsets) if e > s and s < content_end and e > content_start]
        if overlapping:
            first, end = overlapping[0], overlapping[-1] + 1
        else:  # an empty reply: only its end-of-turn token
            first = end = next((k for k, (s, _) in enumerate(offsets) if s >= content_end), len(ids))
        eot_id = None
        if train_end_of_turn:
            # Past the whitespace the template inserts, the next token must be one special token.
            k = end
            while k < len(ids) and ids[k] not in special_ids and not text[offsets[k][0]:offsets[k][1]].strip():
                k += 1
            if k >= len(ids) or ids[k] not in special_ids:
                following = text[content_end:content_end + 40]
                raise ConfigError(
                    where,
                    f"message {index} ({message['role']}): the template ends this turn with {following!r}, "
                    "not with a single end-of-turn token (eos, <|im_end|>, <|eot_id|>, <end_of_turn>, ...)",
                    "use a template that closes each reply with a special token, or set train_end_of_turn=False "
                    "(the model then never learns to stop)",
                )
            eot_id = ids[k]
            end = k + 1
        if end <= first:
            continue  # an empty reply and no end-of-turn token trained: nothing to learn here
        note = _verify_turn(tokenizer=tokenizer, ids=ids, start=first, end=end, eot_id=eot_id, reply=reply,
                            message_index=index, role=message["role"], where=where)
        for k in range(first, end):
            mask[k] = 1
        turns.append(MaskedTurn(index, message["role"], first, end, eot_id, note))
    return MaskedExample(input_ids=ids, assistant_mask=mask, turns=turns)


# ---------------------------------------------------------------------------------------------
# Mistral: mistral-common's encoder
# ---------------------------------------------------------------------------------------------

def _mask_with_mistral_common(tokenizer, mistral, messages: list[dict], *, train_roles: Sequence[str],
                              train_end_of_turn: bool, where: str) -> MaskedExample:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    if set(train_roles) != {"assistant"}:
        raise ConfigError("train_roles", f"{tuple(train_roles)}: mistral-common encodes Mistral conversations, where "
                          "only assistant turns can be trained", "train_roles=('assistant',)")
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    converted = []
    for i, m in enumerate(messages):
        if m["role"] not in kinds:
            raise ConfigError(where, f"message {i} has role '{m['role']}', which the Mistral encoder does not take here",
                              "use system/user/assistant turns")
        converted.append(kinds[m["role"]](content=m["content"]))
    try:
        ids = list(mistral.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens)
    except Exception as e:  # mistral-common's validation: role order, empty replies, ...
        raise ConfigError(where, f"mistral-common refused this conversation: {type(e).__name__}: {e}",
                          "fix the row (user/assistant turns alternating, non-empty replies)") from None
    instruct = mistral.instruct_tokenizer
    eos = instruct.tokenizer.eos_id
    eos_positions = [k for k, t in enumerate(ids) if t == eos]
    mask = [0] * len(ids)
    turns: list[MaskedTurn] = []
    assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(eos_positions) != len(assistant_indices):
        raise ConfigError(where, f"mistral-common wrote {len(eos_positions)} eos tokens for {len(assistant_indices)} replies",
                          "report this conversation: the replies cannot be located")
    for index, eos_at in zip(assistant_indices, eos_positions):
        # Each reply is its own encoding followed by eos (mistral-common concatenates per-message
        # encodings), ending at its eos: check the ids there are exactly that encoding.
        own = list(instruct.encode_assistant_message(AssistantMessage(content=messages[index]["content"]),
                                                     is_before_last_user_message=False))
        start = eos_at + 1 - len(own)
        if start < 0 or ids[start:eos_at + 1] != own:
            raise ConfigError(where, f"message {index}: mistral-common's encoding of the reply is not where it ends",
                              "report this conversation: the replies cannot be located")
        end = eos_at + 1 if train_end_of_turn else eos_at
        note = _verify_turn(tokenizer=tokenizer, ids=ids, start=start, end=end, eot_id=eos if train_end_of_turn else None,
                            reply=messages[index]["content"], message_index=index, role="assistant", where=where)
        for k in range(start, end):
            mask[k] = 1
        turns.append(MaskedTurn(index, "assistant", start, end, eos if train_end_of_turn else None, note))
    return MaskedExample(input_ids=ids, assistant_mask=mask, turns=turns, encoder="mistral_common")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def mask_assistant_tokens(
    tokenizer,
    messages: list[dict],
    *,
    max_length: int | None = None,
    train_roles: Sequence[str] = ("assistant",),
    train_end_of_turn: bool = True,
    keep_truncated_reply: bool = True,
    chat_template: str | None = None,
    where: str = "conversation",
) -> MaskedExample:
    """Token ids of ``messages`` and the verified mask of the turns of ``train_roles`` (each with
    its end-of-turn token unless ``train_end_of_turn=False``); all such turns are trained.

    ``chat_template`` overrides the tokenizer's. Mistral tokenizers are encoded by mistral-common
    (see the module docstring). Raises ConfigError (prefixed with ``where``) for a conversation
    with no trained turn, a template that does not render a reply verbatim, a turn not closed by
    one special token, or a mask whose decoded tokens are not the reply.
    """
    train_roles = tuple(train_roles)
    _check_messages(messages, train_roles=train_roles, where=where)
    mistral = mistral_common_tokenizer_for(tokenizer) if chat_template is None else None
    if mistral is not None:
        example = _mask_with_mistral_common(tokenizer, mistral, messages, train_roles=train_roles,
                                            train_end_of_turn=train_end_of_turn, where=where)
    else:
        example = _mask_with_template(tokenizer, messages, train_roles=train_roles, train_end_of_turn=train_end_of_turn,
                                      where=where, chat_template=chat_template)
    if not example.turns:
        raise ConfigError(where, f"no {'/'.join(train_roles)} token to train on (empty replies)", "drop the row")
    return _truncate(example, max_length=max_length, keep_truncated_reply=keep_truncated_reply)


@dataclass(frozen=True)
class MaskedRows:
    """Pre-tokenized rows for TRL (``input_ids`` + ``assistant_masks``) and what was left out."""

    rows: list[dict[str, list[int]]]
    examples: int  # conversations given
    dropped_no_trained_token: int  # cut by max_length before their first trained token
    truncated: int
    trained_tokens: int
    notes: dict[str, int]  # verification notes -> turns they apply to

    def stats(self) -> dict[str, Any]:
        return {"examples": self.examples, "rows": len(self.rows), "dropped_no_trained_token": self.dropped_no_trained_token,
                "truncated": self.truncated, "trained_tokens": self.trained_tokens, "notes": dict(self.notes)}


def masked_rows(
    tokenizer,
    conversations: Sequence[list[dict]],
    *,
    max_length: int | None,
    train_roles: Sequence[str] = ("assistant",),
    train_end_of_turn: bool = True,
    keep_truncated_reply: bool = True,
    chat_template: str | None = None,
    where: str = "conversations",
    row_names: Sequence[str] | None = None,
) -> MaskedRows:
    """Every conversation through ``mask_assistant_tokens``: rows ``{"input_ids", "assistant_masks"}``
    as TRL's SFTTrainer takes them pre-tokenized (it builds labels from ``assistant_masks``).
    Rows with no trained token left after truncation are dropped and counted. ``row_names[i]``
    (e.g. "data.sft_files (a.jsonl) row 3") names a failing row; else ``f"{where} row {i}"``."""
    rows: list[dict[str, list[int]]] = []
    dropped = truncated = trained = 0
    notes: dict[str, int] = {}
    for i, conv in enumerate(conversations):
        name = row_names[i] if row_names is not None else f"{where} row {i}"
        ex = mask_assistant_tokens(tokenizer, conv, max_length=max_length, train_roles=train_roles,
                                   train_end_of_turn=train_end_of_turn, keep_truncated_reply=keep_truncated_reply,
                                   chat_template=chat_template, where=name)
        truncated += ex.truncated
        for turn in ex.turns:
            if turn.note:
                notes[turn.note] = notes.get(turn.note, 0) + 1
        if ex.trained_tokens == 0:
            dropped += 1
            continue
        trained += ex.trained_tokens
        rows.append({"input_ids": ex.input_ids, "assistant_masks": ex.assistant_mask})
    return MaskedRows(rows, len(conversations), dropped, truncated, trained, notes)


def check_template_masks(
    tokenizer,
    sample_conversations: Sequence[list[dict]],
    *,
    where: str,
    max_length: int | None = None,
    train_roles: Sequence[str] = ("assistant",),
    train_end_of_turn: bool = True,
    chat_template: str | None = None,
    row_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Preflight: a sample of rows through the real masking (each verified), before any training.
    Raises the first row's ConfigError; returns ``masked_rows(...).stats()`` plus the encoder used.
    Raises when no sampled row keeps a trained token within ``max_length``."""
    if not sample_conversations:
        raise ConfigError(where, "no conversation to check", "give at least one sft row")
    result = masked_rows(tokenizer, sample_conversations, max_length=max_length, train_roles=train_roles,
                         train_end_of_turn=train_end_of_turn, chat_template=chat_template, where=where,
                         row_names=row_names)
    if not result.rows:
        raise ConfigError(where, f"none of the {result.examples} sampled rows has a trained token within the first "
                          f"{max_length} tokens", "raise max_length, or shorten the system prompts / first turns")
    stats = result.stats()
    stats["encoder"] = "mistral_common" if (chat_template is None and mistral_common_tokenizer_for(tokenizer)) else "chat_template"
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.data.chat_masking TOKENIZER_DIR FILE [FILE ...] [--max-length N]``:
    every conversation of the files (any sft format) through the masking, with its verification;
    prints the stats as JSON, or the first bad row's error (exit 2)."""
    import argparse
    import json

    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(prog="python -m pipeline.data.chat_masking", description=main.__doc__)
    ap.add_argument("tokenizer", help="a local model or tokenizer directory")
    ap.add_argument("files", nargs="+", help=".jsonl/.json/.parquet conversations (messages, ShareGPT, alpaca, ...)")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--sft-format", default="auto")
    ap.add_argument("--messages-column", default="messages")
    ap.add_argument("--show", type=int, default=0, help="print the trained text of the first N rows")
    args = ap.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    try:
        conversations, names = [], []
        for name in args.files:
            for i, row in enumerate(read_rows(Path(name), field="files")):
                where = f"{name} row {i}"
                conversations.append(sft_row_messages(row, fmt=args.sft_format, messages_column=args.messages_column,
                                                      where=where))
                names.append(where)
        result = masked_rows(tokenizer, conversations, max_length=args.max_length, row_names=names)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    for row in result.rows[: args.show]:
        trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
        print(json.dumps({"trained_text": tokenizer.decode(trained, skip_special_tokens=False)}, ensure_ascii=False))
    encoder = "mistral_common" if mistral_common_tokenizer_for(tokenizer) is not None else "chat_template"
    print(json.dumps({**result.stats(), "encoder": encoder}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

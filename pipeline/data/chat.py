"""Conversations through a chat template, and which of their tokens are the assistant's.

``assistant_token_mask`` is the one place the assistant-token mask is computed: the sft stage's
verification batch and the eval stage's assistant-token loss both use it, so training and
evaluation agree on what "the assistant's tokens" are.
"""

from __future__ import annotations

import re
from typing import Any

# {% generation %} / {%- generation -%} ... : what return_assistant_tokens_mask needs.
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(chat_template: Any) -> bool:
    if isinstance(chat_template, dict):  # named templates
        chat_template = chat_template.get("default") or next(iter(chat_template.values()), None)
    return isinstance(chat_template, str) and bool(_GENERATION_MARKER.search(chat_template))


def assistant_token_mask(tokenizer, conversation: list[dict], *, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, 1 for each assistant token) of one conversation rendered by the tokenizer's chat
    template, cut to its first ``max_length`` tokens (as sft truncates)."""
    enc = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(enc["input_ids"])[:max_length], list(enc["assistant_masks"])[:max_length]

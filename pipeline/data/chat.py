"""Conversations through a chat template, and which of their tokens are the assistant's.

``assistant_token_mask`` is the one entry point for the assistant-token mask: the sft stage's
training rows and verification batch and the eval stage's assistant-token loss all come from
``pipeline.data.chat_masking`` (any chat template, markers or not; Mistral through mistral-common;
every example verified), so training and evaluation agree on what "the assistant's tokens" are.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.data.chat_masking import mask_assistant_tokens

# {% generation %} / {%- generation -%} ... : what return_assistant_tokens_mask needs.
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(chat_template: Any) -> bool:
    if isinstance(chat_template, dict):  # named templates
        chat_template = chat_template.get("default") or next(iter(chat_template.values()), None)
    return isinstance(chat_template, str) and bool(_GENERATION_MARKER.search(chat_template))


def assistant_token_mask(tokenizer, conversation: list[dict], *, max_length: int,
                         where: str = "conversation") -> tuple[list[int], list[int]]:
    """(input ids, 1 for each trained token: assistant replies and their end-of-turn tokens) of one
    conversation, cut to its first ``max_length`` tokens (as sft truncates). A conversation whose
    mask cannot be verified raises ConfigError prefixed with ``where``."""
    example = mask_assistant_tokens(tokenizer, conversation, max_length=max_length, where=where)
    return example.input_ids, example.assistant_mask

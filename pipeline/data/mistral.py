"""Mistral tokenizers: recognised by their vocabulary, encoded by mistral-common everywhere.

Mistral trained its models on mistral-common's encodings, and the HF tokenizers of the Hub repos do
not always reproduce them: the v0.3 chat template drops the system prompt of a conversation that
ends with a reply, and the fast SentencePiece tokenizer splits runs of spaces differently ("a  b":
``▁▁`` + ``b`` in the fast tokenizer, ``▁`` + ``▁b`` in SentencePiece). So for a Mistral tokenizer
the pipeline takes every token id from mistral-common: sft and eval conversations
(``pipeline.data.chat_masking``), dpo pairs (``pipeline.data.preference``) and plain text
(``text_token_ids``, used by ``pipeline.data.tokenize_records``: cpt, held-out perplexity, the seam
analysis, the GGUF ladder's scoring).

A tokenizer is Mistral's when its vocabulary - the piece at every id - equals one that
mistral-common ships: SentencePiece v1, v2, v3, v7 or a tekken (byte-level BPE) file. Names, paths
and templates are not trusted: a Llama-2-style ``[INST]`` template on another vocabulary is not
Mistral's. v7 and v7m1 are the same SentencePiece model (equal pieces), so v7 stands for both.

This module imports nothing else of ``pipeline.data`` (``pipeline.data`` imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import ConfigError

# mistral-common's tokenizer files, newest first within each kind (v2 and v3 share the 32,768-piece
# size, v3 and v7 differ in 7 control pieces: the first whose pieces all match wins).
MISTRAL_SENTENCEPIECE_FILES = (
    "mistral_instruct_tokenizer_241114.model.v7",
    "mistral_instruct_tokenizer_240323.model.v3",
    "mistral_instruct_tokenizer_240216.model.v2",
    "tokenizer.model.v1",
)
MISTRAL_TEKKEN_FILES = ("tekken_240911.json", "tekken_240718.json")
MISTRAL_TOKENIZER_FILES = MISTRAL_SENTENCEPIECE_FILES + MISTRAL_TEKKEN_FILES
# What the HF tokenizers of those files hold (SentencePiece: 32,000 / 32,768; tekken: 2**17).
_MISTRAL_VOCAB_SIZES = (32000, 32768, 131072)
# What the plain-text encoder of a tokenizer that is not Mistral's is called in cache keys.
HF_TOKENIZER_ENCODER = "hf_tokenizer"

# id(tokenizer) -> (tokenizer, the matching file name or None): the vocabulary is compared once.
_MATCHED: dict[int, tuple[Any, str | None]] = {}
# (file name, validation mode) -> MistralTokenizer
_LOADED: dict[tuple[str, str], Any] = {}


def _looks_like_mistral(tokenizer) -> bool:
    return len(tokenizer) in _MISTRAL_VOCAB_SIZES and (
        tokenizer.convert_tokens_to_ids("[INST]") not in (None, tokenizer.unk_token_id)
        or "[INST]" in str(getattr(tokenizer, "chat_template", "") or ""))


def _import_mistral_common():
    try:
        import mistral_common
    except ImportError:
        raise ConfigError(
            "tokenizer", "looks like a Mistral tokenizer, whose token ids must come from mistral-common "
            "(the Hub template drops the system prompt of training conversations; the fast tokenizer splits "
            "runs of spaces unlike SentencePiece)",
            "pip install 'dus-pipeline[real-models]' (mistral-common, sentencepiece, protobuf)",
        ) from None
    return mistral_common


def _load(name: str, mode: str):
    """mistral-common's ``MistralTokenizer`` of one shipped file, validating requests in ``mode``
    ("finetuning": a conversation ending with a reply; "test": one ending with the user's turn)."""
    key = (name, mode)
    if key not in _LOADED:
        mistral_common = _import_mistral_common()
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        path = Path(mistral_common.__file__).parent / "data" / name
        _LOADED[key] = MistralTokenizer.from_file(str(path), mode=ValidationMode(mode))
    return _LOADED[key]


def _byte_level_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _same_vocabulary(pieces_by_id: dict[int, str], name: str) -> bool:
    raw = _load(name, "finetuning").instruct_tokenizer.tokenizer
    if raw.n_words != len(pieces_by_id):
        return False
    if name in MISTRAL_SENTENCEPIECE_FILES:
        return all(raw.id_to_piece(i) == pieces_by_id.get(i) for i in range(raw.n_words))
    # tekken: control tokens by name, the rest as bytes (HF writes them in GPT-2's byte-level alphabet).
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    specials = raw.num_special_tokens
    if any(raw.id_to_piece(i) != pieces_by_id.get(i) for i in range(specials)):
        return False
    to_byte = _byte_level_decoder()
    for i in range(specials, raw.n_words):
        piece = pieces_by_id.get(i)
        if piece is None or any(c not in to_byte for c in piece):
            return False
        if bytes(to_byte[c] for c in piece) != raw.id_to_byte_piece(i, SpecialTokenPolicy.RAISE):
            return False
    return True


def mistral_tokenizer_file(tokenizer) -> str | None:
    """The name of the mistral-common tokenizer file whose vocabulary is ``tokenizer``'s (piece at
    every id equal), or None when it is not a Mistral tokenizer. Raises ConfigError when it looks
    like Mistral's (vocabulary size and an ``[INST]`` token or template) but mistral-common is not
    installed."""
    cached = _MATCHED.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    found = None
    if _looks_like_mistral(tokenizer):
        mistral_common = _import_mistral_common()
        data = Path(mistral_common.__file__).parent / "data"
        pieces_by_id = {i: p for p, i in tokenizer.get_vocab().items()}
        found = next((name for name in MISTRAL_TOKENIZER_FILES
                      if (data / name).exists() and _same_vocabulary(pieces_by_id, name)), None)
    _MATCHED[id(tokenizer)] = (tokenizer, found)
    return found


def mistral_common_tokenizer_for(tokenizer, *, mode: str = "finetuning"):
    """mistral-common's ``MistralTokenizer`` for ``tokenizer`` (see ``mistral_tokenizer_file``),
    validating in ``mode``; None when ``tokenizer`` is not a Mistral one."""
    name = mistral_tokenizer_file(tokenizer)
    return None if name is None else _load(name, mode)


def plain_text_encoder(tokenizer) -> str:
    """Which encoder ``text_token_ids`` uses for ``tokenizer``: ``mistral_common:<file>`` or
    ``hf_tokenizer``. Part of every cache key of tokenized text (the ids differ between the two)."""
    name = mistral_tokenizer_file(tokenizer)
    return HF_TOKENIZER_ENCODER if name is None else f"mistral_common:{name}"


def text_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no bos/eos: mistral-common's (SentencePiece or tekken) for a Mistral
    tokenizer, else the HF tokenizer's own. The one plain-text encoder of the pipeline."""
    mistral = mistral_common_tokenizer_for(tokenizer)
    if mistral is not None:
        raw = mistral.instruct_tokenizer.tokenizer
        return [list(raw.encode(text, bos=False, eos=False)) for text in texts]
    # verbose=False: records longer than the model's context are expected (packing cuts them).
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

"""Evaluation of every stage's model, so one table shows what each stage did.

SOLAR's depth up-scaling story in numbers: the merged (passthrough) model scores a worse held-out
perplexity than the base, continued pretraining (cpt) brings it back, instruction tuning (sft)
lowers the loss on held-out assistant replies. Every function here is plain, with explicit keyword
arguments; the eval stage calls them once per stage model:

- ``heldout_perplexity``: per-token perplexity of the held-out corpus records (our own loop).
- ``assistant_token_loss``: mean loss on the assistant tokens of held-out conversations.
- ``run_lm_eval``: lm-evaluation-harness (``pip install 'dus-pipeline[eval]'``) on local tasks
  (``pipeline/evaluation/lm_eval_tasks``: ``dus_mc``, ``dus_corpus_ppl``) or public ones (``eval=leaderboard``).
- ``write_results``, ``plot_training``, ``plot_tasks``: ``results.json``, ``results.md``, PNGs.

Metric keys are flat, ``"<task>/<metric>"``: ``heldout/perplexity``, ``sft_heldout/loss``,
``dus_mc/acc``, ``dus_mc/acc_stderr``, ``dus_corpus_ppl/word_perplexity``, ``harness/average``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from pipeline import metric_names as M
from pipeline.config import REPO_ROOT
from pipeline.data import tokenize_records
from pipeline.data.chat import assistant_token_mask
from pipeline.errors import ConfigError

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# Tasks defined in LOCAL_TASKS_DIR whose data file is filled in at run time.
LOCAL_TASKS = ("dus_mc", "dus_corpus_ppl")
DEFAULT_MC_FILE = REPO_ROOT / "data" / "demo" / "mc_eval.jsonl"

# Metric names are shared with the model card and the sweep summary (pipeline.metric_names).
HELDOUT, SFT_HELDOUT, AVERAGE_KEY = M.HELDOUT, M.SFT_HELDOUT, M.HARNESS_AVERAGE
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"



# --------------------------------------------------------------------------- losses


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _summary(nll_sum: float, tokens: int) -> dict[str, float]:
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": tokens}


def scored_nll(logits: torch.Tensor, input_ids: torch.Tensor, *, bos_token_id: int | None) -> tuple[float, int]:
    """(sum, count) of the next-token NLL of a batch of windows: every token after the first of its
    window is predicted from the tokens before it, except a BOS target (formatting, not text). The one
    convention of every transformers perplexity here: the eval's held-out perplexity and the seam
    analysis's (pipeline.analysis), which differ only in the tokens and windows they are given."""
    pred = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.size(-1)), targets.reshape(-1), reduction="none")
    scored = (targets != bos_token_id).reshape(-1) if bos_token_id is not None else torch.ones_like(nll, dtype=torch.bool)
    return float(nll[scored].double().sum()), int(scored.sum())


def _token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """NLL of tokens 1..L-1 given their prefix, per position: shape (batch, L-1), float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def heldout_perplexity(
    model, tokenizer, texts: list[str], *, seq_len: int, batch_size: int, max_tokens: int = 0
) -> dict:
    """Per-token perplexity of held-out text records: ``{"loss", "perplexity", "tokens", "window"}``.

    Records are tokenized as cpt trains on them (``pipeline.data.tokenize_records``:
    ``[bos] + text + [eos]``), concatenated in the given order into one stream, and the stream
    (cut to its first ``max_tokens`` tokens when > 0) is cut into **non-overlapping** windows of
    ``seq_len`` tokens, the last one shorter. Each window is scored on its own: its first token is
    context only, every other token is predicted from the tokens before it in the same window, so
    tokens early in a window see little context and the number is somewhat higher than a
    sliding-window perplexity (cheaper, and the same for every stage). A record's leading BOS is
    never a target (it is formatting, not text; ``scored_nll``); EOS is. ``loss`` is the mean NLL in nats over the
    ``tokens`` predicted tokens, ``perplexity = exp(loss)``. Deterministic: no sampling, fixed order.
    """
    if seq_len < 2:
        raise ConfigError("eval.seq_len", f"must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError("eval.batch_size", f"must be >= 1, got {batch_size}")
    if not texts:
        raise ConfigError("eval", "no held-out text records to score", "set data.heldout_fraction > 0")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ConfigError("eval.seq_len", f"{seq_len} is longer than the model's {max_positions} positions",
                          f"set eval.seq_len <= {max_positions}")
    stream: list[int] = []
    for doc in tokenize_records(tokenizer, list(texts)):
        stream.extend(doc)
    if max_tokens > 0:
        stream = stream[:max_tokens]
    windows = [(lo, min(lo + seq_len, len(stream))) for lo in range(0, len(stream), seq_len)]
    windows = [(lo, hi) for lo, hi in windows if hi - lo >= 2]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            # Full windows in batches, then the shorter tail window alone: no padding anywhere.
            by_len: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for lo, hi in windows:
                by_len[hi - lo].append((lo, hi))
            for length in sorted(by_len, reverse=True):
                group = by_len[length]
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    ids = torch.tensor([stream[lo:hi] for lo, hi in chunk], device=device)
                    chunk_sum, chunk_tokens = scored_nll(model(input_ids=ids).logits, ids,
                                                         bos_token_id=tokenizer.bos_token_id)
                    nll_sum += chunk_sum
                    tokens += chunk_tokens
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("eval", "the held-out records hold no token to predict", "check data.heldout_fraction and the data")
    return {**_summary(nll_sum, tokens), "window": seq_len}


def assistant_token_loss(
    model, tokenizer, conversations: list[list[dict]], *, max_length: int, batch_size: int, max_examples: int = 0
) -> dict:
    """Mean NLL over the assistant tokens of conversations: ``{"loss", "perplexity", "tokens", ...}``.

    Each conversation gets the masks sft trains on (``pipeline.data.chat.assistant_token_mask``:
    any chat template, each mask verified) and is cut to its first ``max_length`` tokens (as sft
    truncates); only the assistant replies and their end-of-turn tokens count, predicted from
    everything before them. Loss is averaged over tokens (long replies weigh more), as sft's
    training loss is. The first ``max_examples`` conversations are used when > 0;
    ``examples`` counts those scored, ``skipped`` those with no assistant token left after
    truncation. Score every stage with the same tokenizer so the numbers compare.
    """
    if max_length < 2:
        raise ConfigError("sft.max_length", f"must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ConfigError("eval.batch_size", f"must be >= 1, got {batch_size}")
    convs = conversations[:max_examples] if max_examples > 0 else conversations
    examples: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for index, conv in enumerate(convs):
        ids, mask = assistant_token_mask(tokenizer, conv, max_length=max_length,
                                         where=f"eval: held-out sft conversation {index}")
        if not any(mask[1:]):
            skipped += 1
            continue
        examples.append((ids, mask))
    if not examples:
        raise ConfigError(
            "eval", f"none of the {len(convs)} held-out conversations has an assistant token within {max_length} tokens",
            "check the conversations and sft.max_length",
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = _model_device(model)
    # Longest first: similar lengths share a batch (less padding); the order does not change the sum.
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start : start + batch_size]]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                target = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (seq, amask) in enumerate(chunk):  # right padding: positions stay 0..n-1
                    ids[row, : len(seq)] = torch.tensor(seq)
                    attn[row, : len(seq)] = 1
                    target[row, : len(seq)] = torch.tensor(amask, dtype=torch.bool)
                nll = _token_nll(model, ids.to(device), attn.to(device))
                sel = target[:, 1:].to(device)
                nll_sum += float(nll[sel].double().sum())
                tokens += int(sel.sum())
    finally:
        model.train(was_training)
    return {**_summary(nll_sum, tokens), "examples": len(examples), "skipped": skipped}


def evaluate_model(
    model_dir: str,
    *,
    heldout_texts: Sequence[str] | None,
    heldout_conversations: Sequence[list[dict]] | None,
    seq_len: int,
    batch_size: int,
    max_heldout_tokens: int = 0,
    max_length: int = 1024,
    max_sft_examples: int = 0,
    chat_tokenizer_dir: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Load one stage's model and compute its flat ``heldout/*`` and ``sft_heldout/*`` metrics.

    ``chat_tokenizer_dir``: the tokenizer whose chat template formats the conversations (pass the
    sft stage's, so every stage is scored on the same token sequences); None = the model's own.
    fp32 on CPU, bf16 on a GPU that supports it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    metrics: dict[str, float] = {}
    if heldout_texts:
        out = heldout_perplexity(model, tokenizer, list(heldout_texts), seq_len=seq_len, batch_size=batch_size,
                                 max_tokens=max_heldout_tokens)
        metrics.update({f"{HELDOUT}/{k}": v for k, v in out.items()})
    if heldout_conversations:
        chat_tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir) if chat_tokenizer_dir else tokenizer
        out = assistant_token_loss(model, chat_tok, list(heldout_conversations), max_length=max_length,
                                   batch_size=batch_size, max_examples=max_sft_examples)
        metrics.update({f"{SFT_HELDOUT}/{k}": v for k, v in out.items()})
    del model
    return metrics


# --------------------------------------------------------------------------- lm-evaluation-harness


# --------------------------------------------------------------------------- results


# --------------------------------------------------------------------------- plots



"""Scoring GGUF files with llama.cpp on the same held-out tokens.

The reference is the unquantized GGUF (F32/BF16/F16, see ``convert.choose_reference_type``) run by
llama.cpp itself, so every rung is compared with the same runtime and kernels and only the weights
differ. Its next-token log-probabilities are written once to a memory-mapped scratch file
(positions x vocab, float32); each rung is then loaded alone, run window by window, and compared
with the stored rows, so memory holds one model and one window of logits at a time.

Metrics per rung, over every predicted position of every window: perplexity of the actual next
tokens, mean KL(reference || rung) of the full next-token distributions (and its 99th
percentile), and top-1 agreement (the rung's argmax equals the reference's).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.log import progress
from pipeline.quantize.install import import_llama_cpp

# Rows of logits turned into log-probs / KL at a time (float64): bounds the scratch memory.
ROWS_PER_STEP = 64


@dataclass(frozen=True)
class RungScore:
    perplexity: float
    mean_kld: float
    kld_p99: float
    top1_agreement: float
    positions: int
    score_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def build_windows(token_docs: list[list[int]], *, window: int, max_tokens: int) -> list[list[int]]:
    """Cut the concatenated documents into windows of ``window`` tokens, at most ``max_tokens`` in all.
    A last short piece is kept only when there is no full window at all."""
    stream = [t for doc in token_docs for t in doc]
    stream = stream[:max_tokens]
    windows = [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)]
    if not windows and len(stream) >= 2:
        windows = [stream]
    return windows


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - (m + np.log(np.exp(rows - m).sum(axis=-1, keepdims=True)))


class LlamaCppScorer:
    """One GGUF loaded with all-position logits; ``window_logits`` gives (len-1) x vocab rows."""

    def __init__(self, *, gguf_path: Path, window: int, n_threads: int | None, kv_cache_f32: bool = True):
        llama_cpp = import_llama_cpp()
        self._llama_cpp = llama_cpp
        # llama.cpp keeps K and V in F16 by default; F32 here so that the only difference between
        # the reference and a rung is the weights (the F32 reference then matches transformers).
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_cache_f32 else {}
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=window, n_batch=window, n_ubatch=window,
                                   logits_all=True, n_threads=n_threads, n_threads_batch=n_threads, verbose=False, **kv)
        self.n_vocab = self.llm.n_vocab()

    def window_logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()  # n_past = 0: eval() clears the KV cache from there
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens) - 1, : self.n_vocab], dtype=np.float32)

    def model_size_and_params(self) -> tuple[int, int]:
        lib = self._llama_cpp
        return int(lib.llama_model_size(self.llm.model)), int(lib.llama_model_n_params(self.llm.model))

    def close(self) -> None:
        self.llm.close()


@dataclass
class ReferenceRun:
    logprobs: np.memmap        # positions x vocab, float32
    targets: np.ndarray        # positions: the actual next token
    score: RungScore
    model_bytes: int
    model_params: int


def score_reference(*, gguf_path: Path, windows: list[list[int]], scratch: Path, n_threads: int | None,
                    desc: str = "reference") -> ReferenceRun:
    window = max(len(w) for w in windows)
    positions = sum(len(w) - 1 for w in windows)
    scorer = LlamaCppScorer(gguf_path=gguf_path, window=window, n_threads=n_threads)
    try:
        vocab = scorer.n_vocab
        logprobs = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(positions, vocab))
        targets = np.empty(positions, dtype=np.int64)
        nll = np.empty(positions, dtype=np.float64)
        start, row = time.perf_counter(), 0
        for w in progress(windows, desc=desc, unit="window", leave=False):
            logits = scorer.window_logits(w)
            tgt = np.asarray(w[1:], dtype=np.int64)
            for a in range(0, len(tgt), ROWS_PER_STEP):
                lp = _log_softmax(logits[a:a + ROWS_PER_STEP])
                n = lp.shape[0]
                logprobs[row:row + n] = lp
                targets[row:row + n] = tgt[a:a + n]
                nll[row:row + n] = -lp[np.arange(n), tgt[a:a + n]]
                row += n
        logprobs.flush()
        size, params = scorer.model_size_and_params()
    finally:
        scorer.close()
    score = RungScore(perplexity=float(math.exp(nll.mean())), mean_kld=0.0, kld_p99=0.0, top1_agreement=1.0,
                      positions=positions, score_s=time.perf_counter() - start)
    return ReferenceRun(logprobs=logprobs, targets=targets, score=score, model_bytes=size, model_params=params)


def compare_logprobs(ref_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(KL(ref || q) per row, argmax agreement per row, NLL of the targets under q)."""
    ref_lp = ref_lp.astype(np.float64)
    kld = (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)
    agree = ref_lp.argmax(axis=-1) == lp.argmax(axis=-1)
    nll = -lp[np.arange(lp.shape[0]), targets]
    return kld, agree, nll


def score_against_reference(*, gguf_path: Path, windows: list[list[int]], reference: ReferenceRun,
                            n_threads: int | None, desc: str) -> tuple[RungScore, int, int]:
    """Score one rung; returns (score, llama.cpp model size in bytes, parameter count)."""
    window = max(len(w) for w in windows)
    scorer = LlamaCppScorer(gguf_path=gguf_path, window=window, n_threads=n_threads)
    try:
        positions = reference.targets.size
        kld = np.empty(positions, dtype=np.float64)
        agree = np.empty(positions, dtype=bool)
        nll = np.empty(positions, dtype=np.float64)
        start, row = time.perf_counter(), 0
        for w in progress(windows, desc=desc, unit="window", leave=False):
            logits = scorer.window_logits(w)
            for a in range(0, logits.shape[0], ROWS_PER_STEP):
                lp = _log_softmax(logits[a:a + ROWS_PER_STEP])
                n = lp.shape[0]
                k, g, l = compare_logprobs(reference.logprobs[row:row + n], lp, reference.targets[row:row + n])
                kld[row:row + n], agree[row:row + n], nll[row:row + n] = k, g, l
                row += n
        size, params = scorer.model_size_and_params()
    finally:
        scorer.close()
    # Tiny negative values are float rounding of a zero divergence.
    kld = np.maximum(kld, 0.0)
    return RungScore(perplexity=float(math.exp(nll.mean())), mean_kld=float(kld.mean()),
                     kld_p99=float(np.percentile(kld, 99)), top1_agreement=float(agree.mean()),
                     positions=positions, score_s=time.perf_counter() - start), size, params


def compare_reference_with_transformers(*, model_dir: Path, window: list[int], reference: ReferenceRun) -> dict:
    """KL and top-1 of the llama.cpp reference against transformers itself on the first window:
    the evidence that the conversion (not only the quantization) kept the model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=False)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([window])).logits[0, :-1].float().numpy()
    del model
    lp = _log_softmax(logits)
    n = lp.shape[0]
    kld, agree, _ = compare_logprobs(reference.logprobs[:n], lp, reference.targets[:n])
    return {"positions": int(n), "mean_kld": float(max(kld.mean(), 0.0)), "top1_agreement": float(agree.mean()),
            "max_abs_logprob_diff": float(np.abs(reference.logprobs[:n].astype(np.float64) - lp).max())}

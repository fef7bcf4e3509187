"""Held-out preference accuracy and reward margin of a DPO-trained policy.

DPO's implicit reward of a reply y to a prompt x is ``beta * (log pi(y|x) - log pi_ref(y|x))``
(Rafailov et al. 2023, eq. 5), with log pi(y|x) the *sum* of the reply's token log-probabilities.
A pair is ranked right when the chosen reply's reward is strictly above the rejected one's;
preference accuracy is the share of pairs ranked right, the margin the mean of
``reward(chosen) - reward(rejected)``. These are the numbers TRL logs as ``rewards/accuracies`` and
``rewards/margins``, computed here the same way (same tokenization, same truncation) on pairs
that training never saw.

For a model scored against itself (the sft model with the sft model as reference) every reward is
0 by construction, so the reward metrics are undefined, not measured: they are None here and
"n/a (reference = itself)" in the tables (a 0 would read as the worst possible accuracy, beside
dpo's measured one). ``logprob_accuracy`` (chosen more likely than rejected under the policy
alone, no reference) compares any two models, sft and dpo alike. It favours short replies, since
log-probs are sums. Chance for both accuracies is 0.5 (``PREFERENCE_CHANCE``).

Tokenization mirrors ``trl.DPOTrainer`` 1.16: the prompt is rendered with the chat template and
``add_generation_prompt=True``, prompt + reply without it; the reply starts where the two token
sequences diverge (the shorter common prefix of the chosen and the rejected sequence), and
``prompt + reply`` is cut to ``max_length`` from the end (``truncation_mode="keep_start"``). Pairs
whose prompt alone fills ``max_length`` are skipped and counted, as TRL drops them from training.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.data.preference import TokenizedPair, pair_source, tokenize_pair
from pipeline.errors import ConfigError


# Accuracy of a coin flip on pairs: the line both preference accuracies are read against.
PREFERENCE_CHANCE = {"preference/reward_accuracy": 0.5, "preference/logprob_accuracy": 0.5}
# In a results row: the reward metrics are undefined because the policy is its own reference.
REFERENCE_IS_POLICY = "preference/reference_is_policy"


@dataclass(frozen=True)
class PreferenceEval:
    pairs: int  # pairs scored
    skipped_prompt_too_long: int
    beta: float
    # The reward metrics: None when the policy is its own reference (every reward 0 by construction).
    reward_accuracy: float | None  # share of pairs with reward(chosen) > reward(rejected)
    reward_ties: float | None  # share with equal rewards
    mean_reward_margin: float | None
    mean_chosen_reward: float | None
    mean_rejected_reward: float | None
    logprob_accuracy: float  # share with log pi(chosen) > log pi(rejected), reference-free
    mean_logprob_margin: float
    reference_is_policy: bool = False

    def metrics(self, prefix: str = "preference/") -> dict[str, float | None]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    def table_metrics(self, prefix: str = "preference/") -> dict[str, float | None]:
        """The few worth a column in a results table (counts end in /examples and /skipped, which
        tables list but do not plot); with ``REFERENCE_IS_POLICY`` set when the reward columns are
        undefined."""
        out = {f"{prefix}reward_accuracy": self.reward_accuracy, f"{prefix}reward_margin": self.mean_reward_margin,
               f"{prefix}logprob_accuracy": self.logprob_accuracy, f"{prefix}examples": self.pairs,
               f"{prefix}skipped": self.skipped_prompt_too_long}
        if self.reference_is_policy:
            out[REFERENCE_IS_POLICY] = True
        return out


@torch.no_grad()
def _sum_logprobs(model, sequences: list[tuple[list[int], int]], *, pad_id: int, batch_size: int) -> list[float]:
    """Sum of log p(token) over each sequence's tokens from position ``start`` on (the reply)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for b in range(0, len(sequences), batch_size):
        chunk = sequences[b : b + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        reply = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (ids, start) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            reply[i, start : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:].to(device)
        # log_softmax gathered at the targets; the token at position t is predicted by logits at t-1.
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        token_logps = token_logps * reply[:, 1:].to(device)
        out.extend(token_logps.sum(dim=1).tolist())
    return out


def reply_logprobs(model, tokenizer, tokenized: list[TokenizedPair], *, max_length: int | None,
                   batch_size: int = 8) -> tuple[list[float], list[float]]:
    """(chosen, rejected) summed reply log-probs for already tokenized pairs, truncated like TRL."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = []
    for side in ("chosen_ids", "rejected_ids"):
        for t in tokenized:
            ids = t.prompt_ids + getattr(t, side)
            sequences.append((ids[:max_length] if max_length else ids, len(t.prompt_ids)))
    logps = _sum_logprobs(model, sequences, pad_id=pad, batch_size=batch_size)
    return logps[: len(tokenized)], logps[len(tokenized) :]


def preference_metrics(*, policy_chosen: list[float], policy_rejected: list[float], ref_chosen: list[float],
                       ref_rejected: list[float], beta: float, skipped: int = 0,
                       reference_is_policy: bool = False) -> PreferenceEval:
    """Accuracy and margins from summed reply log-probs of the policy and the reference (the reward
    metrics None when the reference is the policy itself)."""
    n = len(policy_chosen)
    if n == 0:
        raise ConfigError("preference eval", "no pair to score", "give held-out pairs whose prompt fits max_length")
    chosen_r = [beta * (p - r) for p, r in zip(policy_chosen, ref_chosen)]
    rejected_r = [beta * (p - r) for p, r in zip(policy_rejected, ref_rejected)]
    margins = [c - r for c, r in zip(chosen_r, rejected_r)]
    lp_margins = [c - r for c, r in zip(policy_chosen, policy_rejected)]
    if reference_is_policy:
        return PreferenceEval(
            pairs=n, skipped_prompt_too_long=skipped, beta=beta, reward_accuracy=None, reward_ties=None,
            mean_reward_margin=None, mean_chosen_reward=None, mean_rejected_reward=None,
            logprob_accuracy=sum(m > 0 for m in lp_margins) / n, mean_logprob_margin=sum(lp_margins) / n,
            reference_is_policy=True)
    return PreferenceEval(
        pairs=n, skipped_prompt_too_long=skipped, beta=beta,
        reward_accuracy=sum(m > 0 for m in margins) / n,
        reward_ties=sum(m == 0 for m in margins) / n,
        mean_reward_margin=sum(margins) / n,
        mean_chosen_reward=sum(chosen_r) / n,
        mean_rejected_reward=sum(rejected_r) / n,
        logprob_accuracy=sum(m > 0 for m in lp_margins) / n,
        mean_logprob_margin=sum(lp_margins) / n,
    )


def _load_for_scoring(model_dir: str, *, bf16: bool, attn: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=attn,
        trust_remote_code=trust_remote_code, use_safetensors=True,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def evaluate_preferences(*, policy_dir: str | Path, reference_dir: str | Path, pairs: list[dict], beta: float,
                         max_length: int | None = 1024, batch_size: int = 8, bf16: bool = False,
                         attn: str = "sdpa", trust_remote_code: bool = False) -> PreferenceEval:
    """Score ``pairs`` (``pipeline.data.preference`` shape) with the policy against the reference.

    The tokenizer is the policy's. One model is in memory at a time (a 10.7B policy and its
    reference do not both need to fit); when both directories are the same it is loaded once.
    """
    if beta <= 0:
        raise ConfigError("dpo.beta", f"must be > 0, got {beta}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir), trust_remote_code=trust_remote_code)
    # dpo's own split (sft's encoder; a pair whose prompt is not a prefix of prompt + reply refused).
    tokenized_all = [tokenize_pair(tokenizer, p, where=pair_source(p, f"held-out pair {i}")) for i, p in enumerate(pairs)]
    tokenized = [t for t in tokenized_all if max_length is None or len(t.prompt_ids) < max_length]
    skipped = len(tokenized_all) - len(tokenized)

    def score(model_dir) -> tuple[list[float], list[float]]:
        model = _load_for_scoring(str(model_dir), bf16=bf16, attn=attn, trust_remote_code=trust_remote_code)
        try:
            return reply_logprobs(model, tokenizer, tokenized, max_length=max_length, batch_size=batch_size)
        finally:
            del model
            gc.collect()

    policy = score(policy_dir)
    same = Path(policy_dir).resolve() == Path(reference_dir).resolve()
    reference = policy if same else score(reference_dir)
    result = preference_metrics(policy_chosen=policy[0], policy_rejected=policy[1], ref_chosen=reference[0],
                                ref_rejected=reference[1], beta=beta, skipped=skipped, reference_is_policy=same)
    if not all(math.isfinite(v) for v in (*policy[0], *policy[1], *reference[0], *reference[1])):
        raise ConfigError("preference eval", f"non-finite log-probs scoring {policy_dir}",
                          "check the model's weights (a NaN in training?)")
    return result

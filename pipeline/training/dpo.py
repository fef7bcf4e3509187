"""DPO alignment with TRL 1.16's ``DPOTrainer``: settings checked before any model is loaded, the
trainer built from preference pairs, and a record of which pairs each rank trained on.

What TRL 1.16 offers and how this module maps the pipeline's settings onto it (read from
``trl/trainer/dpo_config.py`` and ``dpo_trainer.py`` 1.16.0, and run on CPU):

* ``beta`` (default 0.1), ``max_length`` (prompt + reply, cut from the end: ``keep_start``; pairs
  whose prompt alone fills it are dropped by TRL), ``precompute_ref_log_probs``.
* ``loss_type`` is a *list* in 1.16 (``LOSS_TYPES``), combined with ``loss_weights``.
* There is no ``rpo_alpha`` any more: RPO (Pang et al. 2024: DPO + alpha x NLL of the chosen reply)
  is ``loss_type=[<loss>, "sft"]`` with ``loss_weights=[1.0, alpha]``; TRL's ``sft`` term is the
  mean token NLL of the chosen replies, as in the paper. ``rpo_alpha`` here builds exactly that.
* There is no ``max_prompt_length`` any more. Here it drops (and counts) pairs whose chat-rendered
  prompt is longer: cutting a chat prompt's tokens would cut its template (bos, role markers).
* ``ref_model=None``: full fine-tuning loads a second copy of the policy *from its path* as the
  reference (``model.config._name_or_path``); LoRA uses the policy with adapters disabled;
  ``precompute_ref_log_probs=True`` scores every pair with the initial policy before the first
  step and keeps no reference model. Here a full fine-tune gets its reference loaded explicitly
  with the same safetensors-only loader as the policy.
* TRL renders every pair with the chat template itself; here pairs are tokenized by
  ``pipeline.data.preference.tokenize_pair`` (sft's encoder: mistral-common for Mistral; a pair whose
  prompt ids are not a prefix of prompt + reply refused) and a ``DPOTrainer`` subclass takes the ids.
* ``DPOConfig`` defaults to ``bf16=True`` and gradient checkpointing, like ``SFTConfig``: callers
  pass both explicitly (``bf16=False`` on CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import LoraSettings
from pipeline.data.preference import TokenizedPair, pair_source, tokenize_pair
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_output_dir, atomic_write_json, hash_text
from pipeline.training.callbacks import RecordingCollator
from pipeline.training.model import lora_config, weights_dtype
from pipeline.training.verify import padded_batch

# trl 1.16 DPOConfig.loss_type values (dpo_config.py docstring and the dispatch in DPOTrainer._compute_loss).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOSettings(LoraSettings):
    """The DPO-specific settings (the Trainer's shared ones stay with the caller)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_length: int = 1024
    # Pairs whose rendered prompt has more tokens are dropped before training (None: keep all).
    max_prompt_length: int | None = None
    # RPO: add rpo_alpha x NLL of the chosen reply (None: plain DPO). The RPO paper uses 1.0.
    rpo_alpha: float | None = None
    precompute_ref_log_probs: bool = False
    extra_trl_args: dict[str, Any] = field(default_factory=dict)


def validate_dpo_settings(s: DPOSettings, *, where: str = "dpo") -> None:
    """Bad settings as ConfigErrors, before a model or dataset is touched."""
    if not (isinstance(s.beta, (int, float)) and s.beta > 0):
        raise ConfigError(f"{where}.beta", f"must be > 0, got {s.beta}",
                          "beta scales the implicit reward; 0.1 is the usual start (0.01-0.5)")
    if s.loss_type not in LOSS_TYPES or s.loss_type == "sft":
        raise ConfigError(f"{where}.loss_type", f"'{s.loss_type}' is not a preference loss of TRL 1.16",
                          f"use one of {', '.join(t for t in LOSS_TYPES if t != 'sft')} (RPO: set {where}.rpo_alpha)")
    if s.max_length is None or s.max_length < 2:
        raise ConfigError(f"{where}.max_length", f"must be >= 2, got {s.max_length}")
    if s.max_prompt_length is not None and not (0 < s.max_prompt_length < s.max_length):
        raise ConfigError(f"{where}.max_prompt_length", f"must be in (0, max_length={s.max_length}), got {s.max_prompt_length}",
                          "leave it null to keep every pair whose prompt fits max_length")
    if s.rpo_alpha is not None and not s.rpo_alpha > 0:
        raise ConfigError(f"{where}.rpo_alpha", f"must be > 0 or null, got {s.rpo_alpha}", "null is plain DPO; RPO uses 1.0")


def trl_loss_arguments(s: DPOSettings) -> dict[str, Any]:
    """``loss_type`` / ``loss_weights`` for trl.DPOConfig (RPO as an extra ``sft`` term)."""
    if s.rpo_alpha is None:
        return {"loss_type": [s.loss_type], "loss_weights": None}
    return {"loss_type": [s.loss_type, "sft"], "loss_weights": [1.0, float(s.rpo_alpha)]}


def tokenize_pairs(tokenizer, pairs: list[dict], *, max_prompt_length: int | None) -> tuple[list[TokenizedPair], int]:
    """Every pair split into prompt / chosen / rejected ids by ``tokenize_pair`` (sft's encoder; a pair
    whose prompt ids are not a prefix of prompt + reply is refused, naming its file and row), the
    ones whose prompt fits ``max_prompt_length``; and how many did not fit."""
    tokenized = [tokenize_pair(tokenizer, p, where=pair_source(p, f"training pair {i}")) for i, p in enumerate(pairs)]
    if max_prompt_length is None:
        return tokenized, 0
    kept = [t for t in tokenized if len(t.prompt_ids) <= max_prompt_length]
    return kept, len(tokenized) - len(kept)


def pretokenized_dpo_trainer_class():
    """``trl.DPOTrainer`` taking rows already split by ``tokenize_pair`` (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``) instead of rendering them with the chat template itself: TRL
    1.16 always renders, which for Mistral goes through the Hub template (system prompt dropped, the
    split moved into the user turn). TRL's own drop of pairs whose prompt alone fills ``max_length``
    (no reply token would be left) is kept."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names or ())
            if missing:
                raise ConfigError(f"dpo {dataset_name} dataset", f"lacks the columns {sorted(missing)}",
                                  "pass pairs through pipeline.training.dpo.tokenize_pairs")
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    return PretokenizedDPOTrainer


def pair_token_ids(example) -> list[int]:
    """A pair is identified by its prompt and chosen reply."""
    return list(example["prompt_ids"]) + list(example["chosen_ids"])


class RecordingPreferenceCollator(RecordingCollator):
    """DPO's collator, remembering a fingerprint of each pair (prompt + chosen token ids) this rank
    trained on: the proof that ranks are distinct and see different pairs."""

    def __init__(self, collate, keep_first: int = 256):
        super().__init__(collate, keep_first, token_ids=pair_token_ids)


def load_policy(model_dir: str, *, bf16: bool, attn: str, trust_remote_code: bool = False):
    """A model for DPO (policy or reference): safetensors only, no KV cache in training."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(bf16),
                                                 attn_implementation=attn, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    model.config.use_cache = False
    return model


def pairs_dataset(pairs: list[dict], *, shared_dir: Path | None):
    """The pairs as a ``datasets.Dataset``; on several ranks, saved once under ``shared_dir`` and
    memory-mapped by every rank.

    Why: ``precompute_ref_log_probs`` makes rank 0 write the reference log-probs to a cache file
    next to the dataset's own files, which the other ranks then open. An in-memory dataset
    (``Dataset.from_list``) has no files, so each rank picks its *own* temporary directory and
    rank 1 fails with ``FileNotFoundError: .../hf_datasets-XXXX/cache-....arrow`` (seen with TRL
    1.16 under 2-process ZeRO-3). ``shared_dir`` must be on storage every rank sees (the stage's
    checkpoint directory is)."""
    import datasets
    from accelerate import PartialState

    ds = datasets.Dataset.from_list(pairs)
    state = PartialState()
    if shared_dir is None or state.num_processes == 1:
        return ds
    target = Path(shared_dir) / hash_text(json.dumps(pairs, sort_keys=True))[:16]
    if state.is_main_process and not target.exists():
        with atomic_output_dir(target) as tmp:
            ds.save_to_disk(str(tmp))
    state.wait_for_everyone()
    return datasets.load_from_disk(str(target))


def build_dpo_trainer(*, model_dir: str, tokenizer, train_pairs: list[dict], settings: DPOSettings,
                      trainer_args: dict[str, Any], bf16: bool, attn: str = "sdpa", eval_pairs: list[dict] | None = None,
                      shared_dataset_dir: Path | None = None, trust_remote_code: bool = False):
    """A ``trl.DPOTrainer`` for ``train_pairs`` (``pipeline.data.preference`` shape), its recording
    collator and data stats. ``trainer_args`` are TrainingArguments keywords (output_dir, steps,
    batch size, ``deepspeed``/``accelerator_config`` under DeepSpeed, ...); the DPO ones come from
    ``settings``. The reference is the initial policy (see the module doc). Under several ranks,
    ``shared_dataset_dir`` (storage all ranks see) is needed with ``precompute_ref_log_probs``
    (see ``pairs_dataset``)."""
    from trl import DPOConfig as TrlDPOConfig

    validate_dpo_settings(settings)
    # Every pair tokenized (and a bad one refused) before a model is loaded.
    pairs, dropped = tokenize_pairs(tokenizer, train_pairs, max_prompt_length=settings.max_prompt_length)
    eval_rows = tokenize_pairs(tokenizer, eval_pairs, max_prompt_length=None)[0] if eval_pairs else []
    if not pairs:
        raise ConfigError("dpo.max_prompt_length", f"drops all {len(train_pairs)} training pairs",
                          "raise it (or dpo.max_length), or leave it null")
    args = TrlDPOConfig(**{
        # TRL's own defaults (bf16, gradient checkpointing on) are not what a CPU run or our callers want.
        "gradient_checkpointing": False, "report_to": [], "remove_unused_columns": True,
        **trainer_args,
        "bf16": bf16,
        "beta": float(settings.beta),
        "max_length": settings.max_length,
        "precompute_ref_log_probs": settings.precompute_ref_log_probs,
        "dataset_num_proc": None,
        **trl_loss_arguments(settings),
        **settings.extra_trl_args,
    })
    model = load_policy(model_dir, bf16=bf16, attn=attn, trust_remote_code=trust_remote_code)
    ref_model, peft_config = None, lora_config(settings)
    if peft_config is None and not settings.precompute_ref_log_probs:
        ref_model = load_policy(model_dir, bf16=bf16, attn=attn, trust_remote_code=trust_remote_code)
    trainer = pretokenized_dpo_trainer_class()(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=pairs_dataset([t.as_row() for t in pairs],
                                    shared_dir=shared_dataset_dir and Path(shared_dataset_dir) / "train"),
        eval_dataset=pairs_dataset([t.as_row() for t in eval_rows],
                                   shared_dir=shared_dataset_dir and Path(shared_dataset_dir) / "eval")
        if eval_rows else None,
    )
    collator = RecordingPreferenceCollator(trainer.data_collator)
    trainer.data_collator = collator
    stats = {"train_pairs": len(trainer.train_dataset), "dropped_prompt_too_long": dropped,
             # TRL drops pairs whose prompt alone fills max_length (no reply token would be left).
             "dropped_by_trl_max_length": len(pairs) - len(trainer.train_dataset)}
    return trainer, collator, stats


def preference_fixed_batch(tokenizer, pairs: list[dict], *, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids/attention_mask/labels of a few pairs' chosen conversations, labels on the reply only:
    a fixed batch whose loss checks that a saved DPO model is the trained one (the hand-off check)."""
    rows = []
    for i, p in enumerate(pairs):
        t = tokenize_pair(tokenizer, p, where=pair_source(p, f"fixed-batch pair {i}"))
        ids = (t.prompt_ids + t.chosen_ids)[:max_length]
        rows.append((ids, [-100] * len(t.prompt_ids[:max_length]) + ids[len(t.prompt_ids):]))
    return padded_batch(tokenizer, rows)


def write_rank_record(path: Path, *, rank: int, world_size: int, served: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"rank": rank, "world_size": world_size, "served": served})

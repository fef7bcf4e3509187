"""The dpo stage: alignment with TRL's DPOTrainer after sft (SOLAR 10.7B-Instruct's last step),
full or LoRA (``dpo=lora``; the adapter is merged into the saved weights when the export is verified).

Input model: the previous model stage's (sft when it ran), found through the manifests like every
stage. Reference: that same model, as TRL's ``ref_model`` (a second copy, sharded too under
ZeRO-3), or, with ``dpo.precompute_ref_log_probs``, its log-probs computed once before training and
no reference kept; with LoRA the input model with the adapter switched off. Pairs from
``data.dpo_files`` (``pipeline.data.preference``); held out like sft holds out conversations.

The library parts are ``pipeline.training.dpo`` (trainer) and ``pipeline.evaluation.preference``
(held-out preference accuracy and margin, added to the eval table for sft and dpo). Config group
``conf/dpo/``; docs/dpo.md; tests: tests/test_dpo.py, tests/test_preference_data.py,
tests/test_dpo_stage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import PipelineConfig
from pipeline.data import is_hub_dataset_name, require_hub_access
from pipeline.data.preference import check_preference_files, load_preferences, split_preferences
from pipeline.errors import ConfigError
from pipeline.evaluation.preference import evaluate_preferences
from pipeline.stages.stage import TrainerSetup, TrainingStage
from pipeline.training.dpo import DPOSettings, build_dpo_trainer, preference_fixed_batch, validate_dpo_settings
from pipeline.training.model import trainer_kwargs

FIXED_BATCH_PAIRS = 4
# Preflight reads this many rows of each local file (every row is checked again when the stage loads them).
PREFLIGHT_ROWS = 10_000


def dpo_settings(cfg: PipelineConfig) -> DPOSettings:
    dc = cfg.dpo
    return DPOSettings(beta=dc.beta, loss_type=dc.loss_type, max_length=dc.max_length,
                       max_prompt_length=dc.max_prompt_length, rpo_alpha=dc.rpo_alpha,
                       precompute_ref_log_probs=dc.precompute_ref_log_probs, use_lora=dc.use_lora, lora_r=dc.lora_r,
                       lora_alpha=dc.lora_alpha, lora_dropout=dc.lora_dropout,
                       lora_target_modules=dc.lora_target_modules)


def load_dpo_split(cfg: PipelineConfig):
    """(train, heldout) preference pairs of ``data.dpo_files``."""
    pairs = load_preferences(list(cfg.data.dpo_files), dpo_format=cfg.data.dpo_format)
    return split_preferences(pairs, cfg.data.heldout_fraction)


def build_dpo_stage_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir: Path,
                            ds_config: Optional[dict], bf16: bool, attn: str) -> TrainerSetup:
    dc = cfg.dpo
    split = load_dpo_split(cfg)
    if not split.train:
        raise ConfigError("data.dpo_files", f"all {len(split.heldout)} pairs are held out (data.heldout_fraction "
                          f"{cfg.data.heldout_fraction})", "add pairs or lower data.heldout_fraction")
    kwargs = trainer_kwargs(dc, output_dir=checkpoint_dir, ds_config=ds_config, bf16=bf16)
    # TRL keeps only its tokenized columns (prompt_ids, chosen_ids, rejected_ids, ref_*_logps).
    kwargs["remove_unused_columns"] = True
    trainer, collator, stats = build_dpo_trainer(
        model_dir=input_model, tokenizer=tokenizer, train_pairs=split.train, settings=dpo_settings(cfg),
        trainer_args=kwargs, bf16=bf16, attn=attn, trust_remote_code=cfg.model.trust_remote_code,
        # On several ranks the pairs live on disk where every rank sees them (see pairs_dataset).
        shared_dataset_dir=checkpoint_dir / "pairs",
    )
    # The hand-off check: a fixed batch of chosen conversations (loss on the replies), before/after reload.
    fixed_batch = preference_fixed_batch(tokenizer, (split.heldout or split.train)[:FIXED_BATCH_PAIRS],
                                         max_length=dc.max_length)
    return TrainerSetup(trainer=trainer, collator=collator, fixed_batch=fixed_batch,
                        data_stats={**stats, "heldout_pairs": len(split.heldout)},
                        seq_len=dc.max_length, saves_adapter=dc.use_lora)


def check_dpo_config(cfg: PipelineConfig) -> None:
    """Settings and preference files, before any stage runs."""
    validate_dpo_settings(dpo_settings(cfg))
    if not cfg.data.dpo_files:
        raise ConfigError("data.dpo_files", "is empty while dpo.enabled is true",
                          "list preference files (e.g. data/demo/preferences.jsonl) or set dpo.enabled=false")
    local = []
    for name in cfg.data.dpo_files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field="data.dpo_files")
        else:
            local.append(name)
    if local:
        check_preference_files(local, dpo_format=cfg.data.dpo_format, max_rows=PREFLIGHT_ROWS)


def preference_results(cfg: PipelineConfig, models: dict) -> dict[str, dict[str, float]]:
    """Held-out preference metrics for the sft and dpo models of ``models`` ({stage: (dir, manifest)}).

    The reference is the model dpo started from (its manifest's model input), else sft's: so sft's
    row has zero rewards and a logprob accuracy, dpo's the DPO implicit-reward accuracy and margin."""
    if not (cfg.dpo.enabled and cfg.data.dpo_files):
        return {}
    scored = [s for s in ("sft", "dpo") if s in models]
    reference = next((i.path for i in models["dpo"][1].inputs if i.role == "model"), None) if "dpo" in models else None
    reference = reference or (models["sft"][0] if "sft" in models else None)
    heldout = load_dpo_split(cfg).heldout
    if not scored or reference is None or not heldout:
        return {}
    return {s: evaluate_preferences(policy_dir=models[s][0], reference_dir=reference, pairs=heldout, beta=cfg.dpo.beta,
                                    max_length=cfg.dpo.max_length, batch_size=cfg.eval.batch_size,
                                    trust_remote_code=cfg.model.trust_remote_code).table_metrics()
            for s in scored}


class DPOStage(TrainingStage):
    name = "dpo"
    reads_preference_data = True

    def data_files(self, cfg: PipelineConfig) -> list[str]:
        return list(cfg.data.dpo_files)

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        check_dpo_config(cfg)

    build_trainer = staticmethod(build_dpo_stage_trainer)

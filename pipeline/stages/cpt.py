"""The cpt stage: continued pretraining heals the seam of the merged model on raw text.

Blocks of ``cpt.seq_len`` tokens packed from the corpus records (no attention across documents),
from the on-disk tokenized cache (filled once in the driver before the ranks start) or streamed.
Trained on every rank under ``accelerate launch`` (DeepSpeed ZeRO from ``cfg.distributed``) by
``pipeline.training.runner``; config group ``conf/cpt/``; tests: tests/test_cpt_data.py,
tests/test_train.py, tests/test_pipeline.py.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.data.cpt_cache import BLOCK_COLUMNS, CPTData, cpt_sources, prepare_cpt_data, prepare_streaming_cpt_data
from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest, stage_dir
from pipeline.stages.stage import TrainerSetup, TrainingStage
from pipeline.training.callbacks import EvaluateAtLastStep, RecordingCollator
from pipeline.training.model import freeze_except, layers_added_by_merge, load_model_for_training, trainer_kwargs

FIXED_BATCH_BLOCKS = 4


def build_cpt_data(cfg: PipelineConfig, tokenizer, *, announce_hit: bool = True) -> CPTData:
    if cfg.data.streaming:
        return prepare_streaming_cpt_data(cfg, tokenizer)
    return prepare_cpt_data(cfg, tokenizer, announce_hit=announce_hit)


def first_blocks(blocks, n: int) -> dict[str, list[list[int]]]:
    rows = blocks.with_format(None)[:n]
    return {k: rows[k] for k in BLOCK_COLUMNS}


def trainable_layers(cfg: PipelineConfig) -> list[int] | None:
    layers = None if cfg.cpt.trainable_layers is None else list(cfg.cpt.trainable_layers)
    if cfg.cpt.trainable_from_merge is not None:
        if cfg.cpt.trainable_from_merge != "added":
            raise ConfigError("cpt.trainable_from_merge", f"unknown value '{cfg.cpt.trainable_from_merge}'", "use added or null")
        merge = read_manifest(stage_dir(cfg.paths.run_dir, "merge"))
        if merge is None:
            raise ConfigError("cpt.trainable_from_merge", "needs the merge stage's manifest in this run directory")
        layers = sorted(set(layers or []) | set(layers_added_by_merge(merge.metrics)))
    return layers


def build_cpt_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir,
                      ds_config: dict | None, bf16: bool, attn: str) -> TrainerSetup:
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments, default_data_collator

    data = build_cpt_data(cfg, tokenizer, announce_hit=PartialState().is_main_process)
    if data.heldout is not None:
        fixed_batch = first_blocks(data.heldout, FIXED_BATCH_BLOCKS)
    elif not cfg.data.streaming:
        fixed_batch = first_blocks(data.train, FIXED_BATCH_BLOCKS)
    else:
        raise ConfigError("data.heldout_fraction", "is 0 with data.streaming=true: no fixed batch to verify the export on",
                          "set data.heldout_fraction > 0 (e.g. 0.01)")
    data_stats = data.stats
    kwargs = trainer_kwargs(cfg.cpt, output_dir=checkpoint_dir, ds_config=ds_config, bf16=bf16)
    if cfg.data.streaming:
        # Every rank reads the stream and keeps its own share of each step's batches (accelerate's
        # IterableDatasetShard) instead of rank 0 reading for all and sending batches out: reading
        # and tokenizing cost far less than a training step, and each rank's data is its own.
        kwargs["accelerator_config"] = {"dispatch_batches": False}
    eval_dataset = None
    if cfg.cpt.eval_every_tokens > 0:
        if data.heldout is None:
            raise ConfigError("cpt.eval_every_tokens", "needs a held-out split to evaluate on",
                              "set data.heldout_fraction > 0, or cpt.eval_every_tokens=0")
        tokens_per_step = (cfg.cpt.per_device_train_batch_size * cfg.cpt.gradient_accumulation_steps
                           * PartialState().num_processes * cfg.cpt.seq_len)
        kwargs.update(eval_strategy="steps", eval_steps=max(1, round(cfg.cpt.eval_every_tokens / tokens_per_step)),
                      per_device_eval_batch_size=cfg.cpt.per_device_train_batch_size)
        # The same first blocks at every point of the curve, capped like the eval stage's held-out ppl.
        cap = -(-cfg.eval.max_heldout_tokens // cfg.cpt.seq_len) if cfg.eval.max_heldout_tokens > 0 else len(data.heldout)
        eval_dataset = data.heldout.select(range(min(cap, len(data.heldout))))
    args = TrainingArguments(**kwargs)
    model = load_model_for_training(input_model, bf16=bf16, attn=attn, trust_remote_code=cfg.model.trust_remote_code,
                           allow_pickle=cfg.model.allow_pickle)
    freeze_except(model, layers=trainable_layers(cfg), patterns=list(cfg.cpt.trainable_patterns))
    collator = RecordingCollator(default_data_collator)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=eval_dataset,
                      data_collator=collator, processing_class=tokenizer)
    if eval_dataset is not None:
        # The curve ends where training ends, whether or not the last step is a multiple of eval_steps.
        trainer.add_callback(EvaluateAtLastStep())
    return TrainerSetup(trainer=trainer, collator=collator, fixed_batch=fixed_batch, data_stats=data_stats,
                        seq_len=cfg.cpt.seq_len)


class CPTStage(TrainingStage):
    name = "cpt"

    def data_files(self, cfg: PipelineConfig) -> list[str]:
        return list(cfg.data.cpt_files)

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        """Weights match the files; streaming has a step count."""
        cpt_sources(cfg)
        if cfg.data.streaming and cfg.cpt.max_steps <= 0:
            raise ConfigError("cpt.max_steps", "must be > 0 with data.streaming=true (a stream has no length to count epochs in)",
                              "set cpt.max_steps to the number of optimizer steps to train")

    def prepare_before_launch(self, cfg: PipelineConfig, *, input_model: str) -> None:
        """Fill the tokenized-data cache before the training processes start, so no rank tokenizes
        while the others wait (a multi-node job would otherwise race on a network filesystem)."""
        from transformers import AutoTokenizer

        if not cfg.data.streaming:
            tokenizer = AutoTokenizer.from_pretrained(input_model, trust_remote_code=cfg.model.trust_remote_code)
            prepare_cpt_data(cfg, tokenizer)

    build_trainer = staticmethod(build_cpt_trainer)

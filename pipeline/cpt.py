"""Continued pretraining: heal the seam of the merged model on raw text.

``run_cpt(cfg)`` runs on every rank under ``accelerate launch`` (DeepSpeed ZeRO from
``cfg.distributed``); on one process it also works without a launcher.
"""

from __future__ import annotations

import torch

from pipeline.config import PipelineConfig
from pipeline.data import load_text_records, pack_documents, split_records, tokenize_records
from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest, stage_dir
from pipeline.train import RecordingCollator, freeze_except, layers_added_by_merge, load_causal_lm, trainer_kwargs

FIXED_BATCH_BLOCKS = 4


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks.input_ids)

    def __getitem__(self, i):
        return {
            "input_ids": torch.tensor(self.blocks.input_ids[i]),
            "position_ids": torch.tensor(self.blocks.position_ids[i]),
            "labels": torch.tensor(self.blocks.labels[i]),
        }


def build_cpt_data(cfg: PipelineConfig, tokenizer):
    records = load_text_records(
        list(cfg.data.cpt_files), text_column=cfg.data.text_column,
        txt_document_separator=cfg.data.txt_document_separator, max_record_chars=cfg.data.max_record_chars,
    )
    split = split_records(records, cfg.data.heldout_fraction)
    train = pack_documents(tokenize_records(tokenizer, split.train), cfg.cpt.seq_len)
    heldout = pack_documents(tokenize_records(tokenizer, split.heldout), cfg.cpt.seq_len) if split.heldout else None
    return train, heldout


def run_cpt(cfg: PipelineConfig):
    from pipeline.train import run_training_stage

    return run_training_stage(cfg, "cpt")


def trainable_layers(cfg: PipelineConfig) -> list[int] | None:
    layers = None if cfg.cpt.trainable_layers is None else list(cfg.cpt.trainable_layers)
    if cfg.cpt.trainable_from_merge is not None:
        if cfg.cpt.trainable_from_merge != "added":
            raise ConfigError("cpt.trainable_from_merge", f"unknown value '{cfg.cpt.trainable_from_merge}'", "use added or null")
        merge = read_manifest(stage_dir(cfg.paths.run_dir, "merge"))
        if merge is None:
            raise ConfigError("cpt.trainable_from_merge", "needs the merge stage's manifest in this run directory")
        layers = sorted(set(layers or []) | set(layers_added_by_merge(merge["metrics"])))
    return layers


def build_cpt_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir,
                      ds_config: dict | None, bf16: bool, attn: str):
    from transformers import Trainer, TrainingArguments, default_data_collator

    train_blocks, heldout_blocks = build_cpt_data(cfg, tokenizer)
    data_stats = train_blocks.stats(tokenizer.pad_token_id)
    fixed_src = heldout_blocks if heldout_blocks and heldout_blocks.input_ids else train_blocks
    fixed_batch = {k: getattr(fixed_src, k)[:FIXED_BATCH_BLOCKS] for k in ("input_ids", "position_ids", "labels")}
    args = TrainingArguments(**trainer_kwargs(cfg.cpt, output_dir=checkpoint_dir, ds_config=ds_config, bf16=bf16))
    model = load_causal_lm(input_model, bf16=bf16, attn=attn, trust_remote_code=cfg.model.trust_remote_code)
    freeze_except(model, layers=trainable_layers(cfg), patterns=list(cfg.cpt.trainable_patterns))
    collator = RecordingCollator(default_data_collator)
    trainer = Trainer(model=model, args=args, train_dataset=PackedDataset(train_blocks), data_collator=collator,
                      processing_class=tokenizer)
    return trainer, collator, fixed_batch, data_stats, cfg.cpt.seq_len, False

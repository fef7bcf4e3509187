"""Instruction fine-tuning with TRL's SFTTrainer: full fine-tune, or LoRA (merged into the saved
weights by the stage's finalize step). Loss on assistant tokens only by default.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data import conversation_key, load_conversations, split_records
from pipeline.errors import ConfigError
from pipeline.train import RecordingCollator, load_causal_lm, trainer_kwargs

FIXED_BATCH_EXAMPLES = 4


def check_chat_template(tokenizer, *, assistant_only_loss: bool, source: str) -> None:
    template = tokenizer.chat_template
    if not template:
        raise ConfigError(
            f"tokenizer of {source}", "has no chat template",
            "use a tokenizer with a chat template, or set tokenizer.chat_template before sft",
        )
    from pipeline.evaluate import has_generation_markers

    if assistant_only_loss and not has_generation_markers(template):
        raise ConfigError(
            "sft.assistant_only_loss",
            f"the chat template of {source} has no {{% generation %}} / {{% endgeneration %}} markers, so "
            "assistant tokens cannot be found",
            "add the markers around the assistant content in the template, or set sft.assistant_only_loss=false",
        )


def run_sft(cfg: PipelineConfig):
    from pipeline.train import run_training_stage

    return run_training_stage(cfg, "sft")


def assistant_masked_batch(tokenizer, conversations: list[list[dict]], *, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids/attention_mask/labels for a few conversations, labels only on assistant tokens."""
    rows = []
    for conv in conversations:
        enc = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
        rows.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": [ids + [pad] * (width - len(ids)) for ids, _ in rows],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
        "labels": [lab + [-100] * (width - len(lab)) for _, lab in rows],
    }


def build_sft_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir: Path,
                      ds_config: dict | None, bf16: bool, attn: str):
    import datasets
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    sc = cfg.sft
    check_chat_template(tokenizer, assistant_only_loss=sc.assistant_only_loss, source=input_model)
    conversations = load_conversations(list(cfg.data.sft_files), messages_column=cfg.data.messages_column,
                                       sft_format=cfg.data.sft_format)
    split = split_records(conversations, cfg.data.heldout_fraction, conversation_key)
    train_ds = datasets.Dataset.from_list([{"messages": c} for c in split.train])
    fixed_batch = assistant_masked_batch(tokenizer, (split.heldout or split.train)[:FIXED_BATCH_EXAMPLES],
                                         max_length=sc.max_length)

    kwargs = trainer_kwargs(sc, output_dir=checkpoint_dir, ds_config=ds_config, bf16=bf16)
    kwargs.update(
        remove_unused_columns=True,
        max_length=sc.max_length,
        assistant_only_loss=sc.assistant_only_loss,
        packing=sc.packing,
        dataset_num_proc=None,
    )
    args = TrlSFTConfig(**kwargs)
    model = load_causal_lm(input_model, bf16=bf16, attn=attn, trust_remote_code=cfg.model.trust_remote_code,
                           allow_pickle=cfg.model.allow_pickle)
    peft_config = None
    if sc.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=sc.lora_r, lora_alpha=sc.lora_alpha, lora_dropout=sc.lora_dropout,
                                 target_modules=sc.lora_target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=peft_config)
    collator = RecordingCollator(trainer.data_collator)
    trainer.data_collator = collator
    data_stats = {"train_examples": len(split.train), "heldout_examples": len(split.heldout)}
    return trainer, collator, fixed_batch, data_stats, sc.max_length, sc.use_lora

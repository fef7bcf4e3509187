"""The sft stage: instruction fine-tuning with TRL's SFTTrainer, full or LoRA (the adapter is
merged into the saved weights when the export is verified). Loss on assistant tokens only by default.

Conversations in any supported format (``pipeline.data``), rendered by the model's own chat
template. Config group ``conf/sft/``; tests: tests/test_train.py, tests/test_sft_formats.py.
"""

from __future__ import annotations

from pathlib import Path

from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.data.chat import assistant_token_mask, has_generation_markers
from pipeline.stages.stage import TrainerSetup, TrainingStage
from pipeline.data import conversation_key, load_conversations, split_records
from pipeline.errors import ConfigError
from pipeline.training.callbacks import RecordingCollator
from pipeline.training.model import load_causal_lm, trainer_kwargs

FIXED_BATCH_EXAMPLES = 4


def check_chat_template(tokenizer, *, assistant_only_loss: bool, source: str) -> None:
    template = tokenizer.chat_template
    if not template:
        raise ConfigError(
            f"tokenizer of {source}", "has no chat template",
            "use a tokenizer with a chat template, or set tokenizer.chat_template before sft",
        )
    if assistant_only_loss and not has_generation_markers(template):
        raise ConfigError(
            "sft.assistant_only_loss",
            f"the chat template of {source} has no {{% generation %}} / {{% endgeneration %}} markers, so "
            "assistant tokens cannot be found",
            "add the markers around the assistant content in the template, or set sft.assistant_only_loss=false",
        )


def assistant_masked_batch(tokenizer, conversations: list[list[dict]], *, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids/attention_mask/labels for a few conversations, labels only on assistant tokens."""
    rows = []
    for conv in conversations:
        ids, mask = assistant_token_mask(tokenizer, conv, max_length=max_length)
        rows.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": [ids + [pad] * (width - len(ids)) for ids, _ in rows],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
        "labels": [lab + [-100] * (width - len(lab)) for _, lab in rows],
    }


def build_sft_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir: Path,
                      ds_config: dict | None, bf16: bool, attn: str) -> TrainerSetup:
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
    return TrainerSetup(trainer=trainer, collator=collator, fixed_batch=fixed_batch, data_stats=data_stats,
                        seq_len=sc.max_length, saves_adapter=sc.use_lora)


def first_sft_rows(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """(file, first row) of each local sft file (hub datasets are checked for access only)."""
    from pipeline.data import check_data_file, is_hub_dataset_name, read_rows, require_hub_access

    out = []
    for name in cfg.data.sft_files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field="data.sft_files")
            continue
        path = check_data_file(name, field="data.sft_files")
        if path.suffix == ".txt":
            raise ConfigError("data.sft_files", f"{name} is a .txt file",
                              "give .jsonl/.json/.parquet rows: chat messages, ShareGPT, alpaca or prompt/completion")
        row = next(read_rows(path, field="data.sft_files"), None)
        if row is None:
            raise ConfigError("data.sft_files", f"{name} has no rows", "give a file with at least one conversation")
        out.append((name, row))
    return out


def check_sft_files(cfg: PipelineConfig) -> None:
    """Each sft file's first row converts to a conversation in its (detected) format."""
    from pipeline.data import sft_row_messages

    if not cfg.data.sft_files:
        raise ConfigError("data.sft_files", "is empty", "list the conversation files for sft")
    for name, row in first_sft_rows(cfg):
        sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column,
                         where=f"data.sft_files ({name}) row 0")


def check_sft_sample_formatting(cfg: PipelineConfig, tokenizer, source: str) -> None:
    """A sample row through the real formatting: the chat template applied and, with assistant-only
    loss, assistant tokens found (a template whose markers wrap nothing trains on nothing)."""
    from pipeline.data import sft_row_messages

    for name, row in first_sft_rows(cfg):
        msgs = sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column,
                                where=f"data.sft_files ({name}) row 0")
        try:
            enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=cfg.sft.assistant_only_loss)
        except Exception as e:  # noqa: BLE001 - jinja/template errors come in many types; the user needs the cause
            raise ConfigError(f"tokenizer of {source}", f"its chat template fails on {name} row 0 ({type(e).__name__}: {e})",
                              "fix the template or the data's roles") from None
        if cfg.sft.assistant_only_loss and not any(enc["assistant_masks"]):
            raise ConfigError("sft.assistant_only_loss",
                              f"the chat template of {source} marks no assistant token in {name} row 0",
                              "put {% generation %} ... {% endgeneration %} around the assistant content")


class SFTStage(TrainingStage):
    name = "sft"

    def data_files(self, cfg: PipelineConfig) -> list[str]:
        return list(cfg.data.sft_files)

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        """The files' first rows convert to conversations, and (for a local base model) its chat
        template renders a sample row with assistant tokens found."""
        check_sft_files(cfg)
        src = cfg.model.name_or_path
        if cfg.model.demo is not None or not (Path(src) / "config.json").is_file():
            return  # the demo's tokenizer is built later; a hub model's is checked when it is fetched;
            # a directory that is not a model is reported by the base stage's check
        tok_src = cfg.merge.tokenizer_source or src
        if Path(tok_src).is_dir():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=cfg.model.trust_remote_code)
            check_chat_template(tok, assistant_only_loss=cfg.sft.assistant_only_loss, source=tok_src)
            check_sft_sample_formatting(cfg, tok, tok_src)

    build_trainer = staticmethod(build_sft_trainer)

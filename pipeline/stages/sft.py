"""The sft stage: instruction fine-tuning with TRL's SFTTrainer, full or LoRA (the adapter is
merged into the saved weights when the export is verified). Loss on assistant tokens only by default.

Conversations in any supported format (``pipeline.data``), rendered by the model's own chat
template. With ``sft.assistant_only_loss`` (the default) the rows reach TRL pre-tokenized
(``input_ids`` + ``assistant_masks``) from ``pipeline.data.chat_masking``: any chat template, with
or without ``{% generation %}`` markers, Mistral through mistral-common, every row verified (a row
whose mask cannot be verified is a ConfigError naming its file and row). TRL builds the labels from
the masks; its own ``assistant_only_loss`` stays off (it refuses pre-tokenized rows).
Config group ``conf/sft/``; tests: tests/test_train.py, tests/test_sft_formats.py,
tests/test_chat_masking.py.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.data import (
    check_data_file,
    conversation_key,
    is_hub_dataset_name,
    load_conversations,
    read_rows,
    require_hub_access,
    sft_row_messages,
    split_records,
)
from pipeline.data.chat_masking import check_template_masks, labels_from_mask, masked_rows, mistral_common_tokenizer_for
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.stages.base import tokenizer_for_checks
from pipeline.stages.stage import TrainerSetup, TrainingStage
from pipeline.training.callbacks import RecordingCollator
from pipeline.training.model import load_model_for_training, lora_config, trainer_kwargs
from pipeline.training.verify import padded_batch

FIXED_BATCH_EXAMPLES = 4


def check_chat_template(tokenizer, *, assistant_only_loss: bool, source: str) -> None:
    """A chat template is needed, except for a Mistral tokenizer with assistant-only loss (its
    conversations are encoded by mistral-common). No markers are needed: the assistant tokens are
    found by pipeline.data.chat_masking, and each sample row is checked by ``check_sft_sample_formatting``."""
    if assistant_only_loss and mistral_common_tokenizer_for(tokenizer) is not None:
        return
    if not tokenizer.chat_template:
        raise ConfigError(
            f"tokenizer of {source}", "has no chat template",
            "use a tokenizer with a chat template, or set tokenizer.chat_template before sft",
        )


def load_named_conversations(cfg: PipelineConfig) -> tuple[list[list[dict]], list[str]]:
    """The sft conversations (as ``load_conversations`` reads them) and, for each, the file and row
    it came from ("data.sft_files (a.jsonl) row 3"), so that a row refused later is named."""
    conversations: list[list[dict]] = []
    names: list[str] = []
    for name in cfg.data.sft_files:
        try:
            part = load_conversations([name], messages_column=cfg.data.messages_column, sft_format=cfg.data.sft_format)
        except ConfigError as e:
            if e.problem.endswith("contain no conversations"):
                continue  # an empty file adds nothing, as when all files are read at once
            raise
        conversations.extend(part)
        names.extend(f"data.sft_files ({name}) row {i}" for i in range(len(part)))  # one conversation per row
    if not conversations:
        raise ConfigError("data.sft_files", f"{list(cfg.data.sft_files)} contain no conversations")
    return conversations, names


def assistant_masked_batch(tokenizer, conversations: list[list[dict]], *, max_length: int,
                           names: Sequence[str] | None = None) -> dict[str, list[list[int]]]:
    """input_ids/attention_mask/labels for a few conversations, labels only on the verified
    assistant tokens (pipeline.data.chat_masking, the same rows TRL trains on). Conversations with
    no label a causal LM can predict (the first token has no prediction) are left out; none left
    is a ConfigError, since the hand-off check would compare two NaN losses."""
    built = masked_rows(tokenizer, conversations, max_length=max_length, where="sft fixed batch", row_names=names)
    rows = [(r["input_ids"], labels_from_mask(input_ids=r["input_ids"], assistant_mask=r["assistant_masks"]))
            for r in built.rows if any(r["assistant_masks"][1:])]
    if not rows:
        raise ConfigError("sft.max_length", f"none of the {len(conversations)} fixed-batch conversations keeps an "
                          f"assistant token within the first {max_length} tokens",
                          "raise sft.max_length, or shorten the first turns of the data")
    return padded_batch(tokenizer, rows)


def build_sft_trainer(cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir: Path,
                      ds_config: dict | None, bf16: bool, attn: str) -> TrainerSetup:
    import datasets
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    sc = cfg.sft
    check_chat_template(tokenizer, assistant_only_loss=sc.assistant_only_loss, source=input_model)
    conversations, names = load_named_conversations(cfg)
    name_of = {}
    for conv, name in zip(conversations, names):
        name_of.setdefault(conversation_key(conv), name)
    split = split_records(conversations, cfg.data.heldout_fraction, conversation_key)
    fixed_convs = (split.heldout or split.train)[:FIXED_BATCH_EXAMPLES]
    fixed_names = [name_of[conversation_key(c)] for c in fixed_convs]
    mask_stats: dict = {}
    if sc.assistant_only_loss:
        # Every row masked and verified here, before the model is loaded; the held-out rows too
        # (the eval stage scores them with the same masks).
        train = masked_rows(tokenizer, split.train, max_length=sc.max_length,
                            row_names=[name_of[conversation_key(c)] for c in split.train])
        masked_rows(tokenizer, split.heldout, max_length=sc.max_length,
                    row_names=[name_of[conversation_key(c)] for c in split.heldout])
        if not train.rows:
            raise ConfigError("sft.max_length", f"none of the {train.examples} training conversations keeps an "
                              f"assistant token within the first {sc.max_length} tokens",
                              "raise sft.max_length, or shorten the first turns of the data")
        train_ds = datasets.Dataset.from_list(train.rows)
        fixed_batch = assistant_masked_batch(tokenizer, fixed_convs, max_length=sc.max_length, names=fixed_names)
        mask_stats = {"rows_dropped_no_trained_token": train.dropped_no_trained_token,
                      "rows_truncated": train.truncated,
                      # Every assistant token of the training split; what training consumed is the
                      # stage's trained_tokens metric (training.callbacks.ConsumedTokens).
                      "assistant_tokens_in_train_split": train.trained_tokens}
    else:
        # Loss on every token: TRL renders the conversations itself; the fixed batch is scored the same way.
        train_ds = datasets.Dataset.from_list([{"messages": c} for c in split.train])
        rows = []
        for conv, name in zip(fixed_convs, fixed_names):
            ids = list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])[:sc.max_length]
            rows.append((ids, list(ids)))
        fixed_batch = padded_batch(tokenizer, rows)

    kwargs = trainer_kwargs(sc, output_dir=checkpoint_dir, ds_config=ds_config, bf16=bf16)
    kwargs.update(
        remove_unused_columns=True,
        max_length=sc.max_length,
        # TRL applies the pre-tokenized rows' assistant_masks itself; its own assistant_only_loss
        # needs {% generation %} markers and refuses pre-tokenized rows.
        assistant_only_loss=False,
        packing=sc.packing,
        dataset_num_proc=None,
    )
    args = TrlSFTConfig(**kwargs)
    model = load_model_for_training(input_model, bf16=bf16, attn=attn, trust_remote_code=cfg.model.trust_remote_code,
                           allow_pickle=cfg.model.allow_pickle)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=lora_config(sc))
    collator = RecordingCollator(trainer.data_collator)
    trainer.data_collator = collator
    data_stats = {"train_examples": len(split.train), "heldout_examples": len(split.heldout), **mask_stats}
    return TrainerSetup(trainer=trainer, collator=collator, fixed_batch=fixed_batch, data_stats=data_stats,
                        seq_len=sc.max_length, saves_adapter=sc.use_lora)


def first_sft_rows(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """(file, first row) of each local sft file (hub datasets are checked for access only)."""
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
    if not cfg.data.sft_files:
        raise ConfigError("data.sft_files", "is empty", "list the conversation files for sft")
    for name, row in first_sft_rows(cfg):
        sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column,
                         where=f"data.sft_files ({name}) row 0")


# Rows of each local sft file that preflight puts through the real masking (cheap: no model).
PREFLIGHT_ROWS_PER_FILE = 8


def check_sft_sample_formatting(cfg: PipelineConfig, tokenizer, source: str) -> None:
    """The first rows of each local file through the real formatting: with assistant-only loss, the
    masks sft trains on, each verified (pipeline.data.chat_masking: the reply's tokens found and
    decoded back, the end-of-turn token found); otherwise the chat template applied."""
    for name in cfg.data.sft_files:
        if is_hub_dataset_name(name):
            continue
        path = check_data_file(name, field="data.sft_files")
        rows = list(islice(read_rows(path, field="data.sft_files"), PREFLIGHT_ROWS_PER_FILE))
        names = [f"data.sft_files ({name}) row {i}" for i in range(len(rows))]
        msgs = [sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column, where=where)
                for row, where in zip(rows, names)]
        if cfg.sft.assistant_only_loss:
            stats = check_template_masks(tokenizer, msgs, where=f"data.sft_files ({name})",
                                         max_length=cfg.sft.max_length, row_names=names)
            # Say which encoder masked them: a Mistral tokenizer goes through mistral-common, not
            # its chat template, and the user should see that before training starts.
            log(f"{stats['rows']} of the first {len(rows)} rows of {name} masked and verified "
                f"(encoder: {stats['encoder']}, {stats['trained_tokens']} trained tokens)", where="preflight sft")
            continue
        for conv, where in zip(msgs, names):
            try:
                tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)
            except Exception as e:  # noqa: BLE001 - jinja/template errors come in many types; the user needs the cause
                raise ConfigError(f"tokenizer of {source}", f"its chat template fails on {where} ({type(e).__name__}: {e})",
                                  "fix the template or the data's roles") from None


class SFTStage(TrainingStage):
    name = "sft"

    def data_files(self, cfg: PipelineConfig) -> list[str]:
        return list(cfg.data.sft_files)

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        """The files' first rows convert to conversations, and the first rows of each file go through
        the real masking, verified, with the tokenizer the run will train with (a local directory, a
        GGUF file's, the built demo base's, a hub id's from the local cache). When that tokenizer
        cannot be had before the run, the preflight output says so and why."""
        check_sft_files(cfg)
        tok, source = tokenizer_for_checks(cfg)
        if tok is None:
            log(f"the chat template and masking of the first rows could not be checked: {source}. sft masks and "
                "verifies every row when it starts (after merge and cpt)", where="preflight sft")
            return
        log(f"chat template and masking checked with the tokenizer of {source}", where="preflight sft")
        check_chat_template(tok, assistant_only_loss=cfg.sft.assistant_only_loss, source=source)
        check_sft_sample_formatting(cfg, tok, source)

    build_trainer = staticmethod(build_sft_trainer)

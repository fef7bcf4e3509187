"""Checks that run before any expensive work, reporting every problem found at once.

A problem is a ``ConfigError`` naming the field or file and what to do. Nothing here trains,
merges or writes model files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.config import STAGES, PipelineConfig
from pipeline.errors import ConfigError


class PreflightFailed(ConfigError):
    def __init__(self, problems: list[ConfigError]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__("preflight", f"{len(problems)} problem(s) found before starting:\n{lines}")


def _check_files(files: list[str], *, field: str, column: str, column_field: str, txt_ok: bool, what: str) -> None:
    """Each file exists (or is a reachable hub dataset), is not empty, and has ``column``."""
    from pipeline.data import check_data_file, is_hub_dataset_name, read_rows, require_hub_access

    if not files:
        raise ConfigError(field, "is empty", f"list the {what}")
    for name in files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field=field)
            continue
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            if not txt_ok:
                raise ConfigError(field, f"{name} is a .txt file", f"give .jsonl/.json/.parquet rows with a '{column}' column")
            if path.stat().st_size == 0:
                raise ConfigError(field, f"{name} is empty")
            continue
        row = next(read_rows(path, field=field), None)
        if row is None:
            raise ConfigError(field, f"{name} has no rows")
        if column not in row:
            raise ConfigError(column_field, f"'{column}' is not a column of {name} (columns: {sorted(row)})",
                              f"set {column_field} to the right column, or convert the data")


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


def check_data(cfg: PipelineConfig, stages: list[str]) -> None:
    if "cpt" in stages or "eval" in stages:
        _check_files(list(cfg.data.cpt_files), field="data.cpt_files", column=cfg.data.text_column,
                     column_field="data.text_column", txt_ok=True, what="raw-text files for continued pretraining")
    if "sft" in stages or "eval" in stages:
        check_sft_files(cfg)
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError("data.heldout_fraction", f"must be in [0, 1), got {cfg.data.heldout_fraction}")


def check_base_and_merge(cfg: PipelineConfig, stages: list[str]) -> None:
    """The base model exists and the slices fit it (for the demo: against the configured depth,
    since the model is built later)."""
    if cfg.model.demo is not None:
        from pipeline.demo import validate_demo_config

        validate_demo_config(cfg.model.demo, cfg.data.heldout_fraction)
        if "merge" in stages and not cfg.merge.config_file and cfg.merge.merge_method == "passthrough":
            depth = cfg.model.demo.num_hidden_layers
            for i, s in enumerate(cfg.merge.slices):
                for j, src in enumerate(s.sources):
                    lo, hi = (list(src.layer_range) + [None, None])[:2]
                    if lo is None or hi is None or not (0 <= lo < hi <= depth):
                        raise ConfigError(
                            f"merge.slices[{i}].sources[{j}].layer_range",
                            f"{list(src.layer_range)} is not a non-empty [start, end) range inside the base model's {depth} layers",
                            f"use 0 <= start < end <= {depth}",
                        )
        return
    src = cfg.model.name_or_path
    looks_local = src.startswith((".", "/", "~")) or Path(src).exists()
    if looks_local and not Path(src).is_dir():
        raise ConfigError("model.name_or_path", f"model directory {src} does not exist", "fix the path")
    if looks_local and not (Path(src) / "config.json").is_file():
        raise ConfigError("model.name_or_path", f"{src} has no config.json: not a Hugging Face model directory")
    if "merge" in stages:
        from pipeline.driver import resolved_merge_config
        from pipeline.merge import validate_merge

        validate_merge(resolved_merge_config(cfg, src), base_model=src, allow_pickle=cfg.model.allow_pickle)
    if "sft" in stages and cfg.sft.enabled and looks_local:
        from transformers import AutoTokenizer

        from pipeline.sft import check_chat_template

        tok_src = cfg.merge.tokenizer_source or src
        if Path(tok_src).is_dir():
            tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=cfg.model.trust_remote_code)
            check_chat_template(tok, assistant_only_loss=cfg.sft.assistant_only_loss, source=tok_src)
            check_sft_sample_formatting(cfg, tok, tok_src)


def check_distributed(cfg: PipelineConfig, stages: list[str]) -> None:
    from pipeline.distributed import validate_distributed

    if any(s in stages for s in ("cpt", "sft")) and cfg.distributed.launcher == "accelerate":
        validate_distributed(cfg.distributed, cfg.paths.conf_dir)
    if cfg.distributed.launcher not in ("accelerate", "inprocess"):
        raise ConfigError("distributed.launcher", f"unknown launcher '{cfg.distributed.launcher}'", "use accelerate or inprocess")


def check_eval(cfg: PipelineConfig, stages: list[str]) -> None:
    bad = [s for s in cfg.eval.stages if s not in STAGES or s == "eval"]
    if bad:
        raise ConfigError("eval.stages", f"unknown stage(s) {bad}", "use base, merge, cpt, sft")
    if "eval" in stages and cfg.eval.enabled and cfg.eval.use_harness and cfg.eval.harness_tasks:
        from pipeline.evaluate import check_tasks_available

        # Offline without the datasets cached (e.g. eval=leaderboard), fail now, not after training.
        check_tasks_available(list(cfg.eval.harness_tasks), include_path=cfg.eval.harness_include_path)


def check_release(cfg: PipelineConfig, stages: list[str]) -> None:
    if "eval" in stages and cfg.release.enabled and cfg.release.push_to_hub:
        from pipeline.release import check_push_settings

        check_push_settings(repo_id=cfg.release.repo_id, dry_run=cfg.release.dry_run, token_env=cfg.release.token_env)


CHECKS: list[Callable[[PipelineConfig, list[str]], None]] = [
    check_data, check_base_and_merge, check_distributed, check_eval, check_release,
]


def preflight(cfg: PipelineConfig) -> None:
    from pipeline.driver import selected_stages

    stages = selected_stages(cfg)
    problems: list[ConfigError] = []
    for check in CHECKS:
        try:
            check(cfg, stages)
        except PreflightFailed as e:
            problems.extend(e.problems)
        except ConfigError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightFailed(problems)

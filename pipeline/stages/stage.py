"""What a stage is, to the driver.

A stage turns inputs (earlier stages' outputs, data files) into a directory. The driver
(``pipeline.driver``) alone decides whether it runs, gives it a fresh temporary directory, times it,
writes its manifest and renames the directory into place; a stage only says:

- ``name``: its name, which is also its config group and (numbered) its directory;
- ``enabled(cfg)``: whether ``stage=all`` runs it;
- ``check(cfg, selected)``: its preflight checks, before any stage runs (raise ``ConfigError``);
- ``inputs(cfg)``: what it reads, each with a content hash (``StageInput``);
- ``key_config(cfg)``: the part of the config that defines its result; with the inputs' hashes it
  makes the stage's key, so a re-run skips a stage whose result is still valid;
- ``run(cfg, inputs=..., out_dir=...)``: do the work, writing into ``out_dir``; return a ``StageOutput``.

Training stages (cpt, sft) are ``TrainingStage``s: their ``run`` starts ``accelerate launch`` and the
ranks train into ``out_dir`` (``pipeline.training.runner``); what differs between them is only how
their Trainer is built (``build_trainer``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.fsutil import hash_path
from pipeline.manifest import StageInput, latest_model_stage, model_chain, resolve_model_dir
from pipeline.training.launch import launch_training


# Config fields added after run directories already existed, with their defaults: a field enters a
# stage's key only when it is set to something else, so runs made before it was added stay up to date.
ADDED_LATER = {"model": {"gguf_file": None},
               "merge": {"target_layers": None, "auto_top_k": 3, "auto_tokens": 4096},
               "data": {"selection_fraction": 0.0},
               "eval": {"harness_preset": None, "decontaminate": False},
               "cpt": {"eval_every_tokens": 0}}
# Data fields only the dpo stage reads (and eval, when dpo runs): other stages' keys leave them out,
# so adding preference data re-runs neither cpt nor sft.
PREFERENCE_DATA_FIELDS = ("dpo_files", "dpo_format")


def section_for_key(name: str, values: dict) -> dict:
    """``values`` (a config section as a dict) without the fields of ``ADDED_LATER[name]`` that are
    at their default."""
    added = ADDED_LATER.get(name, {})
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def data_for_key(cfg: PipelineConfig, *, reads_preference_data: bool) -> dict:
    data = section_for_key("data", asdict(cfg.data))
    return data if reads_preference_data else {k: v for k, v in data.items() if k not in PREFERENCE_DATA_FIELDS}


@dataclass
class StageOutput:
    """What a stage's ``run`` returns: its metrics, and where its model is (see ``Manifest.model_dir``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model_dir: Optional[str] = "."


class Stage(Protocol):
    name: str
    # A publishing step (release) is not keyed and writes no manifest: it runs whenever the stage it
    # ``follows`` runs, into its own directory (which must not hold pipeline bookkeeping).
    publishes: bool
    follows: Optional[str]
    # The stage's .partial directory survives a failure and is handed to the next attempt (instead
    # of a fresh one): only for a stage whose every file records what it was made from, so that it
    # redoes only what is missing or stale (quantize: the conversion, reference scores, rungs).
    resumes_partial: bool

    def enabled(self, cfg: PipelineConfig) -> bool: ...

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None: ...

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]: ...

    def key_config(self, cfg: PipelineConfig) -> dict: ...

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput: ...


class BaseStage:
    """Defaults for the Stage protocol: always enabled, no checks, keyed, not publishing."""

    name: str = ""
    publishes = False
    follows: Optional[str] = None
    resumes_partial = False

    def enabled(self, cfg: PipelineConfig) -> bool:
        return True

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        return None


@dataclass
class TrainerSetup:
    """What a training stage's ``build_trainer`` hands the runner."""

    trainer: Any  # transformers.Trainer (or a TRL subclass)
    collator: Any  # pipeline.training.callbacks.RecordingCollator around the Trainer's collator
    fixed_batch: dict[str, list[list[int]]]  # the batch whose loss verifies the export
    data_stats: dict[str, Any]
    seq_len: int  # tokens per sequence, for throughput and MFU
    saves_adapter: bool = False  # LoRA: the runner saves the adapter and merges it in a fresh process


def previous_model(cfg: PipelineConfig, stage: str) -> tuple[str, Any, str]:
    """(previous stage, its manifest, its model dir): a stage's input model, read from manifests."""
    prev, manifest = latest_model_stage(cfg.paths.run_dir, stage, model_chain(cfg))
    return prev, manifest, resolve_model_dir(cfg.paths.run_dir, prev, manifest)


class TrainingStage(BaseStage):
    """A stage that trains the previous stage's model on data files under ``accelerate launch``."""

    reads_preference_data = False

    def section(self, cfg: PipelineConfig) -> TrainConfig:
        return getattr(cfg, self.name)

    def data_files(self, cfg: PipelineConfig) -> list[str]:
        raise NotImplementedError

    def enabled(self, cfg: PipelineConfig) -> bool:
        return self.section(cfg).enabled

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        prev, manifest, model_dir = previous_model(cfg, self.name)
        return [StageInput(role="model", stage=prev, path=model_dir, sha256=manifest.key),
                *(StageInput(role="data", path=f, sha256=hash_path(f)) for f in self.data_files(cfg))]

    def key_config(self, cfg: PipelineConfig) -> dict:
        return {
            self.name: section_for_key(self.name, asdict(self.section(cfg))),
            "data": data_for_key(cfg, reads_preference_data=self.reads_preference_data),
            "distributed": {"zero_stage": cfg.distributed.zero_stage, "num_processes": cfg.distributed.num_processes,
                            "num_machines": cfg.distributed.num_machines},
        }

    def prepare_before_launch(self, cfg: PipelineConfig, *, input_model: str) -> None:
        """Work done once in the driver before the ranks start (e.g. filling a data cache)."""

    def build_trainer(self, cfg: PipelineConfig, *, tokenizer, input_model: str, checkpoint_dir: Path,
                      ds_config: Optional[dict], bf16: bool, attn: str) -> TrainerSetup:
        raise NotImplementedError

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        return StageOutput(metrics=launch_training(self, cfg, out_dir=out_dir))

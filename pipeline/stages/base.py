"""The base stage: the model the run grows, referenced (not copied: it may be tens of GB).

A local directory or a hub id (``model.name_or_path``); a GGUF file (``model.gguf_file``),
dequantized once into a cached directory by ``pipeline.models.gguf``; or the tiny demo model, built
once and cached by ``pipeline.models.demo``. Config group ``conf/model/``; tests:
tests/test_demo.py, tests/test_gguf_import.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.configio import config_to_dict
from pipeline.errors import ConfigError
from pipeline.fsutil import hash_path, hash_text
from pipeline.manifest import StageInput
from pipeline.models.gguf import check_gguf_file, import_gguf, import_record, read_gguf_metadata, resolve_package_file
from pipeline.models.demo import BUILD_METRICS_FILE, RecordOptions, ensure_demo_base, validate_demo_config
from pipeline.stages.stage import BaseStage, StageOutput, section_for_key


def demo_records(cfg: PipelineConfig) -> RecordOptions:
    return RecordOptions(cfg.data.txt_document_separator, cfg.data.max_record_chars)


class BaseModelStage(BaseStage):
    name = "base"

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        if cfg.model.demo is not None:
            validate_demo_config(cfg.model.demo, cfg.data.heldout_fraction)
            return
        if cfg.model.gguf_file is not None:
            path = check_gguf_file(resolve_package_file(cfg.model.gguf_file, where="model.gguf_file"),
                                   where="model.gguf_file")
            read_gguf_metadata(path, where="model.gguf_file")  # an architecture transformers can dequantize
            return
        src = cfg.model.name_or_path
        looks_local = src.startswith((".", "/", "~")) or Path(src).exists()
        if looks_local and not Path(src).is_dir():
            raise ConfigError("model.name_or_path", f"model directory {src} does not exist", "fix the path")
        if looks_local and not (Path(src) / "config.json").is_file():
            raise ConfigError("model.name_or_path", f"{src} has no config.json: not a Hugging Face model directory")

    def model_dir(self, cfg: PipelineConfig) -> str:
        """The base model's directory (the demo's is built here when missing) or hub id."""
        if cfg.model.demo is not None:
            # The demo base must hold out exactly the records the eval stage scores.
            return str(ensure_demo_base(cfg.model.demo, Path(cfg.paths.cache_dir),
                                        heldout_fraction=cfg.data.heldout_fraction, records=demo_records(cfg)))
        if cfg.model.gguf_file is not None:
            gguf = resolve_package_file(cfg.model.gguf_file, where="model.gguf_file")
            return str(import_gguf(gguf, Path(cfg.paths.cache_dir) / "gguf"))
        return cfg.model.name_or_path

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        path = self.model_dir(cfg)
        if cfg.model.demo is not None or Path(path).is_dir():
            return [StageInput(role="model", path=path, sha256=hash_path(path))]
        # A hub id: identified by name and revision (resolved to files by the merge).
        return [StageInput(role="model", path=path, revision=cfg.model.revision, has_revision=True,
                           sha256=hash_text(f"{path}@{cfg.model.revision or 'main'}"))]

    def key_config(self, cfg: PipelineConfig) -> dict:
        return {"model": section_for_key("model", config_to_dict(cfg)["model"])}

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        model_dir = inputs[0].path
        metrics = {}
        if cfg.model.demo is not None and (Path(model_dir) / BUILD_METRICS_FILE).is_file():
            metrics = json.loads((Path(model_dir) / BUILD_METRICS_FILE).read_text())
        if cfg.model.gguf_file is not None and (record := import_record(model_dir)) is not None:
            # The card must say the weights are this file's, dequantized, not the Hub's original ones.
            metrics = {**metrics, "gguf_source": record}
        return StageOutput(metrics=metrics, model_dir=model_dir)

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
from pipeline.models.gguf import (
    check_gguf_file,
    gguf_tokenizer,
    import_gguf,
    import_record,
    read_gguf_metadata,
    resolve_package_file,
)
from pipeline.models.demo import (
    BUILD_METRICS_FILE,
    RecordOptions,
    built_demo_base,
    ensure_demo_base,
    validate_demo_config,
)
from pipeline.stages.stage import BaseStage, StageOutput, section_for_key


def demo_records(cfg: PipelineConfig) -> RecordOptions:
    return RecordOptions(cfg.data.txt_document_separator, cfg.data.max_record_chars)


def _load_tokenizer(src: str, cfg: PipelineConfig, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code, **kwargs)


def tokenizer_for_checks(cfg: PipelineConfig):
    """The tokenizer the run will train with, for preflight's checks, found without building,
    converting or downloading anything: ``(tokenizer, where it was read)``, or ``(None, why not)``.

    ``merge.tokenizer_source`` or the base model's: a local directory; a GGUF file (its tokenizer read
    from the cached import or from the file's metadata, no weight dequantized); the demo base when
    it is already built; a hub id only from the local Hugging Face cache."""
    src = cfg.merge.tokenizer_source or cfg.model.name_or_path
    from_base = src == cfg.model.name_or_path
    if from_base and cfg.model.demo is not None:
        built = built_demo_base(cfg.model.demo, Path(cfg.paths.cache_dir), heldout_fraction=cfg.data.heldout_fraction,
                                records=demo_records(cfg))
        if built is None:
            return None, (f"the demo base model and its tokenizer are built by the base stage (not built yet under "
                          f"{cfg.paths.cache_dir}/demo_base)")
        return _load_tokenizer(str(built), cfg), f"{built} (the demo base)"
    if from_base and cfg.model.gguf_file is not None:
        try:
            gguf = resolve_package_file(cfg.model.gguf_file, where="model.gguf_file")
            return gguf_tokenizer(gguf, Path(cfg.paths.cache_dir) / "gguf")
        except ConfigError as e:
            return None, f"model.gguf_file cannot be read ({e.problem}; the base stage's check reports it)"
    looks_local = src.startswith((".", "/", "~")) or Path(src).exists()
    if looks_local:
        if not (Path(src).expanduser() / "config.json").is_file() and not list(Path(src).expanduser().glob("tokenizer*")):
            return None, f"{src} is not a model directory (the base stage's check reports it)"
        return _load_tokenizer(str(Path(src).expanduser()), cfg), src
    revision = cfg.model.revision if from_base else None
    try:
        return _load_tokenizer(src, cfg, revision=revision, local_files_only=True), f"{src} (local Hugging Face cache)"
    except (OSError, ValueError) as e:
        return None, (f"{src} is a hub id that is not in the local Hugging Face cache ({type(e).__name__}; offline or "
                      "not downloaded yet)")


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

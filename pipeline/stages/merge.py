"""The merge stage: a passthrough merge of the base model's layer slices (mergekit's YAML, or the
``dus`` / ``block_expansion`` shorthands), by ``pipeline.merge``.

The merged model is written once into a cache keyed by the stage's key and hard-linked into the run:
sweep jobs with the same merge share one result. Config group ``conf/merge/``; tests:
tests/test_merge*.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.fsutil import file_lock, link_or_copy_tree
from pipeline.log import log
from pipeline.manifest import StageInput, require_stage, resolve_model_dir, stage_key
from pipeline.merge import MergeConfig, run_merge, validate_merge
from pipeline.merge.plan import planned_num_layers
from pipeline.models.gguf import check_gguf_file, read_gguf_metadata, resolve_package_file
from pipeline.stages.stage import BaseStage, StageOutput

MERGE_METRICS = "merge_metrics.json"  # in the cache entry only: a merge without it is redone


def resolved_merge_config(cfg: PipelineConfig, base_model_dir: str) -> MergeConfig:
    """The merge config with the base model's name replaced by its resolved directory."""
    merge = copy.deepcopy(cfg.merge)
    for out_slice in merge.slices:
        for src in out_slice.sources:
            if src.model is None or src.model == cfg.model.name_or_path:
                src.model = base_model_dir
    if merge.tokenizer_source == cfg.model.name_or_path:
        merge.tokenizer_source = base_model_dir
    if merge.base_model == cfg.model.name_or_path:
        merge.base_model = base_model_dir
    return merge


def check_demo_slices(cfg: PipelineConfig) -> None:
    """The demo base is built later: its slices are checked against the configured depth."""
    if cfg.merge.config_file or cfg.merge.merge_method != "passthrough":
        return
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


class MergeStage(BaseStage):
    name = "merge"

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        if cfg.model.demo is not None:
            check_demo_slices(cfg)
        elif cfg.model.gguf_file is not None:
            # Not converted yet: the slices are checked against the depth in the GGUF's metadata.
            gguf = resolve_package_file(cfg.model.gguf_file, where="model.gguf_file")
            depth = read_gguf_metadata(check_gguf_file(gguf), where="model.gguf_file")["config"]["num_hidden_layers"]
            planned_num_layers(cfg.merge, base_layers=depth)
        else:
            src = cfg.model.name_or_path
            validate_merge(resolved_merge_config(cfg, src), base_model=src, allow_pickle=cfg.model.allow_pickle)

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        base = require_stage(cfg.paths.run_dir, "base", needed_by="merge")
        return [StageInput(role="base", stage="base", path=resolve_model_dir(cfg.paths.run_dir, "base", base),
                           sha256=base.key)]

    def key_config(self, cfg: PipelineConfig) -> dict:
        return {"merge": asdict(cfg.merge)}

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        base_dir = inputs[0].path
        merge_cfg = resolved_merge_config(cfg, base_dir)
        validate_merge(merge_cfg, base_model=base_dir, allow_pickle=cfg.model.allow_pickle)
        key = stage_key(self.name, self.key_config(cfg), inputs)
        cached = Path(cfg.paths.cache_dir) / "merges" / key[:16]
        with file_lock(cached.parent / f"{key[:16]}.lock"):
            if (cached / MERGE_METRICS).is_file():
                metrics = json.loads((cached / MERGE_METRICS).read_text())
                metrics["reused_from_cache"] = str(cached)
                log(f"merge: reusing identical merge {cached}")
            else:
                log("merge: " + ", ".join(f"[{s.sources[0].layer_range[0]}, {s.sources[0].layer_range[1]})"
                                          for s in cfg.merge.slices if s.sources) + f" -> {cached}")
                # overwrite: a merge that finished without its metrics file (a crash in between) is redone.
                metrics = run_merge(merge_cfg, cached, base_model=base_dir, allow_pickle=cfg.model.allow_pickle,
                                    trust_remote_code=cfg.model.trust_remote_code, overwrite=True)
                (cached / MERGE_METRICS).write_text(json.dumps(metrics, default=str))
                metrics["reused_from_cache"] = None
        link_or_copy_tree(cached, out_dir)
        (out_dir / MERGE_METRICS).unlink(missing_ok=True)
        return StageOutput(metrics=metrics)

"""The merge stage: a passthrough merge of the base model's layer slices (mergekit's YAML, or the
``dus`` / ``block_expansion`` shorthands), by ``pipeline.merge``.

The merged model is written once into a cache keyed by the stage's key and hard-linked into the run:
sweep jobs with the same merge share one result. Config group ``conf/merge/``; tests:
tests/test_merge*.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

from pipeline.analysis.recommend import recommend_seam
from pipeline.analysis.report import REPORT_JSON, REPORT_MD
from pipeline.analysis.seams import check_target_depth
from pipeline.config import PipelineConfig
from pipeline.data.splits import RecordSplits, require_selection_split
from pipeline.errors import ConfigError
from pipeline.fsutil import file_lock, link_or_copy_tree
from pipeline.log import log
from pipeline.manifest import StageInput, require_stage, resolve_model_dir, stage_key
from pipeline.merge import InputSlice, MergeConfig, OutputSlice, run_merge, validate_merge
from pipeline.merge.plan import planned_num_layers
from pipeline.models.gguf import check_gguf_file, read_gguf_metadata, resolve_package_file
from pipeline.stages.stage import BaseStage, StageOutput, data_for_key, section_for_key

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


AUTO = "auto"
# The data settings that decide which records merge=auto scores on (pipeline.data.splits).
SELECTION_DATA_FIELDS = ("cpt_files", "text_column", "txt_document_separator", "max_record_chars", "heldout_fraction",
                         "selection_fraction")
SEAM_ANALYSIS_DIR = "seam_analysis"  # in the merge's directory: the report that chose merge=auto's slices


def check_auto_merge(cfg: PipelineConfig) -> None:
    m = cfg.merge
    if m.merge_method != AUTO:
        raise ConfigError("merge.target_layers", f"only used by merge=auto, but merge_method is {m.merge_method!r}",
                          "remove it, or use merge=auto")
    if m.target_layers is None:
        raise ConfigError("merge.target_layers", "required by merge=auto", "e.g. merge.target_layers=48 (SOLAR: 32 -> 48)")
    if m.slices or m.config_file or m.n_layers_removed is not None or m.block_expansion_group_size is not None:
        raise ConfigError("merge.merge_method", "auto chooses the slices itself",
                          "remove merge.slices / config_file / n_layers_removed / block_expansion_group_size")
    # The seam is chosen on the selection split, never on the held-out records eval scores.
    require_selection_split(RecordSplits.from_data(cfg.data), needed_by="merge=auto")
    if m.auto_top_k < 1 or m.auto_tokens < 2:
        raise ConfigError("merge.auto_top_k", f"auto_top_k={m.auto_top_k}, auto_tokens={m.auto_tokens}",
                          "use auto_top_k >= 1 and auto_tokens >= 2")
    depth = base_depth(cfg)
    if depth is not None:
        check_target_depth(depth, m.target_layers, where="merge.target_layers")


def base_depth(cfg: PipelineConfig) -> Optional[int]:
    """The base model's layer count before it exists as a directory (demo: as configured; GGUF: from
    its metadata) or from a local directory's config.json; None for a hub id not fetched yet."""
    if cfg.model.demo is not None:
        return cfg.model.demo.num_hidden_layers
    if cfg.model.gguf_file is not None:
        gguf = resolve_package_file(cfg.model.gguf_file, where="model.gguf_file")
        return read_gguf_metadata(check_gguf_file(gguf), where="model.gguf_file")["config"]["num_hidden_layers"]
    config = Path(cfg.model.name_or_path).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("num_hidden_layers")
    return None


def seam_report_dir(cached: Path) -> Path:
    return cached.parent / f".{cached.name}.{SEAM_ANALYSIS_DIR}"


def chosen_merge(cfg: PipelineConfig, base_dir: str, cached: Path) -> tuple[MergeConfig, Optional[dict]]:
    """The merge to run: the configured one, or for merge=auto the seam the analysis recommends
    (its report is written into the merge's directory, so the run says why these layers)."""
    if cfg.merge.merge_method != AUTO:
        return resolved_merge_config(cfg, base_dir), None
    m = cfg.merge
    # Beside the cache entry until the merge is complete (run_merge replaces the entry's directory).
    report_dir = cached / SEAM_ANALYSIS_DIR if (cached / MERGE_METRICS).is_file() else seam_report_dir(cached)
    if (report_dir / REPORT_JSON).is_file():  # chosen by an earlier attempt with the same key
        report = json.loads((report_dir / REPORT_JSON).read_text())
        slices = [tuple(s) for s in report["recommended"]["slices"]]
    else:
        log(f"merge=auto: choosing the seam to {m.target_layers} layers from the base model's layer similarity")
        d = cfg.data
        splits = RecordSplits.from_data(d)
        log(f"merge=auto: scoring on {splits.describe()}")
        result = recommend_seam(base_dir, target_layers=m.target_layers, top_k=m.auto_top_k,
                                data_files=list(d.cpt_files), num_tokens=m.auto_tokens,
                                heldout_fraction=d.heldout_fraction, selection_fraction=d.selection_fraction,
                                text_column=d.text_column, txt_document_separator=d.txt_document_separator,
                                max_record_chars=d.max_record_chars, tokens_field="merge.auto_tokens",
                                fraction_field="data.selection_fraction",
                                out_dir=report_dir, model_ref=cfg.model.name_or_path, time_plain_forward=False)
        report = json.loads((report_dir / REPORT_JSON).read_text())
        slices = list(result.slices)
    chosen = replace(m, merge_method="passthrough", target_layers=None,
                     slices=[OutputSlice(sources=[InputSlice(model=base_dir, layer_range=[lo, hi])]) for lo, hi in slices])
    log(f"merge=auto: {' + '.join(f'[{lo}, {hi})' for lo, hi in slices)} (report: {report_dir / REPORT_MD})")
    summary = {"target_layers": m.target_layers, "slices": [list(s) for s in slices], "report": SEAM_ANALYSIS_DIR,
               **{k: report.get(k) for k in ("spearman_rho", "spearman_n", "spearman_over", "split", "num_scored",
                                             "base_perplexity", "num_tokens")},
               "recommended": report.get("recommended"), "solar": report.get("solar")}
    return chosen, summary


class MergeStage(BaseStage):
    name = "merge"

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        if cfg.merge.merge_method == AUTO or cfg.merge.target_layers is not None:
            check_auto_merge(cfg)
            return
        if cfg.model.demo is not None:
            check_demo_slices(cfg)
        elif cfg.model.gguf_file is not None:
            # Not converted yet: the slices are checked against the depth in the GGUF's metadata.
            planned_num_layers(cfg.merge, base_layers=base_depth(cfg))
        else:
            src = cfg.model.name_or_path
            validate_merge(resolved_merge_config(cfg, src), base_model=src, allow_pickle=cfg.model.allow_pickle)

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        base = require_stage(cfg.paths.run_dir, "base", needed_by="merge")
        return [StageInput(role="base", stage="base", path=resolve_model_dir(cfg.paths.run_dir, "base", base),
                           sha256=base.key)]

    def key_config(self, cfg: PipelineConfig) -> dict:
        key = {"merge": section_for_key("merge", asdict(cfg.merge))}
        if cfg.merge.merge_method == AUTO:
            # merge=auto's result depends on the records it chose on.
            d = data_for_key(cfg, reads_preference_data=False)
            key["selection_data"] = {k: d.get(k) for k in SELECTION_DATA_FIELDS}
        return key

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        base_dir = inputs[0].path
        key = stage_key(self.name, self.key_config(cfg), inputs)
        cached = Path(cfg.paths.cache_dir) / "merges" / key[:16]
        with file_lock(cached.parent / f"{key[:16]}.lock"):
            merge_cfg, analysis = chosen_merge(cfg, base_dir, cached)
            validate_merge(merge_cfg, base_model=base_dir, allow_pickle=cfg.model.allow_pickle)
            if (cached / MERGE_METRICS).is_file():
                metrics = json.loads((cached / MERGE_METRICS).read_text())
                metrics["reused_from_cache"] = str(cached)
                log(f"merge: reusing identical merge {cached}")
            else:
                log("merge: " + ", ".join(f"[{s.sources[0].layer_range[0]}, {s.sources[0].layer_range[1]})"
                                          for s in merge_cfg.slices if s.sources) + f" -> {cached}")
                # overwrite: a merge that finished without its metrics file (a crash in between) is redone.
                metrics = run_merge(merge_cfg, cached, base_model=base_dir, allow_pickle=cfg.model.allow_pickle,
                                    trust_remote_code=cfg.model.trust_remote_code, overwrite=True)
                if analysis is not None:
                    metrics["seam_analysis"] = analysis
                    shutil.move(str(seam_report_dir(cached)), str(cached / SEAM_ANALYSIS_DIR))
                (cached / MERGE_METRICS).write_text(json.dumps(metrics, default=str))
                metrics["reused_from_cache"] = None
        link_or_copy_tree(cached, out_dir)
        (out_dir / MERGE_METRICS).unlink(missing_ok=True)
        return StageOutput(metrics=metrics)

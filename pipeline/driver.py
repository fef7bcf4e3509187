"""The driver: runs the stages in order, each only if its result is missing or out of date.

One driver process owns the run directory. It runs base, merge and eval in-process and starts
each training stage with ``accelerate launch`` on the resolved config it saved, so every rank
reads the same config and the same run directory (no per-rank Hydra composition, hydra#2070).
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import STAGES, TRAINING_STAGES, PipelineConfig
from pipeline.configio import config_to_dict, save_config
from pipeline.distributed import accelerate_launch_command, clean_child_env, format_command
from pipeline.errors import ConfigError, StageFailed
from pipeline.fsutil import atomic_output_dir, file_lock, hash_path, hash_text, link_or_copy_tree
from pipeline.manifest import (
    read_manifest, require_stage, resolve_model_dir, stage_dir, stage_key, write_manifest,
)

RESOLVED_CONFIG = "config.yaml"


def log(msg: str) -> None:
    print(f"[dus] {msg}", flush=True)


def selected_stages(cfg: PipelineConfig) -> list[str]:
    if cfg.stage == "all":
        return [s for s in STAGES if s not in (*TRAINING_STAGES, "eval") or getattr(cfg, s).enabled]
    if cfg.stage not in STAGES:
        raise ConfigError("stage", f"unknown stage '{cfg.stage}'", f"use one of: all, {', '.join(STAGES)}")
    return [cfg.stage]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the selected stages; returns the eval results (or {} when eval did not run)."""
    from pipeline.preflight import preflight

    if cfg.preflight:  # checks and estimates only: no stage runs, nothing is written here
        preflight(cfg)
        log("preflight: no problems found")
        return {}
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    preflight(cfg)
    save_config(cfg, run_dir / RESOLVED_CONFIG)
    log(f"run directory: {run_dir}")
    results: dict = {}
    for stage in selected_stages(cfg):
        t0 = time.time()
        if stage == "base":
            run_base_stage(cfg)
        elif stage == "merge":
            run_merge_stage(cfg)
        elif stage in TRAINING_STAGES:
            launch_training_stage(cfg, stage)
        elif stage == "eval":
            from pipeline.eval_stage import run_eval_stage

            results = run_eval_stage(cfg)
        log(f"{stage}: {time.time() - t0:.1f}s")
    if cfg.release.enabled and "eval" in selected_stages(cfg):
        from pipeline.release import run_release

        results["release_dir"] = str(run_release(cfg))
    report_end(cfg, results)
    return results


def report_end(cfg: PipelineConfig, results: dict) -> None:
    """Print the results table and the path of the final model."""
    from pipeline.manifest import latest_model_stage

    if results.get("eval_dir"):
        table = Path(results["eval_dir"]) / "results.md"
        if table.is_file():
            print("\n" + table.read_text(), flush=True)
        log(f"plots: {Path(results['eval_dir']) / 'training.png'}, {Path(results['eval_dir']) / 'tasks.png'}")
    try:
        stage, manifest = latest_model_stage(cfg.paths.run_dir, "eval")
        log(f"final model: {resolve_model_dir(cfg.paths.run_dir, stage, manifest)}")
    except ConfigError:
        pass
    if results.get("release_dir"):
        log(f"release (model card, mergekit_config.yml, results): {results['release_dir']}")


# --------------------------------------------------------------------------------------------- base

def base_inputs(cfg: PipelineConfig) -> tuple[str, list[dict]]:
    """(model directory or hub id of the base model, its inputs for the manifest)."""
    if cfg.model.demo is not None:
        from pipeline.demo import RecordOptions, ensure_demo_base

        # The demo base must hold out exactly the records the eval stage scores.
        path = ensure_demo_base(cfg.model.demo, Path(cfg.paths.cache_dir), heldout_fraction=cfg.data.heldout_fraction,
                                records=RecordOptions(cfg.data.txt_document_separator, cfg.data.max_record_chars))
        return str(path), [{"role": "model", "path": str(path), "sha256": hash_path(path)}]
    src = cfg.model.name_or_path
    if Path(src).is_dir():
        return src, [{"role": "model", "path": src, "sha256": hash_path(src)}]
    # A hub id: identified by name and revision (resolved to files by the merge).
    return src, [{"role": "model", "path": src, "revision": cfg.model.revision,
                  "sha256": hash_text(f"{src}@{cfg.model.revision or 'main'}")}]


def run_base_stage(cfg: PipelineConfig) -> dict:
    started = time.time()
    model_dir, inputs = base_inputs(cfg)
    config = {"model": config_to_dict(cfg)["model"]}
    key = stage_key("base", config, inputs)
    final = stage_dir(cfg.paths.run_dir, "base")
    if (m := read_manifest(final)) and m["key"] == key:
        log(f"base: up to date ({model_dir})")
        return m
    metrics = {}
    if cfg.model.demo is not None and (Path(model_dir) / "build_metrics.json").is_file():
        metrics = json.loads((Path(model_dir) / "build_metrics.json").read_text())
    with atomic_output_dir(final, overwrite=True) as tmp:
        # The base model is referenced, not copied: it may be tens of GB.
        m = write_manifest(tmp, stage="base", key=key, inputs=inputs, config=config, metrics=metrics,
                           started_at=started, model_dir=model_dir)
    log(f"base: {model_dir}")
    return m


# -------------------------------------------------------------------------------------------- merge

def resolved_merge_config(cfg: PipelineConfig, base_model_dir: str):
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


def run_merge_stage(cfg: PipelineConfig) -> dict:
    """Merge into a cache keyed by (merge config, input hashes) and link it into the run: sweep jobs
    with the same merge share one result instead of recomputing it."""
    from pipeline.merge import run_merge, validate_merge

    started = time.time()
    base = require_stage(cfg.paths.run_dir, "base", needed_by="merge")
    base_dir = resolve_model_dir(cfg.paths.run_dir, "base", base)
    merge_cfg = resolved_merge_config(cfg, base_dir)
    validate_merge(merge_cfg, base_model=base_dir, allow_pickle=cfg.model.allow_pickle)
    inputs = [{"role": "base", "stage": "base", "path": base_dir, "sha256": base["key"]}]
    config = {"merge": asdict(cfg.merge)}
    key = stage_key("merge", config, inputs)
    final = stage_dir(cfg.paths.run_dir, "merge")
    if (m := read_manifest(final)) and m["key"] == key:
        log("merge: up to date")
        return m

    cached = Path(cfg.paths.cache_dir) / "merges" / key[:16]
    with file_lock(cached.parent / f"{key[:16]}.lock"):
        if (cached / "merge_metrics.json").is_file():
            metrics = json.loads((cached / "merge_metrics.json").read_text())
            metrics["reused_from_cache"] = str(cached)
            log(f"merge: reusing identical merge {cached}")
        else:
            log("merge: " + ", ".join(f"[{s.sources[0].layer_range[0]}, {s.sources[0].layer_range[1]})"
                                      for s in cfg.merge.slices if s.sources) + f" -> {cached}")
            # overwrite: a merge that finished without its metrics file (a crash in between) is redone.
            metrics = run_merge(merge_cfg, cached, base_model=base_dir, allow_pickle=cfg.model.allow_pickle,
                                trust_remote_code=cfg.model.trust_remote_code, overwrite=True)
            (cached / "merge_metrics.json").write_text(json.dumps(metrics, default=str))
            metrics["reused_from_cache"] = None
    with atomic_output_dir(final, overwrite=True) as tmp:
        link_or_copy_tree(cached, tmp)
        (tmp / "merge_metrics.json").unlink(missing_ok=True)
        m = write_manifest(tmp, stage="merge", key=key, inputs=inputs, config=config, metrics=metrics,
                           started_at=started)
    return m


# ----------------------------------------------------------------------------------------- training

def launch_training_stage(cfg: PipelineConfig, stage: str, *, wait_for_manifest_s: float = 0) -> dict:
    """wait_for_manifest_s: on a follower node of a multi-node job the manifest is written by
    the leader's rank 0 after this node's launcher has returned (pipeline/slurm.py)."""
    from pipeline.train import last_checkpoint, resume_dir, stage_input, training_inputs, training_key

    prev_stage, prev_manifest, input_model = stage_input(cfg, stage)
    inputs = training_inputs(cfg, stage, prev_stage, prev_manifest, input_model)
    key = training_key(cfg, stage, inputs)
    final = stage_dir(cfg.paths.run_dir, stage)
    if (m := read_manifest(final)) and m["key"] == key:
        log(f"{stage}: up to date")
        return m
    if cfg.distributed.launcher == "inprocess":
        from pipeline.train import run_training_stage

        run_training_stage(cfg, stage)
    else:
        if stage == "cpt":
            from pipeline.cpt import tokenize_cpt_data_ahead

            tokenize_cpt_data_ahead(cfg, input_model)
        cmd = accelerate_launch_command(
            cfg.distributed, cfg.paths.conf_dir,
            ["pipeline.stage_main", str(Path(cfg.paths.run_dir) / RESOLVED_CONFIG), stage],
        )
        log(f"{stage}: {format_command(cmd)}")
        proc = subprocess.Popen(cmd, env=clean_child_env({"PYTHONUNBUFFERED": "1"}))
        # SIGTERM (SLURM preemption) and submitit's SIGUSR2 reach every rank through the launcher;
        # the ranks save a checkpoint and exit, and the driver reports the stage as interrupted.
        from pipeline.slurm import forward_stop_signals

        with forward_stop_signals(proc):
            proc.wait()
        if proc.returncode != 0:
            # A rank killed outright (-9: OOM killer, lost node) takes the launcher down with it:
            # torch elastic stops the other ranks. Nothing is exported; the checkpoints stay.
            resume = last_checkpoint(resume_dir(cfg, stage, inputs))
            where = f"its last complete checkpoint {resume}" if resume else "the start (no complete checkpoint yet)"
            raise StageFailed(f"stage '{stage}' failed (accelerate launch exit code {proc.returncode}); "
                              f"re-run the same command to resume from {where}")
    m = read_manifest(final)
    deadline = time.time() + wait_for_manifest_s
    while m is None and time.time() < deadline:
        time.sleep(1.0)
        m = read_manifest(final)
    if m is None:
        raise StageFailed(f"stage '{stage}' ended without writing {final}/manifest.json")
    return m

"""The driver: runs the selected stages in order, each only if its result is missing or out of date.

It alone owns what every stage has in common: the stage's key (its config and its inputs' content
hashes), skipping a stage whose manifest has that key, the temporary ``.partial`` directory renamed
into place when complete, the manifest, and the timing. The stages (``pipeline.stages``) only say
what they read, what keys them, and how to do the work.

One driver process owns the run directory. Training stages start their ranks with ``accelerate
launch`` on the resolved config saved here; the ranks train into the stage's temporary directory
and the driver writes the manifest once they have all finished.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline.checks.preflight import preflight
from pipeline.config import PipelineConfig
from pipeline.configio import save_config
from pipeline.errors import ConfigError, StageFailed
from pipeline.fsutil import atomic_output_dir, fsync_tree, partial_dir_for
from pipeline.log import log
from pipeline.manifest import (
    Manifest,
    latest_model_stage,
    model_chain,
    new_manifest,
    read_manifest,
    resolve_model_dir,
    stage_dir,
    stage_key,
    write_manifest,
)
from pipeline.stages import selected_stages, training_stage
from pipeline.stages.eval import objective
from pipeline.stages.stage import Stage
from pipeline.training.distributed import init_distributed_state
from pipeline.training.launch import RESOLVED_CONFIG, run_ranks
from pipeline.training.runner import run_training_on_rank


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the selected stages. Returns {"objective", "eval_dir", "release_dir"} where they ran."""
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
        manifest = run_stage(stage, cfg)
        if stage.name == "eval":
            results.update(objective=objective(manifest.metrics), eval_dir=str(stage_dir(run_dir, "eval")))
        elif stage.publishes:
            results[f"{stage.name}_dir"] = manifest.model_dir
        log(f"{stage.name}: {time.time() - t0:.1f}s")
    report_end(cfg, results)
    return results


def run_stage(stage: Stage, cfg: PipelineConfig) -> Manifest:
    """Run one stage unless its result is up to date; returns its manifest."""
    started = time.time()
    if stage.publishes:  # not keyed, writes its own directory (see pipeline.stages.stage)
        out = stage.run(cfg, inputs=[])
        return new_manifest(stage=stage.name, key="", inputs=[], config={}, metrics=out.metrics,
                            started_at=started, model_dir=out.model_dir)
    inputs = stage.inputs(cfg)
    handed_on = [i.stage for i in inputs if i.role == "model" and i.stage]
    if handed_on:  # which models of this run's chain the stage reads (a stage turned off is not among them)
        log(f"{stage.name}: model(s) of {', '.join(handed_on)} (chain: {', '.join(model_chain(cfg))})")
    config = stage.key_config(cfg)
    key = stage_key(stage.name, config, inputs)
    final = stage_dir(cfg.paths.run_dir, stage.name)
    if (m := read_manifest(final)) and m.key == key:
        log(f"{stage.name}: up to date" + (f" ({m.model_dir})" if stage.name == "base" else ""))
        return m
    if stage.resumes_partial and partial_dir_for(final).is_dir():
        log(f"{stage.name}: continuing in {partial_dir_for(final)} (what an earlier attempt finished is kept)")
    with atomic_output_dir(final, overwrite=True, resume=stage.resumes_partial) as out_dir:
        out = stage.run(cfg, inputs=inputs, out_dir=out_dir)
        # The manifest is the last file written: a directory without one is never taken for finished.
        return write_manifest(out_dir, new_manifest(stage=stage.name, key=key, inputs=inputs, config=config,
                                                    metrics=out.metrics, started_at=started, model_dir=out.model_dir))


def report_end(cfg: PipelineConfig, results: dict) -> None:
    """Print the results table and the path of the final model."""
    if results.get("eval_dir"):
        table = Path(results["eval_dir"]) / "results.md"
        if table.is_file():
            print("\n" + table.read_text(), flush=True)
        log(f"plots: {Path(results['eval_dir']) / 'training.png'}, {Path(results['eval_dir']) / 'tasks.png'}")
    try:
        stage, manifest = latest_model_stage(cfg.paths.run_dir, "eval", model_chain(cfg))
        log(f"final model: {resolve_model_dir(cfg.paths.run_dir, stage, manifest)}")
    except ConfigError:
        pass
    if results.get("release_dir"):
        log(f"release (model card, mergekit_config.yml, results): {results['release_dir']}")


# ----------------------------------------------------------------------- training stages, per rank


def run_training_under_launcher(cfg: PipelineConfig) -> None:
    """``accelerate launch -m pipeline stage=cpt``: the user started the ranks, so every rank runs
    this; rank 0 does the driver's part (temporary directory, manifest, rename) around the training."""
    stage = training_stage(cfg.stage)
    state = init_distributed_state()
    inputs = stage.inputs(cfg)
    config = stage.key_config(cfg)
    key = stage_key(stage.name, config, inputs)
    final = stage_dir(cfg.paths.run_dir, stage.name)
    if (m := read_manifest(final)) and m.key == key:
        if state.is_main_process:
            log(f"{stage.name}: up to date")
        return
    started = time.time()
    partial = partial_dir_for(final)
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    state.wait_for_everyone()
    metrics = run_training_on_rank(stage, cfg, out_dir=partial)
    if state.is_main_process:
        write_manifest(partial, new_manifest(stage=stage.name, key=key, inputs=inputs, config=config, metrics=metrics,
                                             started_at=started))
        fsync_tree(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    state.wait_for_everyone()


def join_training_stage(cfg: PipelineConfig, stage_name: str, *, wait_for_manifest_s: float) -> Manifest:
    """A follower node's part of a training stage (pipeline.cluster.slurm): start this node's ranks
    into the leader's temporary directory, then wait for the leader's manifest (its rank 0 writes it
    after this node's launcher has returned)."""
    stage = training_stage(stage_name)
    final = stage_dir(cfg.paths.run_dir, stage.name)
    key = stage_key(stage.name, stage.key_config(cfg), stage.inputs(cfg))
    if (m := read_manifest(final)) and m.key == key:
        log(f"{stage.name}: up to date")
        return m
    run_ranks(stage, cfg, out_dir=partial_dir_for(final))
    deadline = time.time() + wait_for_manifest_s
    while not ((m := read_manifest(final)) and m.key == key) and time.time() < deadline:
        time.sleep(1.0)
    if m is None or m.key != key:
        raise StageFailed(f"stage '{stage.name}' ended without the leader writing {final}/manifest.json")
    return m

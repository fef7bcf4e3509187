"""A training stage on one rank: what cpt and sft (and any later training stage) share.

``run_training_on_rank(stage, cfg, out_dir=...)`` runs on every rank under ``accelerate launch`` (or
alone in-process), in named steps:

1. ``prepare``: distributed state, the input model from the previous stage's manifest, precision,
   attention, the DeepSpeed config and the resume plan (a checkpoint of this stage's own key, maybe
   of another world size);
2. the stage's own ``build_trainer`` (data, model, Trainer) and ``add_callbacks`` (throughput/MFU,
   SIGTERM -> checkpoint, checkpoint bookkeeping);
3. ``train`` (resuming), stopping at a checkpoint on SIGTERM;
4. ``export_and_verify``: save the consolidated model into ``out_dir``, compute a fixed batch's loss
   with the in-memory (possibly ZeRO-3-sharded) model on every rank, and on rank 0 reload the saved
   directory in a fresh process and require the same loss;
5. rank 0 writes the stage's metrics to ``out_dir/TRAINING_METRICS``; the driver turns them into the
   manifest and renames ``out_dir`` into place.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from pipeline import metric_names as M
from pipeline.config import PipelineConfig
from pipeline.fsutil import atomic_write_json, disk_full_guard
from pipeline.manifest import StageInput, stage_dir
from pipeline.training.callbacks import ConsumedTokens, heldout_curve, PreemptionCallback, ThroughputCallback, training_flops_per_token, use_line_progress
from pipeline.training.distributed import init_distributed_state, load_deepspeed_config
from pipeline.training.model import (
    attn_implementation,
    carry_tokenizer_source_files,
    finalize_model_files,
    numel,
    use_bf16,
    weights_dtype,
)
from pipeline.training.resume import (
    CheckpointBookkeeping,
    FaultInjection,
    ResumePlan,
    complete_checkpoints,
    plan_resume,
    resume_key,
)
from pipeline.training.verify import fixed_batch_loss, loss_in_fresh_process, verify_in_fresh_process


class TrainerSetupLike(Protocol):
    """``pipeline.stages.stage.TrainerSetup`` as the runner uses it (the stage layer sits above this one)."""

    trainer: Any
    collator: Any
    fixed_batch: dict
    data_stats: dict
    seq_len: int
    saves_adapter: bool


def write_rank_record(log_dir: Path, *, stage: str, served: list[int], world_size: int, rank: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(log_dir / f"rank_{rank}.json", {
        "stage": stage, "rank": rank, "world_size": world_size,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "pid": os.getpid(),
        "host": os.uname().nodename, "served_indices": served,
    })


def write_log_history(log_dir: Path, history: list[dict]) -> None:
    """The Trainer's log history as JSON and CSV: local logs whatever ``report_to`` says."""
    import csv

    (log_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    columns = sorted({k for row in history for k in row}, key=lambda k: (k not in ("step", "epoch"), k))
    with open(log_dir / "log_history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


TRAINING_METRICS = "training_metrics.json"


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes ``checkpoint-N/`` in place, each rank its
    own shards, so a save cut short (disk full, kill -9) leaves a directory that transformers'
    get_last_checkpoint would take (it only looks for the name; even ``trainer_state.json`` is
    written by rank 0 before the other ranks are done). Complete = marked by
    ``pipeline.resume.CheckpointBookkeeping`` after a barrier."""
    complete = complete_checkpoints(checkpoint_dir)
    return str(complete[-1][1]) if complete else None


def resume_dir(stage, cfg: PipelineConfig, inputs: list[StageInput]) -> Path:
    """Where a stage's checkpoints live. Keyed like the result (a changed config or input never
    resumes stale state) except for the world size: a re-run on another number of processes resumes."""
    key = resume_key(stage.name, stage.key_config(cfg), inputs)
    return stage_dir(cfg.paths.run_dir, stage.name).parent / "checkpoints" / stage.name / key[:16]


@dataclass
class RankContext:
    """What every step of a training stage on this rank needs, computed once by ``prepare``."""

    stage: Any  # pipeline.stages.stage.TrainingStage
    cfg: PipelineConfig  # with gradient accumulation adapted to a resume on another world size
    state: Any  # accelerate PartialState
    input_model: str
    prev_stage: str
    ds_config: Optional[dict]
    bf16: bool
    attn: str
    checkpoint_dir: Path
    plan: ResumePlan

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def tc(self):
        return self.stage.section(self.cfg)

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.stage.name}] {msg}", flush=True)


def prepare(stage, cfg: PipelineConfig) -> RankContext:
    state = init_distributed_state()
    tc = stage.section(cfg)
    inputs = stage.inputs(cfg)
    model_input = next(i for i in inputs if i.role == "model")
    deepspeed = state.num_processes > 1 or state.distributed_type.name == "DEEPSPEED"
    ds_config = load_deepspeed_config(cfg.distributed, cfg.paths.conf_dir) if deepspeed else None
    checkpoint_dir = resume_dir(stage, cfg, inputs)
    # Before the Trainer exists: loading a checkpoint of another world size changes the DeepSpeed
    # config (universal checkpoint) and gradient accumulation (same global batch).
    plan = plan_resume(checkpoint_dir, stage=stage.name, world_size=state.num_processes, deepspeed=ds_config is not None,
                       per_device_train_batch_size=tc.per_device_train_batch_size,
                       gradient_accumulation_steps=tc.gradient_accumulation_steps, is_main=state.is_main_process,
                       barrier=state.wait_for_everyone,
                       log=(lambda m: print(m, flush=True)) if state.is_main_process else (lambda m: None))
    if plan.gradient_accumulation_steps != tc.gradient_accumulation_steps:
        cfg = replace(cfg, **{stage.name: replace(tc, gradient_accumulation_steps=plan.gradient_accumulation_steps)})
    if plan.load_universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return RankContext(stage=stage, cfg=cfg, state=state, input_model=model_input.path, prev_stage=model_input.stage,
                       ds_config=ds_config, bf16=use_bf16(tc.bf16, deepspeed=ds_config is not None), attn=attn_implementation(tc.attn_implementation),
                       checkpoint_dir=checkpoint_dir, plan=plan)


def add_callbacks(ctx: RankContext, setup: TrainerSetupLike) -> tuple[ConsumedTokens, PreemptionCallback, dict]:
    """Consumed-token counts, throughput/MFU, SIGTERM -> checkpoint, fault injection (tests),
    checkpoint bookkeeping."""
    model, tc = setup.trainer.model, ctx.tc
    n_params = sum(numel(p) for p in model.parameters())
    n_trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    tokens_per_device_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * setup.seq_len
    consumed = ConsumedTokens(setup.trainer, pad_token_id=getattr(setup.trainer.processing_class, "pad_token_id", None),
                              resumed_from=ctx.plan.checkpoint)
    setup.trainer.add_callback(consumed)
    throughput = ThroughputCallback(consumed=consumed, world_size=ctx.world,
                                    flops_per_token=training_flops_per_token(model.config, n_params, setup.seq_len))
    setup.trainer.add_callback(throughput)
    use_line_progress(setup.trainer, ctx.stage.name)
    zero = ctx.ds_config["zero_optimization"]["stage"] if ctx.ds_config else None
    ctx.log(f"input: {ctx.input_model} (from stage '{ctx.prev_stage}') | ranks: {ctx.world} | ZeRO: "
            f"{zero if zero is not None else 'off'} | precision: {'bf16' if ctx.bf16 else 'fp32'} | "
            f"attention: {ctx.attn} | params: {n_params:,} ({n_trainable:,} trainable) | "
            f"tokens/step at most: {tokens_per_device_step * ctx.world:,} | peak: {throughput.peak_note} | data: {setup.data_stats}")
    preemption = PreemptionCallback()
    setup.trainer.add_callback(preemption)
    if (fault := FaultInjection.from_env(ctx.state.process_index)) is not None:
        setup.trainer.add_callback(fault)  # before the bookkeeping: a kill "during the save" lands before the mark
    setup.trainer.add_callback(CheckpointBookkeeping(
        world_size=ctx.world, zero_stage=zero, keep=tc.save_total_limit, is_main=ctx.is_main,
        barrier=ctx.state.wait_for_everyone, per_device_train_batch_size=tc.per_device_train_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps))
    sizes = {M.NUM_PARAMETERS: n_params, M.TRAINABLE_PARAMETERS: n_trainable, M.ZERO_STAGE: zero}
    return consumed, preemption, sizes


def train(ctx: RankContext, setup: TrainerSetupLike, preemption: PreemptionCallback):
    """``Trainer.train``, resuming from the plan's checkpoint; on SIGTERM every rank has saved a
    checkpoint at the same step and the process exits 143 (nothing exported; a re-run resumes)."""
    # A checkpoint save that runs out of space ends as one clear error naming the directory.
    with disk_full_guard(ctx.checkpoint_dir):
        result = setup.trainer.train(resume_from_checkpoint=ctx.plan.checkpoint)
    if preemption.stopped_at is not None:
        ctx.state.wait_for_everyone()
        ctx.log(f"SIGTERM: checkpoint saved at step {preemption.stopped_at} in {ctx.checkpoint_dir}; "
                f"run the same command again to resume")
        sys.exit(128 + signal.SIGTERM)
    return result


def export_and_verify(ctx: RankContext, setup: TrainerSetupLike, out_dir: Path, tokenizer) -> Optional[dict]:
    """Save the model into ``out_dir`` and prove the saved files are the trained model (rank 0's
    result; None on the other ranks)."""
    # Every rank takes part: ZeRO-3 gathers the sharded weights collectively for both calls.
    save_target = out_dir / "adapter" if setup.saves_adapter else out_dir
    with disk_full_guard(save_target):
        setup.trainer.save_model(str(save_target))
    model = setup.trainer.model
    if ctx.bf16 and weights_dtype(ctx.bf16) == torch.float32:
        # bf16 autocast on a CPU wraps forward; the export holds the fp32 weights: compare those, in fp32.
        model = setup.trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    trained_loss = fixed_batch_loss(model, setup.fixed_batch)
    ctx.state.wait_for_everyone()
    if not ctx.is_main:
        return None
    batch_file = out_dir / "logs" / "fixed_batch.json"
    batch_file.write_text(json.dumps(setup.fixed_batch))
    if setup.saves_adapter:
        tokenizer.save_pretrained(out_dir)
    verification = verify_in_fresh_process(out_dir, batch_file, expected_loss=trained_loss, bf16=weights_dtype(ctx.bf16) == torch.bfloat16, attn=ctx.attn,
                                           merge_adapter_onto=ctx.input_model if setup.saves_adapter else None)
    finalize_model_files(out_dir, tokenizer)
    carry_tokenizer_source_files(input_dir=ctx.input_model, model_dir=out_dir)
    # Trainer.save_model also writes its arguments as a pickle; that is resume state, not model.
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    return verification


# The model files of a checkpoint (what Trainer.save_model wrote into it), as opposed to its resume state.
_CHECKPOINT_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "adapter_config.json")


def export_from_checkpoint(ctx: RankContext, setup: TrainerSetupLike, out_dir: Path, tokenizer) -> Optional[dict]:
    """The export when the plan's checkpoint was saved at the last step: its model files (written by
    the same ``Trainer.save_model`` as an export) copied into ``out_dir``, then the copy reloaded in a
    fresh process must give the checkpoint's own fixed-batch loss (rank 0's result; None elsewhere)."""
    import shutil
    import tempfile

    checkpoint = Path(ctx.plan.checkpoint)
    target = out_dir / "adapter" if setup.saves_adapter else out_dir
    model_files = [f for f in sorted(checkpoint.iterdir()) if f.is_file()
                   and (f.suffix == ".safetensors" or f.name in _CHECKPOINT_MODEL_FILES)]
    if ctx.is_main:
        target.mkdir(parents=True, exist_ok=True)
        with disk_full_guard(target):
            for f in model_files:
                shutil.copy2(f, target / f.name)
    ctx.state.wait_for_everyone()
    if not ctx.is_main:
        return None
    batch_file = out_dir / "logs" / "fixed_batch.json"
    batch_file.parent.mkdir(parents=True, exist_ok=True)
    batch_file.write_text(json.dumps(setup.fixed_batch))
    bf16 = weights_dtype(ctx.bf16) == torch.bfloat16
    merge_onto = ctx.input_model if setup.saves_adapter else None
    if setup.saves_adapter:  # the checkpoint's adapter merged in a scratch copy (the merge rewrites its directory)
        with tempfile.TemporaryDirectory(dir=out_dir / "logs") as scratch:
            shutil.copytree(target, Path(scratch) / "adapter")
            expected = loss_in_fresh_process(Path(scratch), batch_file, bf16=bf16, attn=ctx.attn, merge_adapter_onto=merge_onto)
        tokenizer.save_pretrained(out_dir)
    else:
        expected = loss_in_fresh_process(checkpoint, batch_file, bf16=bf16, attn=ctx.attn)
    verification = verify_in_fresh_process(out_dir, batch_file, expected_loss=expected, bf16=bf16, attn=ctx.attn,
                                           merge_adapter_onto=merge_onto)
    verification["exported_from_checkpoint"] = str(checkpoint)
    finalize_model_files(out_dir, tokenizer)
    carry_tokenizer_source_files(input_dir=ctx.input_model, model_dir=out_dir)
    return verification


def run_training_on_rank(stage, cfg: PipelineConfig, *, out_dir: Path) -> Optional[dict]:
    """Train ``stage`` on this rank into ``out_dir`` (created by the caller, shared by all ranks).
    Returns the stage's metrics on rank 0 (also written to ``out_dir/TRAINING_METRICS``), else None."""
    from transformers import AutoTokenizer

    # DeepSpeed calls a torch API deprecated in 2.13 on every ZeRO step; one line per step buries the logs.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    ctx = prepare(stage, cfg)
    tokenizer = AutoTokenizer.from_pretrained(ctx.input_model, trust_remote_code=cfg.model.trust_remote_code)
    with disk_full_guard(cfg.paths.cache_dir):  # the tokenized-data cache is written there
        setup = stage.build_trainer(ctx.cfg, tokenizer=tokenizer, input_model=ctx.input_model,
                                    checkpoint_dir=ctx.checkpoint_dir, ds_config=ctx.ds_config, bf16=ctx.bf16, attn=ctx.attn)
    consumed, preemption, sizes = add_callbacks(ctx, setup)
    if ctx.plan.at_last_step:  # nothing left to train: the checkpoint is the trained model
        state = json.loads((Path(ctx.plan.checkpoint) / "trainer_state.json").read_text())
        train_metrics, global_step, log_history = {}, int(state["global_step"]), state.get("log_history", [])
    else:
        result = train(ctx, setup, preemption)
        train_metrics, global_step = result.metrics, setup.trainer.state.global_step
        log_history = setup.trainer.state.log_history
    tokens = consumed.totals()  # every rank: a collective
    write_rank_record(out_dir / "logs", stage=stage.name, served=setup.collator.served, world_size=ctx.world,
                      rank=ctx.state.process_index)
    if ctx.plan.at_last_step:
        verification = export_from_checkpoint(ctx, setup, out_dir, tokenizer)
    else:
        verification = export_and_verify(ctx, setup, out_dir, tokenizer)
    metrics = None
    if ctx.is_main:
        write_log_history(out_dir / "logs", log_history)
        metrics = {
            **{k: v for k, v in train_metrics.items() if isinstance(v, (int, float))},
            M.GLOBAL_STEP: global_step,
            M.WORLD_SIZE: ctx.world,
            M.NUM_PARAMETERS: sizes[M.NUM_PARAMETERS],
            M.TRAINABLE_PARAMETERS: sizes[M.TRAINABLE_PARAMETERS],
            M.TOKENS_SEEN: tokens["input_tokens"],
            M.TRAINED_TOKENS: tokens["trained_tokens"],
            M.TOKENS_COUNTED_FROM_STEP: tokens["counted_from_step"],
            M.PRECISION: "bf16" if ctx.bf16 else "fp32",
            M.ATTN_IMPLEMENTATION: ctx.attn,
            M.ZERO_STAGE: sizes[M.ZERO_STAGE],
            M.RESUMED_FROM: ctx.plan.checkpoint,
            M.RESUME: ctx.plan.metrics(),
            M.VERIFICATION: verification,
            M.HELDOUT_CURVE: heldout_curve(log_history),
            **{f"data_{k}": v for k, v in setup.data_stats.items()},
        }
        atomic_write_json(out_dir / TRAINING_METRICS, metrics)
        ctx.log(f"done | train loss {metrics.get(M.TRAIN_LOSS, float('nan')):.4f} | "
                f"verified reload: |diff| {verification['abs_diff']:.2e}")
    ctx.state.wait_for_everyone()
    return metrics

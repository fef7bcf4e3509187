"""Resume state of a training stage: which checkpoint can be trusted, keeping the last K, and
resuming on a different number of processes. See docs/resume.md.

Checkpoints live in ``<run_dir>/checkpoints/<stage>/<key16>/checkpoint-N`` (the exported model of
a stage is elsewhere: ``<run_dir>/02_cpt``). The Trainer writes ``checkpoint-N`` in place, each
rank its own ZeRO shards and RNG state, so a process killed during a save leaves a directory that
looks like a checkpoint but is not one. A checkpoint is trusted only when it holds
``dus_checkpoint.json``, written by rank 0 after every rank has finished its part (a barrier in
``CheckpointBookkeeping.on_save``). That file also records the world size that wrote it, so a
change of world size is detected without reading DeepSpeed's internals.

A ZeRO checkpoint is partitioned over the ranks that wrote it and DeepSpeed refuses to load it on
another data-parallel world size. Then the checkpoint is converted once into a DeepSpeed universal
checkpoint (``deepspeed.checkpoint.ds_to_universal``: weights and Adam moments per parameter,
independent of the partitioning) and loaded with ``"checkpoint": {"load_universal": true}``: the
weights, optimizer state, LR schedule and step counter all carry over. The global batch is kept
by scaling gradient accumulation (2 ranks x 1 micro-batch -> 1 rank x 2 micro-batches), so the
remaining steps see the same samples in the same order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from pipeline.errors import ConfigError, StageFailed
from pipeline.fsutil import atomic_write_json, atomic_write_text, fsync_tree
from pipeline.manifest import stage_key
from pipeline.training.distributed import clean_child_env

CHECKPOINT_INFO = "dus_checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Fault injection for the tests (tests/test_resume.py): "RANK:STEP" makes that rank SIGKILL itself
# at the end of that optimizer step; "RANK:STEP:save" does it inside the save of checkpoint-STEP,
# after the Trainer wrote this rank's files and before the checkpoint is marked complete.
KILL_ENV = "DUS_TEST_KILL_RANK_AT_STEP"


def resume_key(stage: str, stage_config: dict, inputs: list[dict]) -> str:
    """Key of a stage's resume state: its result key without the world size, so that a run
    re-launched on another number of processes finds the checkpoints of the interrupted one."""
    config = json.loads(json.dumps(stage_config, default=str))
    for name in ("num_processes", "num_machines"):
        config.get("distributed", {}).pop(name, None)
    return stage_key(stage, config, inputs)


def checkpoint_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` directories, oldest step first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def checkpoint_info(path: Path) -> dict | None:
    """Our record of a complete checkpoint, or None when the save did not finish."""
    try:
        return json.loads((path / CHECKPOINT_INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path, dict]]:
    return [(step, p, info) for step, p in checkpoint_dirs(checkpoint_dir) if (info := checkpoint_info(p)) is not None]


def discard_incomplete(checkpoint_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Remove checkpoint directories whose save never finished: the Trainer would otherwise write
    into them again at that step, next to stale shards."""
    removed = []
    for _, p in checkpoint_dirs(checkpoint_dir):
        if checkpoint_info(p) is None:
            log(f"ignoring {p}: incomplete ({CHECKPOINT_INFO} missing: a process died while it was being saved); removed")
            shutil.rmtree(p)
            removed.append(p)
    return removed


def rotate(checkpoint_dir: Path, keep: int | None) -> list[Path]:
    """Keep the last ``keep`` complete checkpoints (None or <= 0: keep all)."""
    if not keep or keep <= 0:
        return []
    old = complete_checkpoints(checkpoint_dir)[:-keep]
    for _, p, _ in old:
        shutil.rmtree(p)
    return [p for _, p, _ in old]


class CheckpointBookkeeping(TrainerCallback):
    """After each save: wait for every rank, mark the checkpoint complete, keep the last K.

    The Trainer's own ``save_total_limit`` is off (``trainer_kwargs``): it deletes old checkpoints
    right after rank 0's part of the new one is written, before the other ranks are done - a kill
    at that moment (with K=1) would leave no usable checkpoint at all.
    """

    def __init__(self, *, world_size: int, zero_stage: int | None, keep: int | None, is_main: bool,
                 barrier: Callable[[], None], per_device_train_batch_size: int, gradient_accumulation_steps: int):
        self.world_size, self.zero_stage, self.keep = world_size, zero_stage, keep
        self.is_main, self.barrier = is_main, barrier
        self.per_device_train_batch_size, self.gradient_accumulation_steps = per_device_train_batch_size, gradient_accumulation_steps

    def on_save(self, args, state, control, **kw):
        self.barrier()  # every rank has written its shards and RNG state
        if self.is_main:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            fsync_tree(path)
            atomic_write_json(path / CHECKPOINT_INFO, {
                "global_step": state.global_step,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "per_device_train_batch_size": self.per_device_train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "saved_at": time.time(),
            })
            rotate(Path(args.output_dir), self.keep)
        self.barrier()


class FaultInjection(TrainerCallback):
    """Test hook (``DUS_TEST_KILL_RANK_AT_STEP``): one rank dies by SIGKILL, as an OOM kill or a
    lost node would take it - no Python exception, no cleanup, no flush."""

    def __init__(self, step: int, phase: str):
        self.step, self.phase = step, phase

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjection | None":
        spec = os.environ.get(KILL_ENV)
        if not spec:
            return None
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("step", "save")):
            raise ConfigError(KILL_ENV, f"'{spec}' is not RANK:STEP or RANK:STEP:save")
        return cls(int(parts[1]), parts[2] if len(parts) == 3 else "step") if int(parts[0]) == rank else None

    def _kill(self, where: str):
        print(f"[fault injection] rank pid {os.getpid()}: SIGKILL {where} at step {self.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kw):
        if self.phase == "step" and state.global_step == self.step:
            self._kill("at the end of the step")

    def on_save(self, args, state, control, **kw):
        if self.phase == "save" and state.global_step == self.step:
            self._kill("during the save, before the checkpoint is marked complete")


@dataclass
class ResumePlan:
    checkpoint: str | None
    # "fresh start" | "same world size" | "universal checkpoint (world size changed)"
    method: str
    written_by_world_size: int | None
    world_size: int
    gradient_accumulation_steps: int
    load_universal: bool = False
    note: str = ""
    # The checkpoint was saved at the stage's last step: nothing is left to train, the export is
    # copied from it (the Trainer would otherwise train one step past max_steps when resumed there).
    at_last_step: bool = False

    def metrics(self) -> dict:
        return asdict(self)


def plan_resume(checkpoint_dir: Path, *, stage: str, world_size: int, deepspeed: bool, per_device_train_batch_size: int,
                gradient_accumulation_steps: int, is_main: bool, barrier: Callable[[], None],
                log: Callable[[str], None]) -> ResumePlan:
    """Pick the last complete checkpoint and decide how to load it. Called on every rank."""
    if is_main:
        discard_incomplete(checkpoint_dir, log)
    barrier()
    complete = complete_checkpoints(checkpoint_dir)
    if not complete:
        return ResumePlan(None, "fresh start", None, world_size, gradient_accumulation_steps)
    step, path, info = complete[-1]
    old_world = int(info["world_size"])
    last = last_step_of(path)
    if last is not None and step >= last:
        log(f"[{stage}] {path} was saved at the last step ({step} of {last}): exporting it without training")
        return ResumePlan(str(path), "checkpoint at the last step (exported, not trained)", old_world, world_size,
                          gradient_accumulation_steps, at_last_step=True)
    if old_world == world_size:
        plan = ResumePlan(str(path), "same world size", old_world, world_size, gradient_accumulation_steps)
        log(f"[{stage}] resuming from {path} (step {step}, written by {old_world} process(es), same as this run)")
        return plan
    if not deepspeed:
        raise ConfigError("distributed.num_processes",
                          f"{path} was written by {old_world} processes with DeepSpeed; this run has {world_size} without it",
                          f"run with the accelerate launcher, or remove {checkpoint_dir} to start over")
    # Same global batch as the interrupted run when it divides evenly: same samples per step.
    old_global = int(info["per_device_train_batch_size"]) * int(info["gradient_accumulation_steps"]) * old_world
    per_step = per_device_train_batch_size * world_size
    accum, note = gradient_accumulation_steps, ""
    if old_global % per_step == 0:
        accum = old_global // per_step
        note = (f"global batch kept at {old_global} sequences: gradient_accumulation_steps {gradient_accumulation_steps} "
                f"-> {accum} for the rest of this stage")
    else:
        note = (f"global batch {old_global} is not a multiple of {per_step} (per-device batch x processes): the rest "
                f"of this stage runs with {per_device_train_batch_size * gradient_accumulation_steps * world_size} "
                f"sequences per step, and the data position after the resume is approximate")
    log(f"[{stage}] {path.name} was written by {old_world} processes, this run has {world_size}: converting it to a "
        f"DeepSpeed universal checkpoint and resuming from step {step} with its optimizer state; {note}")
    if is_main:
        to_universal(path, log=log)
    barrier()
    return ResumePlan(str(path), "universal checkpoint (world size changed)", old_world, world_size, accum,
                      load_universal=True, note=note)


def last_step_of(checkpoint: Path) -> int | None:
    """The step the run that wrote ``checkpoint`` was to end at (the Trainer's ``max_steps`` in its
    trainer_state.json), or None when it is not recorded."""
    try:
        max_steps = int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("max_steps") or 0)
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return None
    return max_steps if max_steps > 0 else None


def to_universal(checkpoint: Path, *, log: Callable[[str], None]) -> Path:
    """Convert ``checkpoint/global_stepN`` into ``checkpoint/global_stepN_universal`` once (rank 0).

    Written under a hidden name and renamed, so an interrupted conversion is redone, never used.
    """
    tag = (checkpoint / "latest").read_text().strip()
    out = checkpoint / f"{tag}_universal"
    if out.is_dir() and (checkpoint / "latest_universal").is_file() \
            and (checkpoint / "latest_universal").read_text().strip() == out.name:
        return out
    tmp = checkpoint / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint / tag),
           "--output_folder", str(tmp), "--inject_missing_state"]
    proc = subprocess.run(cmd, env=clean_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"converting {checkpoint / tag} to a universal checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    fsync_tree(tmp)
    os.rename(tmp, out)
    # ds_to_universal pointed latest_universal at the temporary name.
    atomic_write_text(checkpoint / "latest_universal", out.name)
    log(f"universal checkpoint written: {out} ({time.time() - t0:.1f}s)")
    return out

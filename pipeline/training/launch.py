"""Starting a training stage's ranks from the driver: ``accelerate launch`` (DeepSpeed ZeRO, one or
many machines) or, with ``distributed.launcher=inprocess``, the driver's own process.

The ranks run ``python -m pipeline.stage_main RESOLVED_CONFIG STAGE OUT_DIR`` on the config the
driver saved, so every rank reads the same config and the same run directory (no per-rank Hydra
composition, hydra#2070), and they train into the directory the driver made for the stage.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import StageFailed
from pipeline.log import log
from pipeline.training.distributed import accelerate_launch_command, clean_child_env, format_command
from pipeline.training.runner import TRAINING_METRICS, last_checkpoint, resume_dir, run_training_on_rank

RESOLVED_CONFIG = "config.yaml"  # the driver's resolved config in the run directory


def launch_training(stage, cfg: PipelineConfig, *, out_dir: Path) -> dict:
    """Train ``stage`` into ``out_dir`` and return its metrics (rank 0's ``TRAINING_METRICS``)."""
    if cfg.distributed.launcher == "inprocess":
        return run_training_on_rank(stage, cfg, out_dir=out_dir)
    stage.prepare_before_launch(cfg, input_model=next(i.path for i in stage.inputs(cfg) if i.role == "model"))
    run_ranks(stage, cfg, out_dir=out_dir)
    metrics_file = out_dir / TRAINING_METRICS
    if not metrics_file.is_file():
        raise StageFailed(f"stage '{stage.name}' ended without writing {metrics_file}")
    metrics = json.loads(metrics_file.read_text())
    metrics_file.unlink()  # now the manifest's
    return metrics


def run_ranks(stage, cfg: PipelineConfig, *, out_dir: Path) -> None:
    """``accelerate launch`` this machine's ranks of ``stage`` and wait for them."""
    cmd = accelerate_launch_command(
        cfg.distributed, cfg.paths.conf_dir,
        ["pipeline.stage_main", str(Path(cfg.paths.run_dir) / RESOLVED_CONFIG), stage.name, str(out_dir)],
    )
    log(f"{stage.name}: {format_command(cmd)}")
    proc = subprocess.Popen(cmd, env=clean_child_env({"PYTHONUNBUFFERED": "1"}))
    # SIGTERM (SLURM preemption) and submitit's SIGUSR2 reach every rank through the launcher;
    # the ranks save a checkpoint and exit, and the driver reports the stage as interrupted.
    with forward_stop_signals(proc):
        proc.wait()
    if proc.returncode != 0:
        # A rank killed outright (-9: OOM killer, lost node) takes the launcher down with it:
        # torch elastic stops the other ranks. Nothing is exported; the checkpoints stay.
        resume = last_checkpoint(resume_dir(stage, cfg, stage.inputs(cfg)))
        where = f"its last complete checkpoint {resume}" if resume else "the start (no complete checkpoint yet)"
        raise StageFailed(f"stage '{stage.name}' failed (accelerate launch exit code {proc.returncode}); "
                          f"re-run the same command to resume from {where}")


@contextlib.contextmanager
def forward_stop_signals(proc: subprocess.Popen):
    """While ``proc`` (the stage's ``accelerate launch``) runs, stop it for a checkpoint on:

    - SIGTERM (SLURM's scancel, preemption, time limit): forwarded; the ranks save and exit, and
      the driver reports the stage as interrupted.
    - SIGUSR2, submitit's "time limit / preemption in signal_delay_s" signal: forwarded as SIGTERM,
      and only once the ranks have saved and exited is the signal handed to the handler that was
      there before (submitit's: pickle the job and requeue it). Without this, submitit requeues
      at once and the ranks get SLURM's SIGTERM with only KillWait (often 30 s) to save.
    """
    usr2: list[int] = []

    def on_usr2(signum, frame):
        usr2.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM)),
                signal.SIGUSR2: signal.signal(signal.SIGUSR2, on_usr2)}
    try:
        yield
        if usr2 and proc.poll() is None:
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if usr2:
        before = previous[signal.SIGUSR2]
        log("SIGUSR2: the training stage has stopped at a checkpoint; handing the signal on")
        if callable(before):
            before(signal.SIGUSR2, None)  # submitit: requeue (it exits this process)
        elif before == signal.SIG_DFL:
            signal.raise_signal(signal.SIGUSR2)  # what USR2 would have done: terminate

"""Sweep bookkeeping: one record per job, and a summary table of all jobs rewritten from them.

Why records and not ``on_multirun_end``: with Hydra's BasicSweeper a failed job's exception is
raised after its batch, and ``on_multirun_end`` then never runs; under submitit each job runs in
its own process (on another machine under SLURM). So every job writes its own record
(``<sweep_dir>/.jobs/<num>.json``: "running" when it starts, its status, objective and error when it
ends) and rewrites ``<sweep_dir>/sweep_summary.{md,json}`` from all records, under a file lock.
A job killed outside Python (OOM killer, SLURM time limit) stays "running" in the table.

``SweepSummaryCallback`` is the thin Hydra layer (registered in conf/config.yaml,
``hydra.callbacks.sweep_summary``); the functions below need no Hydra.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from pipeline.fsutil import atomic_write_json, atomic_write_text, file_lock
from pipeline.log import log
from pipeline.manifest import stage_dir

JOBS_DIR = ".jobs"
SUMMARY_MD = "sweep_summary.md"
SUMMARY_JSON = "sweep_summary.json"


def task_rank() -> int:
    """This process's task rank inside its (submitit / SLURM) job; 0 outside one.

    A multi-node SLURM job runs the task function once per node; only task 0 records the job.
    """
    for var in ("SUBMITIT_LOCAL_GLOBALID", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def scheduler_job_id() -> str | None:
    """The submitit / SLURM job id of this process (None for an in-process launcher)."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job
        return os.environ.get("SLURM_JOB_ID")


def error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_metrics(run_dir: Path | str) -> dict[str, float]:
    """Held-out perplexity of each evaluated stage, from ``<run_dir>/05_eval/results.json``."""
    results = stage_dir(run_dir, "eval") / "results.json"
    if not results.is_file():
        return {}
    try:
        stages = json.loads(results.read_text()).get("stages", {})
    except (json.JSONDecodeError, OSError):
        return {}
    return {f"{stage}/heldout_ppl": m["heldout/perplexity"] for stage, m in stages.items()
            if isinstance(m, dict) and "heldout/perplexity" in m}


def write_job_record(sweep_dir: Path | str, record: dict[str, Any]) -> Path:
    """Write (or update) one job's record and rewrite the summary from all records."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / JOBS_DIR / f"{int(record['num']):05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_json(path, {**previous, **record})
    write_summary(sweep_dir)
    return path


def read_job_records(sweep_dir: Path | str) -> list[dict]:
    records = []
    for p in sorted((Path(sweep_dir) / JOBS_DIR).glob("*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError:  # cannot happen with atomic writes; a hand-edited file
            continue
    return sorted(records, key=lambda r: r["num"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_summary(records: list[dict]) -> str:
    """The table: overrides every job shares are listed once above it, each row shows what varies."""
    counts = {s: sum(r.get("status") == s for r in records) for s in ("completed", "failed", "running")}
    shared = set.intersection(*(set(r.get("overrides") or []) for r in records)) if len(records) > 1 else set()
    lines = [
        "# Sweep summary",
        "",
        f"{len(records)} jobs: {counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['running']} running or killed before they could report.",
        "",
    ]
    if shared:
        first = records[0].get("overrides") or []
        lines += ["Overrides of every job: `" + " ".join(o for o in first if o in shared) + "`", ""]
    lines += ["| job | overrides | status | objective | metrics | run dir | error |", "|---|---|---|---|---|---|---|"]
    for r in records:
        metrics = ", ".join(f"{k}={_cell(v)}" for k, v in sorted((r.get("metrics") or {}).items()))
        own = " ".join(o for o in r.get("overrides") or [] if o not in shared)
        lines.append("| " + " | ".join(_cell(c) for c in (
            r["num"], own, r.get("status"), r.get("objective"), metrics, r.get("run_dir"), r.get("error"))) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path | str) -> tuple[Path, Path]:
    """Rewrite ``sweep_summary.md`` and ``.json`` from every job record (safe from concurrent jobs)."""
    sweep_dir = Path(sweep_dir)
    with file_lock(sweep_dir / JOBS_DIR / ".summary.lock"):
        records = read_job_records(sweep_dir)
        md, js = sweep_dir / SUMMARY_MD, sweep_dir / SUMMARY_JSON
        atomic_write_text(md, format_summary(records))
        atomic_write_json(js, {"jobs": records,
                               "failed": [r["num"] for r in records if r.get("status") == "failed"]})
    return md, js


def failed_jobs(sweep_dir: Path | str) -> list[dict]:
    return [r for r in read_job_records(sweep_dir) if r.get("status") == "failed"]


class SweepSummaryCallback(Callback):
    """Hydra callback: records each multirun job (see module doc); does nothing in a single run."""

    @staticmethod
    def _job(config) -> tuple[Path, dict] | None:
        from hydra.types import RunMode

        hydra = config.hydra
        if hydra.mode != RunMode.MULTIRUN or task_rank() != 0:
            return None
        return Path(str(hydra.sweep.dir)), {
            "num": int(hydra.job.num),
            "overrides": list(hydra.overrides.task),
            "run_dir": str(hydra.runtime.output_dir),
        }

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        # Hydra instantiates the launcher after this and before it sets HydraConfig (it does per job);
        # hydra-submitit-launcher resolves submitit_folder (${hydra.sweep.dir} -> run_name ->
        # ${hydra:runtime.choices.experiment}) then, so a submitit sweep without run_name=... failed
        # with "HydraConfig was not set".
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if launcher.endswith(".SlurmLauncher") and not shutil.which("sbatch"):
            # Before anything is submitted; submitit would stop later with 'Could not detect "srun"'
            # and a traceback. SystemExit: Hydra turns a callback's Exception into a warning.
            print("error: hydra/launcher: the SLURM launcher submits with sbatch, which is not on PATH -> run the "
                  "sweep on a SLURM login node (or `make cluster-up` and SLURM_CONF for the local rehearsal "
                  "cluster; docs/slurm.md), or use hydra/launcher=local on this machine", file=sys.stderr)
            raise SystemExit(2)

    def on_job_start(self, config, **kwargs: Any) -> None:
        job = self._job(config)
        if job:
            sweep_dir, record = job
            write_job_record(sweep_dir, {**record, "status": "running", "error": None, "objective": None,
                                         "started_at": time.time(), "ended_at": None, "pid": os.getpid(),
                                         "host": socket.gethostname(), "scheduler_job_id": scheduler_job_id()})

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        job = self._job(config)
        if not job:
            return
        sweep_dir, record = job
        ok = job_return.status == JobStatus.COMPLETED
        # _return_value: reading .return_value of a failed job re-raises its exception.
        value = job_return._return_value
        record.update(status="completed" if ok else "failed", ended_at=time.time(),
                      objective=value if ok and isinstance(value, (int, float)) else None,
                      error=None if ok else error_line(value),
                      metrics=run_metrics(record["run_dir"]))
        write_job_record(sweep_dir, record)
        log(f"sweep job {record['num']} {record['status']}; summary: {sweep_dir / SUMMARY_MD}")

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        # Runs only when no job failed (see module doc); the summary is already current then, this
        # rewrite covers records changed by hand or by a job that reported after its batch.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if (sweep_dir / JOBS_DIR).is_dir():
            md, _ = write_summary(sweep_dir)
            log(f"sweep summary: {md}")

"""make cluster-demo: the tiny demo pipeline as one 2-node SLURM job on the local cluster, preempted
in the middle of cpt by a job in the `preempt` partition, requeued, resumed; then the same run
without preemption. Writes outputs/cluster-demo/cluster_report.json (docs/slurm.md).

Needs `make cluster-up`. The cluster stays up afterwards (`make cluster-down`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "outputs" / "cluster-demo"
SBATCH = REPO / "scripts" / "slurm" / "pipeline.sbatch"
# Tiny settings: the cores are shared. cpt has 8 steps with a checkpoint every 2, so the preemption
# lands after a complete checkpoint and before the end.
TINY = [
    "model.demo.vocab_size=512", "model.demo.hidden_size=64", "model.demo.intermediate_size=128",
    "model.demo.max_position_embeddings=256", "model.demo.seq_len=64", "model.demo.batch_size=8",
    "model.demo.train_steps=40", "cpt.seq_len=64", "cpt.per_device_train_batch_size=4", "cpt.max_steps=8",
    "cpt.save_steps=2", "cpt.logging_steps=2", "sft.max_length=128", "sft.per_device_train_batch_size=4",
    "sft.max_steps=2", "sft.save_steps=2", "sft.logging_steps=1", "eval.seq_len=64", "eval.use_harness=false",
    "distributed.num_processes=1",  # per node: 2 machines x 1 process
]


def slurm(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


def job_field(job_id: str, field: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else None


def submit(run_name: str, log: Path, out: Path = OUT, overrides: list[str] = TINY,
           env: dict[str, str] | None = None) -> str:
    """pipeline.sbatch as a 2-node job in `normal`: run `out/run_name`, its log `log` (tests/test_cluster.py
    submits with its own `out` and settings)."""
    args = ["sbatch", "--parsable", "-p", "normal", "-D", str(REPO), "-o", str(log), str(SBATCH),
            f"paths.output_root={out}", f"paths.cache_dir={out}/cache", f"run_name={run_name}", *overrides]
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout.strip().split(";")[0]


def wait_done(job_id: str, timeout_s: float = 1800) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(3)
    raise SystemExit(f"job {job_id} not finished after {timeout_s:.0f} s (scontrol show job {job_id})")


def complete_checkpoint(run_dir: Path) -> Path | None:
    done = sorted((run_dir / "checkpoints" / "cpt").glob("*/checkpoint-*/dus_checkpoint.json"))
    return done[0].parent if done else None


def final_loss(run_dir: Path, stage: str) -> float:
    m = json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]
    return m["verification"]["trained_fixed_batch_loss"]


def nodes_by_rank(log: Path) -> dict[str, list[str]]:
    """machine rank -> the nodes it ran on, one entry per (re)start (1 process per node: rank = machine rank)."""
    out: dict[str, list[str]] = {}
    for node, rank in re.findall(r"\[dus\] SLURM job \d+ restart \d+ on \d+ nodes \(\S+\): node (\S+), "
                                 r"num_machines=\d+, machine_rank=(\d+)", log.read_text()):
        out.setdefault(rank, []).append(node)
    return dict(sorted(out.items()))


def main() -> int:
    if not shutil.which("sbatch"):
        print("error: sbatch is not on PATH: run `make cluster-up` first", file=sys.stderr)
        return 2
    os.environ.setdefault("SLURM_CONF", str(REPO / ".cluster" / "slurm.conf"))
    for name in ("preempted", "uninterrupted"):
        shutil.rmtree(OUT / name, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = OUT / "preempted.out"
    log.unlink(missing_ok=True)
    job = submit("preempted", log)
    print(f"[demo] job {job} (2 nodes) submitted; waiting for cpt's first complete checkpoint")
    while complete_checkpoint(OUT / "preempted") is None:
        if job_field(job, "JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            print(log.read_text()[-3000:])
            raise SystemExit(f"job {job} ended before cpt saved a checkpoint")
        time.sleep(1)
    print(f"[demo] {complete_checkpoint(OUT / 'preempted')} complete: submitting a 2-node job to `preempt`")
    preemptor = slurm("sbatch", "--parsable", "-p", "preempt", "-N", "2", "-o", str(OUT / "preemptor.out"),
                      "--wrap", "srun hostname; sleep 5").strip()
    state = wait_done(job)
    restarts = int(job_field(job, "Restarts") or 0)
    print(f"[demo] job {job}: {state}, Restarts={restarts}, NodeList={job_field(job, 'NodeList')}")
    t1 = time.time()
    log_u = OUT / "uninterrupted.out"
    log_u.unlink(missing_ok=True)
    job_u = submit("uninterrupted", log_u)
    state_u = wait_done(job_u)
    report = {
        "final_loss_preempted": final_loss(OUT / "preempted", "02_cpt"),
        "final_loss_uninterrupted": final_loss(OUT / "uninterrupted", "02_cpt"),
        "final_sft_loss_preempted": final_loss(OUT / "preempted", "03_sft"),
        "final_sft_loss_uninterrupted": final_loss(OUT / "uninterrupted", "03_sft"),
        "loss": "cpt's (and sft's) fixed-batch loss of the exported model (manifest verification)",
        "restarts": restarts,
        "nodes_by_rank": nodes_by_rank(log),
        "nodes_by_rank_uninterrupted": nodes_by_rank(log_u),
        "jobs": {"preempted": [job, state], "preemptor": preemptor, "uninterrupted": [job_u, state_u]},
        "wall_s": {"preempted": round(t1 - t0, 1), "uninterrupted": round(time.time() - t1, 1)},
    }
    (OUT / "cluster_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = (state == state_u == "COMPLETED" and restarts >= 1
          and report["final_loss_preempted"] == report["final_loss_uninterrupted"])
    print(f"[demo] {'OK' if ok else 'MISMATCH'}: logs {log}, {log_u}; `scontrol show job {job}`")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

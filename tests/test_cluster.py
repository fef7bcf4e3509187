"""The local rehearsal SLURM cluster (scripts/slurm/cluster.sh): a real slurmctld and two slurmd.

The session fixture starts it with the project's own script (or uses one already up, and then
leaves it running) and stops what it started by PID. With CI=true a cluster that cannot start fails
the run; elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.slow

CLUSTER = REPO_ROOT / "scripts" / "slurm" / "cluster.sh"
SLURM_CONF = REPO_ROOT / ".cluster" / "slurm.conf"


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the SLURM cluster cannot start: {reason}")
    print(f"cluster tests skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        _unavailable("slurm-wlm is not installed (make cluster-install, as root)")
    already_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        _unavailable(f"`cluster.sh up` failed: {up.stdout}{up.stderr}")
    os.environ["SLURM_CONF"] = str(SLURM_CONF)
    yield SLURM_CONF
    if not already_up:
        subprocess.run(["bash", str(CLUSTER), "down"], check=True, timeout=60)


def sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=60).stdout


def job_field(job_id: str, field: str) -> str | None:
    m = re.search(rf"\b{field}=(\S+)", sh("scontrol", "show", "job", job_id))
    return m.group(1) if m else None


def wait_state(job_id: str, states: tuple[str, ...], timeout_s: float = 120) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout_s} s: {sh('scontrol', 'show', 'job', job_id)}")


def test_a_two_node_job_runs_one_task_on_each_node(cluster, tmp_path):
    out = tmp_path / "job.out"
    sh("sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", "-o", str(out), "--wrap",
       "srun bash -c 'echo task $SLURM_PROCID node $SLURMD_NODENAME nodeid $SLURM_NODEID of $SLURM_NNODES'")
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("task"))
    assert lines == ["task 0 node n1 nodeid 0 of 2", "task 1 node n2 nodeid 1 of 2"]


def test_preemption_requeues_the_job_and_the_log_keeps_both_runs(cluster, tmp_path):
    """What the pipeline's batch script relies on: SIGTERM at preemption, requeue, SLURM_RESTART_COUNT
    unset on the first run and 1 after, and --open-mode=append keeping the first run's lines."""
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      "echo start restart=${SLURM_RESTART_COUNT-unset}\n"
                      "trap 'echo got SIGTERM; exit 143' TERM\n"
                      "if [ -z \"${SLURM_RESTART_COUNT-}\" ]; then sleep 300 & wait; fi\n"
                      "echo done\n")
    job = sh("sbatch", "--parsable", "-p", "normal", "-N", "2", "--requeue", "--open-mode=append",
             "-o", str(out), str(script)).strip()
    wait_state(job, ("RUNNING",))
    time.sleep(2)
    preemptor = sh("sbatch", "--parsable", "-p", "preempt", "-N", "2", "-o", "/dev/null", "--wrap", "sleep 1").strip()
    assert wait_state(job, ("COMPLETED", "FAILED"), timeout_s=180) == "COMPLETED"
    assert int(job_field(job, "Restarts")) >= 1
    assert job_field(preemptor, "JobState") == "COMPLETED"
    text = out.read_text()
    assert text.index("start restart=unset") < text.index("got SIGTERM") < text.index("start restart=1") < text.index("done")


def test_cluster_demo_without_sbatch_on_path_fails_before_submitting(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python only: no sbatch
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "slurm" / "cluster_demo.py")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "sbatch is not on PATH: run `make cluster-up` first" in proc.stderr

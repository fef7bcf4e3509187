"""The local rehearsal SLURM cluster (scripts/slurm/cluster.sh): a real slurmctld and two slurmd.

The session fixture starts it with the project's own script (or uses one already up, and then
leaves it running) and stops what it started by PID. With CI=true a cluster that cannot start fails
the run; elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import manifest, run_cli  # noqa: E402
from test_sweeps import submitit_logs, sweep_overrides  # noqa: E402

pytestmark = pytest.mark.slow

CLUSTER = REPO_ROOT / "scripts" / "slurm" / "cluster.sh"
DEMO = REPO_ROOT / "scripts" / "slurm" / "cluster_demo.py"
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


@pytest.fixture(scope="module")
def cluster_cache(tmp_path_factory) -> Path:
    """One cache for this module's runs: the demo base model is built once."""
    return tmp_path_factory.mktemp("cluster_cache")


def load_demo():
    """scripts/slurm/cluster_demo.py as a module: the tests submit pipeline.sbatch and read the runs
    with the functions `make cluster-demo` uses."""
    spec = importlib.util.spec_from_file_location("cluster_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipeline_job_overrides(data_dir: Path, out: Path, cache: Path) -> list[str]:
    """The tiny pipeline as a 2-node job: base, merge and cpt (6 steps, a checkpoint every 2), one rank
    per node (DeepSpeed ZeRO-3 on gloo), no sft/eval/release."""
    return [*sweep_overrides(data_dir, out, cache), "eval.enabled=false", "distributed=cpu_zero3",
            "distributed.num_processes=1", "cpt.max_steps=6", "cpt.save_steps=2"]


# States a job passes through while SLURM requeues it (preempted or `scontrol requeue`).
REQUEUING = ("COMPLETING", "PREEMPTED", "REQUEUED", "REQUEUE_FED")


def wait_for(what: str, ready, job_id: str, log: Path, timeout_s: float = 600, *, requeuing: bool = False) -> None:
    """Poll ``ready()`` while the job is alive (and, with ``requeuing``, while it is being requeued)."""
    alive = ("PENDING", "RUNNING", "CONFIGURING") + (REQUEUING if requeuing else ())
    deadline = time.time() + timeout_s
    while not ready():
        state = job_field(job_id, "JobState")
        if state not in alive:
            raise AssertionError(f"job {job_id} {state} before {what}:\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


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


def test_hydra_sweep_runs_each_point_as_a_job_on_the_local_cluster(cluster, tmp_path, tiny_data_dir, cluster_cache):
    """`python -m pipeline -m hydra/launcher=slurm_local ...`: submitit submits the 2-point sweep to the
    real controller; each point is a SLURM job (its own id, COMPLETED in `scontrol show job`, on a node
    of the cluster) and writes its own run directory; the sweep summary lists both."""
    t0 = time.time()
    proc = run_cli(["-m", "hydra/launcher=slurm_local", *sweep_overrides(tiny_data_dir, tmp_path, cluster_cache),
                    "run_name=sw", "distributed=inprocess", "eval.enabled=false", "cpt.learning_rate=1e-3,2e-3"],
                   check=False)
    sweep_dir = tmp_path / "sw_multirun"
    assert proc.returncode == 0, proc.stderr[-3000:] + submitit_logs(sweep_dir)
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"], submitit_logs(sweep_dir)
    ids = [j["scheduler_job_id"] for j in jobs]
    assert None not in ids and len(set(ids)) == 2
    lrs = []
    for job in jobs:
        # A job the controller ran (MinJobAge keeps finished jobs in `scontrol show job` for 10 min). submitit
        # reads the result file, which comes a moment before the job ends.
        assert wait_state(job["scheduler_job_id"], ("COMPLETED", "FAILED", "CANCELLED"), timeout_s=60) == "COMPLETED"
        assert job_field(job["scheduler_job_id"], "Partition") == "normal"
        assert job_field(job["scheduler_job_id"], "NodeList") in ("n1", "n2")
        lrs.append(manifest(Path(job["run_dir"]), "02_cpt")["config"]["cpt"]["learning_rate"])
        assert (Path(job["run_dir"]) / ".hydra" / "overrides.yaml").is_file()
    assert len({j["run_dir"] for j in jobs}) == 2
    assert sorted(lrs) == [1e-3, 2e-3]
    print(f"sweep of 2 SLURM jobs: {time.time() - t0:.0f} s")


def test_a_job_preempted_then_requeued_resumes_twice_to_the_uninterrupted_loss_and_weights(
        cluster, tmp_path, tiny_data_dir, cluster_cache):
    """pipeline.sbatch on 2 nodes (cpt 8 steps, a checkpoint every 2), interrupted twice: by a
    `preempt` job taking the nodes once cpt has a complete checkpoint, then, once the resumed run has
    written a newer one, by `scontrol requeue`. Each time SLURM requeues it and it resumes from a
    checkpoint before the last step, on both nodes again; its cpt model then equals (loss and every
    tensor) that of the same job run without interruption."""
    import torch
    from safetensors.torch import load_file

    from pipeline.training.resume import complete_checkpoints

    demo = load_demo()
    overrides = pipeline_job_overrides(tiny_data_dir, tmp_path, cluster_cache) + ["cpt.max_steps=8"]
    resumed_re = re.compile(r"\[cpt\] resuming from \S+/checkpoint-(\d+) \(step (\d+)")
    t0 = time.time()
    log = tmp_path / "interrupted.out"
    job = demo.submit("interrupted", log, tmp_path, overrides)
    run = tmp_path / "interrupted"

    def newest_checkpoint_step() -> int:
        """Step of the newest complete cpt checkpoint (the resume code's own test), -1 for none."""
        return max((step for key_dir in (run / "checkpoints" / "cpt").glob("*")
                    for step, _, _ in complete_checkpoints(key_dir)), default=-1)

    wait_for("a complete cpt checkpoint", lambda: newest_checkpoint_step() >= 0, job, log)
    sh("sbatch", "--parsable", "-p", "preempt", "-N", "2", "-o", "/dev/null", "--wrap", "sleep 1")

    def resumed_steps() -> list[int]:
        return [int(m.group(2)) for m in resumed_re.finditer(log.read_text())] if log.is_file() else []

    # The second interruption waits for the resumed run to write a checkpoint past where it resumed.
    wait_for("a checkpoint after the first resume",
             lambda: resumed_steps() and newest_checkpoint_step() > resumed_steps()[0], job, log,
             requeuing=True)
    sh("scontrol", "requeue", job)
    assert wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"), timeout_s=900) == "COMPLETED", \
        log.read_text()[-4000:]
    interrupted_s, t0 = time.time() - t0, time.time()
    text = log.read_text()
    assert int(job_field(job, "Restarts")) >= 2
    assert f"JOB {job} ON n1 CANCELLED AT" in text and "DUE TO PREEMPTION" in text and "DUE TO JOB REQUEUE" in text
    steps = resumed_steps()
    assert len(steps) == 2 and 2 <= steps[0] < steps[1] < 8, text[-4000:]
    # Each run of the job: machine rank 0 on one node, rank 1 on the other.
    by_rank = demo.nodes_by_rank(log)
    assert len(by_rank["0"]) == len(by_rank["1"]) >= 3
    assert all({a, b} == {"n1", "n2"} for a, b in zip(by_rank["0"], by_rank["1"]))

    log_u = tmp_path / "uninterrupted.out"
    job_u = demo.submit("uninterrupted", log_u, tmp_path, overrides)
    assert wait_state(job_u, ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"), timeout_s=900) == "COMPLETED", \
        log_u.read_text()[-4000:]
    assert "resuming from" not in log_u.read_text() and job_field(job_u, "Restarts") == "0"
    run_u = tmp_path / "uninterrupted"
    files = sorted(p.name for p in (run_u / "02_cpt").glob("*.safetensors"))
    assert files and manifest(run_u, "02_cpt")["metrics"]["global_step"] == 8
    assert manifest(run, "02_cpt")["metrics"]["global_step"] == 8
    assert demo.final_loss(run, "02_cpt") == demo.final_loss(run_u, "02_cpt")
    assert files == sorted(p.name for p in (run / "02_cpt").glob("*.safetensors"))
    for name in files:
        a, b = load_file(run / "02_cpt" / name), load_file(run_u / "02_cpt" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    print(f"wall s: interrupted twice {interrupted_s:.0f}, uninterrupted {time.time() - t0:.0f}; resumed at {steps}")


def test_a_node_lost_mid_training_requeues_the_job_and_no_stage_is_marked_done(cluster, tmp_path, tiny_data_dir,
                                                                               cluster_cache):
    """Node n2 set DOWN while cpt trains: SLURM cancels the job's run on n1 too "DUE TO NODE FAILURE"
    and requeues it (Restarts=1, PENDING); the ranks got SIGTERM; cpt has no manifest."""
    demo = load_demo()
    overrides = pipeline_job_overrides(tiny_data_dir, tmp_path, cluster_cache) + ["cpt.max_steps=40"]
    log = tmp_path / "lost.out"
    job = demo.submit("lost", log, tmp_path, overrides)
    run = tmp_path / "lost"
    trained = re.compile(r"\[dus\] cpt: step \d+/40")  # the progress line (every few steps)
    wait_for("cpt's first steps", lambda: log.is_file() and trained.search(log.read_text()), job, log)
    t0 = time.time()
    try:
        sh("scontrol", "update", "nodename=n2", "state=down", "reason=test_node_lost")
        # Requeued: back to PENDING (after its processes ended), held there while n2 is down.
        state = wait_state(job, ("PENDING", "COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"), timeout_s=180)
        ended_s = time.time() - t0
        info = sh("scontrol", "show", "job", job)
        text = log.read_text()
        print(f"node lost: job {state} after {ended_s:.0f} s\n{info}\n{text[-3000:]}")
        assert state == "PENDING" and int(job_field(job, "Restarts")) == 1, info
        assert f"JOB {job} ON n1 CANCELLED AT" in text and "DUE TO NODE FAILURE" in text, text[-3000:]
        assert "srun: error: Node failure on n2" in text
        assert not (run / "02_cpt" / "manifest.json").exists()
        assert (run / "01_merge" / "manifest.json").exists()  # done before the node was lost
    finally:
        subprocess.run(["scancel", job], timeout=60)
        wait_state(job, ("CANCELLED", "COMPLETED", "FAILED"), timeout_s=120)
        # ReturnToService=2 may already have brought n2 back (its slurmd still answers); `up` resumes
        # a node still DOWN and waits until both are idle.
        subprocess.run(["bash", str(CLUSTER), "up"], check=True, capture_output=True, timeout=120)
    assert not (run / "02_cpt" / "manifest.json").exists()


def test_a_run_directory_the_nodes_do_not_share_fails_in_seconds(cluster, tmp_path, tiny_data_dir, cluster_cache):
    """pipeline.sbatch where node n2 sees another directory under the output root's name (a private
    tmpfs over it, in its own mount namespace; where that is not allowed, another path): its driver
    stops within DUS_SHARED_DIR_TIMEOUT_S with the error naming the directory, srun ends the
    leader, the job FAILED, and cpt never ran."""
    demo = load_demo()
    out = tmp_path / "out"
    out.mkdir()
    wrapper = tmp_path / "python_node_local_dir.sh"
    wrapper.write_text(f"""#!/bin/bash
# Node 0: the real python. Other nodes: {out} is not the leader's directory.
if [[ "$SLURM_NODEID" == 0 ]]; then exec {sys.executable} "$@"; fi
if unshare -m true 2>/dev/null; then
  exec unshare -m bash -c 'mount -t tmpfs node_local "$0" && exec "$@"' {out} {sys.executable} "$@"
fi
args=(); for a in "$@"; do [[ "$a" == paths.output_root=* ]] && a="$a/../node_$SLURM_NODEID"; args+=("$a"); done
exec {sys.executable} "${{args[@]}}"
""")
    wrapper.chmod(0o755)
    env = {**os.environ, "DUS_PYTHON": str(wrapper), "DUS_SHARED_DIR_TIMEOUT_S": "10"}
    log = tmp_path / "unshared.out"
    t0 = time.time()
    job = demo.submit("unshared", log, out, pipeline_job_overrides(tiny_data_dir, out, cluster_cache), env=env)
    assert wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"), timeout_s=300) == "FAILED", \
        log.read_text()[-4000:]
    h, m_, sec = (int(x) for x in job_field(job, "RunTime").split(":"))  # the job's own time, not the queue's
    run_s = 3600 * h + 60 * m_ + sec
    assert run_s < 90, f"job ran {run_s} s"
    text = log.read_text()
    m = re.search(r"error: paths.run_dir: node n2 \(machine_rank 1\) did not see (\S+) within 10 s.*do not share (\S+)",
                  text)
    assert m, text[-4000:]
    assert f"/unshared/.slurm_nodes/job_{job}_restart_0.json" in m.group(1)
    assert "NFS" in text and "cpt: step" not in text
    assert not (out / "unshared" / "02_cpt" / "manifest.json").exists()
    print(f"unshared run dir: job FAILED after {run_s} s of running ({time.time() - t0:.0f} s with the test's setup)")

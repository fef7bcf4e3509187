"""Sweeps through the real CLI: jobs in parallel under submitit, an Optuna search, a sweep in which
one job fails, and the SLURM environment -> multi-node launch settings.

The slow tests run `python -m pipeline -m ...` as a user does (Hydra, its plugins and submitit are
real); the fast ones call pipeline/sweep.py and pipeline/slurm.py directly.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT, DistributedConfig, PathsConfig, PipelineConfig
from pipeline.cluster.slurm import expand_hostlist, slurm_distributed
from pipeline.cluster.sweep import format_summary, read_job_records, write_job_record

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import manifest, run_cli, seed_demo_base, steps_reached, tiny_overrides  # noqa: E402


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for this module's sweeps: the demo base model is built once, not once per test."""
    return tmp_path_factory.mktemp("sweep_cache")


def sweep_overrides(data_dir: Path, out: Path, cache: Path) -> list[str]:
    """tiny_overrides without run_name, no sft, and eval cut to what a sweep needs (cpt's held-out ppl)."""
    seed_demo_base(data_dir, cache)
    return [o for o in tiny_overrides(data_dir, out) if not o.startswith(("run_name", "paths.cache_dir"))] + [
        f"paths.cache_dir={cache}", "sft.enabled=false", "cpt.max_steps=2", "eval.stages=[cpt]",
        "eval.max_heldout_tokens=2048", "eval.max_sft_heldout_examples=4", "release.enabled=false",
    ]


def submitit_logs(sweep_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))


# -------------------------------------------------------------------------------------------- fast

def test_hostlist_expansion_matches_scontrol_show_hostnames():
    # Expected values: what `scontrol show hostnames` prints for these lists (SLURM's hostlist rules).
    assert expand_hostlist("gpu[08-10,15],login1") == ["gpu08", "gpu09", "gpu10", "gpu15", "login1"]
    assert expand_hostlist("node1") == ["node1"]
    assert expand_hostlist("a[1-2]-ib,b[7]") == ["a1-ib", "a2-ib", "b7"]


def test_slurm_environment_fills_the_multinode_launch():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1",
           "SLURM_JOB_NODELIST": "gpu[08-09]"}
    dist, msg = slurm_distributed(DistributedConfig(num_processes=8, num_machines=1), env)
    assert (dist.num_machines, dist.machine_rank, dist.main_process_ip, dist.num_processes) == (2, 1, "gpu08", 16)
    assert dist.main_process_port == 20000 + 4242  # the same on every node without talking
    assert "machine_rank=1" in msg and "main_process_ip=gpu08" in msg
    # One node, or no SLURM: untouched.
    same = DistributedConfig(num_processes=8)
    assert slurm_distributed(same, {**env, "SLURM_NNODES": "1"}) == (same, None)
    assert slurm_distributed(same, {}) == (same, None)


def test_multinode_config_takes_the_per_job_port_under_slurm(tmp_path, monkeypatch):
    """conf/distributed/zero3_multinode.yaml sets no port, so a SLURM job gets the per-job (and per-restart)
    port every node derives, not a fixed one a requeued job's last run may still hold; by hand, MASTER_PORT."""
    from pipeline.errors import ConfigError
    from pipeline.training.distributed import validate_distributed
    from test_config import compose_typed

    env = {"SLURM_JOB_ID": "31", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_RESTART_COUNT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    dist = compose_typed(["distributed=zero3_multinode"], tmp_path).distributed
    assert dist.main_process_port is None
    with pytest.raises(ConfigError, match="distributed.main_process_port"):
        validate_distributed(replace(dist, main_process_ip="n1"), str(REPO_ROOT / "conf"))
    assert slurm_distributed(dist, env)[0].main_process_port == 20000 + 31 + 997
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert compose_typed(["distributed=zero3_multinode"], tmp_path).distributed.main_process_port == 29555


def test_a_follower_that_does_not_see_the_leaders_run_dir_stops_with_the_directory_named(tmp_path):
    """check_run_dir_shared: the leader's file for this job run is seen by a follower on the same
    directory; a follower whose run dir is elsewhere (not shared) gets a ConfigError within its timeout."""
    from pipeline.cluster.slurm import check_run_dir_shared
    from pipeline.errors import ConfigError

    env = {"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n2"}
    leader = replace(PipelineConfig(), distributed=DistributedConfig(num_machines=2, num_processes=2, machine_rank=0),
                     paths=PathsConfig(run_dir=str(tmp_path / "shared" / "run")))
    follower = replace(leader, distributed=replace(leader.distributed, machine_rank=1))
    elsewhere = replace(follower, paths=PathsConfig(run_dir=str(tmp_path / "node_local" / "run")))
    with pytest.raises(ConfigError, match="did not see"):  # the leader has not written it yet
        check_run_dir_shared(follower, env, timeout_s=0.2, poll_s=0.1)
    check_run_dir_shared(leader, env)
    check_run_dir_shared(follower, env, timeout_s=0.2, poll_s=0.1)
    t0 = time.time()
    with pytest.raises(ConfigError) as err:
        check_run_dir_shared(elsewhere, env, timeout_s=1, poll_s=0.1)
    assert time.time() - t0 < 5
    assert str(err.value).startswith("paths.run_dir: node n2 (machine_rank 1) did not see")
    assert f"do not share {tmp_path / 'node_local' / 'run'}" in str(err.value) and "NFS" in str(err.value)
    # A requeued job (restart 1) does not take the first run's file for its own.
    with pytest.raises(ConfigError):
        check_run_dir_shared(follower, {**env, "SLURM_RESTART_COUNT": "1"}, timeout_s=0.2, poll_s=0.1)


def test_slurm_sweep_without_sbatch_on_path_fails_before_anything_is_written(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python only: no sbatch
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "hydra/launcher=slurm_local",
                           f"paths.output_root={tmp_path}", "cpt.learning_rate=1e-3,2e-3"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: hydra/launcher: the SLURM launcher submits with sbatch, which is not on PATH" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_summary_is_rewritten_from_every_job_record(tmp_path):
    write_job_record(tmp_path, {"num": 1, "overrides": ["x=2"], "status": "running"})
    write_job_record(tmp_path, {"num": 0, "overrides": ["x=1"], "status": "completed", "objective": 3.5,
                                "metrics": {"cpt/heldout_ppl": 3.5}, "run_dir": "/r/0"})
    write_job_record(tmp_path, {"num": 1, "status": "failed", "error": "ConfigError: data.cpt_files: missing"})
    records = read_job_records(tmp_path)
    assert [(r["num"], r["status"]) for r in records] == [(0, "completed"), (1, "failed")]
    assert records[1]["overrides"] == ["x=2"]  # an update keeps the fields written at the start
    md = (tmp_path / "sweep_summary.md").read_text()
    assert md == format_summary(records) and "| 1 | x=2 | failed |" in md and "ConfigError: data.cpt_files" in md
    assert json.loads((tmp_path / "sweep_summary.json").read_text())["failed"] == [1]


def test_config_error_survives_pickling():
    """submitit pickles a failed job's exception back to the launcher."""
    import pickle

    from pipeline.errors import ConfigError

    e = pickle.loads(pickle.dumps(ConfigError("data.cpt_files", "missing", "fix the path")))
    assert (e.where, e.problem, e.fix, str(e)) == ("data.cpt_files", "missing", "fix the path",
                                                   "data.cpt_files: missing -> fix the path")


# -------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_failed_jobs_under_submitit_are_recorded_by_the_job_processes(tmp_path):
    """hydra/launcher=local: both jobs fail in preflight inside their own processes; their
    errors come back to the launcher, each job's record is written by on_job_end in the job's
    process, and the sweep exits non-zero. (~15 s: nothing is trained.)"""
    proc = run_cli(["-m", "hydra/launcher=local", f"paths.output_root={tmp_path}", f"paths.cache_dir={tmp_path}/cache",
                    "run_name=x", f"data.cpt_files=[{tmp_path}/a.txt],[{tmp_path}/b.txt]"], check=False)
    sweep_dir = tmp_path / "x_multirun"
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [(j["num"], j["status"]) for j in jobs] == [(0, "failed"), (1, "failed")], submitit_logs(sweep_dir)
    assert [f"{tmp_path}/{n}.txt does not exist" in j["error"] for n, j in zip("ab", jobs)] == [True, True]
    # Recorded in two submitit jobs' processes, not in the launcher's.
    assert len({j["pid"] for j in jobs}) == 2 and None not in {j["scheduler_job_id"] for j in jobs}

@pytest.mark.slow
def test_failed_job_keeps_the_others_results_and_the_summary_names_it(tmp_path, tiny_data_dir, shared_cache):
    """Job 1's corpus does not exist: only it fails (in preflight); job 0 completes; the sweep
    exits non-zero and the summary lists both, with job 1's error line."""
    missing = tmp_path / "no_such_corpus.txt"
    args = [o for o in sweep_overrides(tiny_data_dir, tmp_path, shared_cache) if not o.startswith("data.cpt_files")]
    proc = run_cli(["-m", *args, "run_name=sw", "distributed=inprocess",
                    f"data.cpt_files=[{tiny_data_dir}/corpus.txt],[{missing}]"], check=False)
    sweep_dir = tmp_path / "sw_multirun"
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert (sweep_dir / "0" / "05_eval" / "results.json").is_file(), proc.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    jobs = {j["num"]: j for j in summary["jobs"]}
    assert jobs[0]["status"] == "completed" and jobs[1]["status"] == "failed"
    assert summary["failed"] == [1]
    results = json.loads((sweep_dir / "0" / "05_eval" / "results.json").read_text())
    assert jobs[0]["objective"] == pytest.approx(results["stages"]["cpt"]["heldout/perplexity"])
    assert jobs[0]["metrics"]["cpt/heldout_ppl"] == jobs[0]["objective"]
    assert "ConfigError" in jobs[1]["error"] and str(missing) in jobs[1]["error"]
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 jobs: 1 completed, 1 failed" in md and str(sweep_dir / "1") in md
    assert any(str(missing) in o for o in jobs[1]["overrides"])


@pytest.mark.slow
def test_optuna_sweep_best_value_is_a_job_objective(tmp_path, tiny_data_dir, shared_cache):
    """hparams_search=cpt_lr_optuna, 2 trials: optimization_results.yaml's best value is the
    smaller of the two jobs' returned objectives (held-out perplexity, minimised)."""
    proc = run_cli([*sweep_overrides(tiny_data_dir, tmp_path, shared_cache), "run_name=opt", "distributed=inprocess",
                    "hparams_search=cpt_lr_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
                    # A command-line sweep replaces the config's range for that key (the Optuna sweeper merges them).
                    "cpt.learning_rate=tag(log, interval(1e-4, 1e-2))"])
    sweep_dir = tmp_path / "opt_multirun"
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"], proc.stdout[-2000:]
    objectives = [j["objective"] for j in jobs]
    assert all(isinstance(o, float) and o > 1 for o in objectives)
    assert best["best_value"] == pytest.approx(min(objectives))
    # The trial's learning rate reached the stage that trained with it.
    lrs = [manifest(sweep_dir / str(j["num"]), "02_cpt")["config"]["cpt"]["learning_rate"] for j in jobs]
    best_job = jobs[objectives.index(min(objectives))]
    assert best["best_params"]["cpt.learning_rate"] == pytest.approx(lrs[jobs.index(best_job)])
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-2 and lrs[0] != lrs[1]


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs_at_once_each_on_two_ranks(tmp_path, tiny_data_dir, shared_cache):
    """hydra/launcher=local (submitit LocalExecutor): two sweep jobs in separate processes at the same time, each
    starting its own 2-process DeepSpeed ZeRO-3 `accelerate launch` for cpt."""
    proc = run_cli(["-m", *sweep_overrides(tiny_data_dir, tmp_path, shared_cache), "run_name=par", "hydra/launcher=local",
                    "distributed=cpu_zero3", "distributed.num_processes=2", "eval.enabled=false",
                    "cpt.learning_rate=1e-3,2e-3"], check=False)
    sweep_dir = tmp_path / "par_multirun"
    assert proc.returncode == 0, proc.stderr[-3000:] + submitit_logs(sweep_dir)
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"], submitit_logs(sweep_dir)
    # Two scheduler jobs, two job processes (not the launcher's own), alive at the same time.
    assert len({j["scheduler_job_id"] for j in jobs}) == 2 and None not in {j["scheduler_job_id"] for j in jobs}
    assert len({j["pid"] for j in jobs}) == 2
    a, b = sorted(jobs, key=lambda j: j["started_at"])
    assert b["started_at"] < a["ended_at"], f"jobs ran one after the other: {a} {b}"
    lrs, cpt_intervals = [], []
    for j in jobs:
        run_dir = Path(j["run_dir"])
        records = [json.loads((run_dir / "02_cpt" / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
        assert records[0]["pid"] != records[1]["pid"]
        m = manifest(run_dir, "02_cpt")
        assert m["metrics"]["world_size"] == 2 and m["metrics"]["zero_stage"] == 3
        lrs.append(m["config"]["cpt"]["learning_rate"])
        start = datetime.fromisoformat(m["started_at"]).timestamp()
        cpt_intervals.append((start, start + m["wall_time_s"]))
        # Hydra's files were written by the job process into the job's own directory.
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert sorted(lrs) == [1e-3, 2e-3]
    # The two 2-rank trainings themselves overlapped (started_at has 1 s resolution: 1 s margin).
    (s0, e0), (s1, e1) = sorted(cpt_intervals)
    assert s1 + 1 < e0, f"cpt trainings did not overlap: {cpt_intervals}"


@pytest.mark.slow
def test_two_node_slurm_job_leader_runs_the_pipeline_follower_joins_training(tmp_path, tiny_data_dir, shared_cache):
    """What the two tasks of a 2-node SLURM job run, on one machine: the same command with the
    environment SLURM gives each node's task (no scontrol here: the host list is parsed). Node 1
    is started first and must wait for node 0's merge, then join cpt as machine_rank 1; the
    training has one process per node and world size 2."""
    from pipeline.training.distributed import free_port

    args = [*sweep_overrides(tiny_data_dir, tmp_path, shared_cache), "run_name=nodes", "distributed=cpu_zero3",
            "distributed.num_processes=1", f"distributed.main_process_port={free_port()}", "eval.enabled=false"]
    slurm = {"SLURM_JOB_ID": "777", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **slurm}
    procs, started = {}, time.time()
    for node in (1, 0):
        procs[node] = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT,
                                       env={**env, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node)},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2 if node == 1 else 0)
    outs = {node: p.communicate(timeout=900)[0] for node, p in procs.items()}
    for node, p in procs.items():
        assert p.returncode == 0, f"node {node}:\n{outs[node][-4000:]}"
    assert "machine_rank=1, main_process_ip=localhost" in outs[1] and "following the leader" in outs[1]
    assert "--machine_rank 1" in outs[1] and "--num_machines 2" in outs[1]
    assert "--machine_rank 0" in outs[0] and "merge:" in outs[0] and "merge:" not in outs[1]
    run_dir = tmp_path / "nodes"
    records = [json.loads((run_dir / "02_cpt" / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    m = manifest(run_dir, "02_cpt")["metrics"]
    assert m["world_size"] == 2 and m["global_step"] == 2
    # Only the leader wrote Hydra's files (SLURM_PROCID 0).
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # accelerate's pdsh launcher would have dumped the environment into the working directory.
    dumped = REPO_ROOT / ".deepspeed_env"
    assert not dumped.exists() or dumped.stat().st_mtime < started


@pytest.mark.slow
def test_submitit_usr2_stops_training_at_a_checkpoint_before_it_is_handed_on(tmp_path, tiny_data_dir, shared_cache):
    """SIGUSR2 is submitit's "time limit / preemption in signal_delay_s" signal; its handler
    requeues the job. The driver first stops the 2-rank training at a checkpoint (SIGTERM to the
    ranks), then hands USR2 on: here to the default action (the process ends by USR2), under
    submitit to the requeue."""
    import re
    import signal
    import threading

    args = [*sweep_overrides(tiny_data_dir, tmp_path, shared_cache), "run_name=usr2", "cpt.max_steps=60",
            "cpt.save_steps=1000", "eval.enabled=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if steps_reached("".join(seen), 60) >= 3:
            proc.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.2)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out = "".join(seen)
    assert proc.returncode == -signal.SIGUSR2, out[-3000:]
    saved = re.search(r"SIGTERM: checkpoint saved at step (\d+)", out)
    assert saved and out.index(saved.group(0)) < out.index("SIGUSR2: the training stage has stopped"), out[-3000:]
    checkpoints = list((tmp_path / "usr2" / "checkpoints" / "cpt").glob(f"*/checkpoint-{saved.group(1)}"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()

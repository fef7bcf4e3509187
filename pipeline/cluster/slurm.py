"""Multi-node training inside a SLURM job: every node runs the driver, node 0 leads.

``hydra/launcher=slurm`` submits one SLURM job per sweep point with one task per node. Each task
runs ``python -m pipeline``'s task function with the same config. Here each node learns who it is
from SLURM's environment (``SLURM_NNODES``, ``SLURM_NODEID``, the first host of
``SLURM_JOB_NODELIST``) and then:

- node 0 (the leader) runs the whole pipeline as on one machine: base, merge, each training stage
  through ``accelerate launch --machine_rank 0``, eval, release;
- every other node (a follower) only joins the training stages: it waits until the leader has
  finished the stage's input, starts ``accelerate launch --machine_rank N`` with the same command,
  and waits for the leader's manifest before the next stage.

The run directory must be on a filesystem every node sees (it already must: ZeRO-3 checkpoints
are written by every rank). Nothing here needs Hydra.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

from pipeline.config import DistributedConfig, PipelineConfig
from pipeline.driver import join_training_stage
from pipeline.errors import ConfigError, StageFailed
from pipeline.fsutil import atomic_write_json
from pipeline.log import log
from pipeline.manifest import read_manifest, stage_dir
from pipeline.stages import get_stage, selected_stages
from pipeline.stages.stage import TrainingStage
from pipeline.training.launch import RESOLVED_CONFIG

# Written by the leader when its driver fails, so followers stop waiting for inputs that will not come.
LEADER_FAILED = "leader_failed.json"
# How long a follower waits for the leader to finish a stage's input (base + merge of a 7B model
# takes minutes; the wait for the next stage's input after training is seconds).
FOLLOWER_TIMEOUT_S = float(os.environ.get("DUS_FOLLOWER_TIMEOUT_S", 4 * 3600))
# The leader writes a file into the run directory at job start; each follower must see it within
# this many seconds, or the nodes do not share the directory and the follower stops with an error
# (rather than waiting FOLLOWER_TIMEOUT_S for a merge it will never see). Not seconds: NFS may
# cache a directory's listing for up to 60 s (acdirmax), and the leader's imports take ~10 s.
SHARED_DIR_TIMEOUT_S = float(os.environ.get("DUS_SHARED_DIR_TIMEOUT_S", 120))
# Where those files go, one per job run: run_dir/.slurm_nodes/job_<id>_restart_<n>.json.
NODES_DIR = ".slurm_nodes"


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login1``) as host names, in order.

    What ``scontrol show hostnames`` prints; parsed here so it also works where scontrol is not on
    PATH (containers). Zero padding is kept (``[08-10]`` -> gpu08, gpu09, gpu10).
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when present, else parsed."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise ConfigError("SLURM_JOB_NODELIST", f"cannot read a host from '{nodelist}'")
    return hosts[0]


def slurm_distributed(dist: DistributedConfig, env: Mapping[str, str] | None = None
                      ) -> tuple[DistributedConfig, str | None]:
    """``dist`` with num_machines / machine_rank / main_process_ip / num_processes / port taken from
    SLURM when this is a SLURM job on more than one node; (dist unchanged, None) otherwise.

    The second value is the sentence to log. ``num_processes`` stays "processes per node x nodes":
    the config's per-node count (``num_processes / num_machines``, 8 for zero3_8gpu) times
    ``SLURM_NNODES``, so the same experiment runs on 1 node or N without editing it.
    """
    env = os.environ if env is None else env
    nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    if "SLURM_JOB_ID" not in env or nnodes <= 1 or dist.launcher != "accelerate":
        return dist, None
    node_id = int(env.get("SLURM_NODEID", 0))
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    main_ip = dist.main_process_ip or first_host(nodelist)
    per_node = max(1, dist.num_processes // max(1, dist.num_machines))
    # Every node must agree on the port without talking: derive it from the job id when unset, and
    # from the restart count: a requeued job keeps its id, and the last run's port may still be bound.
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)  # unset on the first run
    port = dist.main_process_port or 20000 + (int(env["SLURM_JOB_ID"]) + 997 * restart) % 20000
    new = replace(dist, num_machines=nnodes, machine_rank=node_id, main_process_ip=main_ip,
                  num_processes=per_node * nnodes, main_process_port=port)
    # The node by SLURM's name for it (several slurmd may share one host, so not `hostname`).
    node = env.get("SLURMD_NODENAME", "?")
    msg = (f"SLURM job {env['SLURM_JOB_ID']} restart {restart} on {nnodes} nodes ({nodelist}): node {node}, "
           f"num_machines={nnodes}, "
           f"machine_rank={node_id}, main_process_ip={main_ip}, main_process_port={port}, "
           f"num_processes={new.num_processes} ({per_node} per node) - from SLURM_NNODES, SLURM_NODEID, "
           f"SLURM_JOB_NODELIST")
    return new, msg


def apply_slurm_environment(cfg: PipelineConfig, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Fill ``cfg.distributed`` from SLURM (see ``slurm_distributed``) and log what was filled."""
    dist, msg = slurm_distributed(cfg.distributed, env)
    if msg:
        log(msg)
        cfg = replace(cfg, distributed=dist)
    return cfg


def _leader_token(cfg: PipelineConfig, env: Mapping[str, str]) -> Path:
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    return Path(cfg.paths.run_dir) / NODES_DIR / f"job_{env.get('SLURM_JOB_ID', 'none')}_restart_{restart}.json"


def check_run_dir_shared(cfg: PipelineConfig, env: Mapping[str, str] | None = None, *,
                         timeout_s: float | None = None, poll_s: float = 1.0) -> None:
    """At the start of a multi-node job: the leader writes a file for this job run into the run
    directory; each follower waits until it sees that file (SHARED_DIR_TIMEOUT_S), so a run directory
    the nodes do not share fails here in seconds, not after FOLLOWER_TIMEOUT_S of waiting for a merge.
    Nothing to do on one machine."""
    env = os.environ if env is None else env
    if cfg.distributed.num_machines <= 1:
        return
    timeout_s = SHARED_DIR_TIMEOUT_S if timeout_s is None else timeout_s
    token = _leader_token(cfg, env)
    node = env.get("SLURMD_NODENAME", "?")
    if not is_follower(cfg):
        token.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(token, {"node": node, "time": time.time()})
        return
    deadline = time.time() + timeout_s
    while True:
        try:
            # Listing the directory, not stat of the file: NFS revalidates a listing, while a
            # cached "no such file" may last up to acdirmax.
            if token.name in os.listdir(token.parent):
                return
        except FileNotFoundError:
            pass
        if time.time() > deadline:
            raise ConfigError(
                "paths.run_dir",
                f"node {node} (machine_rank {cfg.distributed.machine_rank}) did not see {token} within "
                f"{timeout_s:.0f} s; the leader node ({cfg.distributed.main_process_ip}) writes it at job start: "
                f"the nodes do not share {cfg.paths.run_dir}",
                "put paths.output_root on a filesystem every node mounts (NFS, Lustre, GPFS), not a node-local "
                "disk such as /tmp; on a slow shared filesystem raise DUS_SHARED_DIR_TIMEOUT_S")
        time.sleep(poll_s)


def is_follower(cfg: PipelineConfig) -> bool:
    return cfg.distributed.num_machines > 1 and cfg.distributed.machine_rank > 0


def record_leader_failure(cfg: PipelineConfig, error: BaseException) -> None:
    """Called by the leader when its driver fails, so followers stop waiting."""
    if cfg.distributed.num_machines > 1 and cfg.distributed.machine_rank == 0:
        Path(cfg.paths.run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.paths.run_dir) / LEADER_FAILED,
                          {"time": time.time(), "error": f"{type(error).__name__}: {error}"})


def _wait(what: str, ready: Callable[[], bool], cfg: PipelineConfig, since: float, timeout_s: float,
          poll_s: float = 2.0) -> None:
    failed = Path(cfg.paths.run_dir) / LEADER_FAILED
    deadline = time.time() + timeout_s
    while not ready():
        # A failure file older than this follower is a previous attempt's.
        if failed.is_file() and failed.stat().st_mtime >= since:
            raise StageFailed(f"the leader node failed ({json.loads(failed.read_text())['error']}); "
                              f"stopped waiting for {what}")
        if time.time() > deadline:
            raise StageFailed(f"waited {timeout_s:.0f}s for {what} from the leader node (machine_rank 0); "
                              f"is {cfg.paths.run_dir} on a filesystem all nodes share?")
        time.sleep(poll_s)


def run_follower(cfg: PipelineConfig, *, timeout_s: float = FOLLOWER_TIMEOUT_S) -> dict:
    """A follower node's part of the pipeline: join each selected training stage (see module doc)."""
    since = time.time()
    stages = [s.name for s in selected_stages(cfg)]
    trained = [s for s in stages if isinstance(get_stage(s), TrainingStage)]
    log(f"machine_rank {cfg.distributed.machine_rank}: following the leader for {trained}")
    for i, stage in enumerate(stages):
        if stage not in trained:
            continue
        # The stage's input is the model of the stage right before it in this run; waiting for
        # "any" earlier stage would start training from base while the leader is still merging.
        before = [s for s in stages[:i] if s in ("base", "merge", *trained)]
        needs = [RESOLVED_CONFIG] + ([before[-1]] if before else [])

        def ready() -> bool:
            if not (Path(cfg.paths.run_dir) / RESOLVED_CONFIG).is_file():
                return False
            return not before or read_manifest(stage_dir(cfg.paths.run_dir, before[-1])) is not None

        _wait(f"{stage}'s input ({', '.join(needs)})", ready, cfg, since, timeout_s)
        # The leader's driver writes the manifest after every node's ranks have finished.
        join_training_stage(cfg, stage, wait_for_manifest_s=timeout_s)
    return {}



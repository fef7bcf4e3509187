"""Launching training stages and making every rank know who it is.

Training stages run under ``accelerate launch`` with DeepSpeed. Two things here exist because the
obvious way is wrong (see STACK-NOTES):
- without a GPU, ``accelerate launch --use_deepspeed`` starts N processes but accelerate's
  ``PartialState`` ends with backend None and ``process_index=0`` on every rank, so every rank
  acts as main and the data is not sharded. ``init_distributed_state`` creates the state on gloo
  first, and the Trainer is told to use it (``accelerator_config={"use_configured_state": True}``).
- ``accelerate launch --cpu`` silently drops DeepSpeed, so it is never used.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from pathlib import Path

from pipeline.config import DistributedConfig
from pipeline.errors import ConfigError

# Variables a launcher sets for its children; a driver that itself runs under a launcher must not
# leak them into the `accelerate launch` it starts, or the child joins the wrong process group.
_LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "DEEPSPEED_", "OMPI_", "PMI_")
_LAUNCHER_ENV_NAMES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or launched_world_size() > 1


def clean_child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in _LAUNCHER_ENV_NAMES and not k.startswith(_LAUNCHER_ENV_PREFIXES)
    }
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config_path(dist: DistributedConfig, conf_dir: str) -> Path:
    if dist.deepspeed_config:
        return Path(dist.deepspeed_config)
    suffix = "_offload" if dist.offload else ""
    return Path(conf_dir) / "deepspeed" / f"zero{dist.zero_stage}{suffix}.json"


def load_deepspeed_config(dist: DistributedConfig, conf_dir: str) -> dict:
    """The DeepSpeed config for training; an accelerate config's file wins when the user gave one."""
    user_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    path = Path(user_file) if user_file else deepspeed_config_path(dist, conf_dir)
    field = "accelerate config deepspeed_config_file" if user_file else "distributed.deepspeed_config"
    if not path.is_file():
        raise ConfigError(field, f"DeepSpeed config {path} does not exist", "point it at a JSON file (see conf/deepspeed/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(field, f"{path} is not valid JSON ({e})") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if not user_file and stage != dist.zero_stage:
        raise ConfigError(
            "distributed.zero_stage",
            f"is {dist.zero_stage} but {path} sets zero_optimization.stage={stage}",
            "make them agree (or leave distributed.deepspeed_config null to pick conf/deepspeed/zero<stage>.json)",
        )
    return ds


def validate_distributed(dist: DistributedConfig, conf_dir: str) -> None:
    if dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("distributed.zero_stage", f"must be 0, 1, 2 or 3, got {dist.zero_stage}")
    if dist.offload and dist.zero_stage < 2:
        raise ConfigError("distributed.offload", "CPU offload needs ZeRO stage 2 or 3", "set distributed.zero_stage=3")
    if dist.num_processes < 1 or dist.num_machines < 1:
        raise ConfigError("distributed.num_processes", "num_processes and num_machines must be >= 1")
    if dist.num_processes % dist.num_machines:
        raise ConfigError(
            "distributed.num_processes",
            f"{dist.num_processes} processes do not divide evenly over {dist.num_machines} machines",
            "num_processes is the total over all machines",
        )
    if dist.num_machines > 1 and not dist.main_process_ip:
        raise ConfigError("distributed.main_process_ip", "multi-node training needs the main node's address",
                          "set it (under SLURM: the first host of $SLURM_JOB_NODELIST)")
    if dist.num_machines > 1 and not dist.main_process_port:
        # Each node would pick its own free port and wait for the others forever.
        raise ConfigError("distributed.main_process_port", "multi-node training needs one port that every node uses",
                          "set it (or export MASTER_PORT); inside a SLURM job the driver derives it from the job id")
    load_deepspeed_config(dist, conf_dir)


def accelerate_launch_command(dist: DistributedConfig, conf_dir: str, module_args: list[str]) -> list[str]:
    """``accelerate launch`` for one training stage, DeepSpeed always on (never ``--cpu``)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--use_deepspeed",
        "--deepspeed_config_file", str(deepspeed_config_path(dist, conf_dir)),
        "--num_processes", str(dist.num_processes),
        "--num_machines", str(dist.num_machines),
        "--machine_rank", str(dist.machine_rank),
        "--main_process_port", str(dist.main_process_port or free_port()),
        "--dynamo_backend", "no",
        # Precision is chosen by the stage itself (bf16 on GPUs, fp32 on CPU) through the Trainer.
        "--mixed_precision", "no",
    ]
    if dist.zero_stage == 3:
        cmd += ["--zero3_init_flag", "true"]
    if dist.main_process_ip:
        cmd += ["--main_process_ip", dist.main_process_ip]
    if dist.num_machines > 1:
        # One `accelerate launch` per node (torchrun underneath). accelerate's default multi-node
        # DeepSpeed launcher is pdsh: it runs the `deepspeed` script to ssh into the other nodes,
        # and first appends this process's whole environment (tokens included) to ./.deepspeed_env.
        cmd += ["--deepspeed_multinode_launcher", "standard"]
    cmd += list(dist.accelerate_args)
    cmd += ["-m", *module_args]
    return cmd


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def init_distributed_state():
    """Create accelerate's process state so that every rank knows its rank (see module doc)."""
    import torch
    from accelerate import PartialState

    if launched_world_size() > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        return PartialState(backend="gloo")
    return PartialState()

"""Checks that run before any expensive work, reporting every problem found at once.

A problem is a ``ConfigError`` naming the field or file and what to do. Nothing here trains,
merges or writes model files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.checks.estimates import (
    ASSUMED_BYTES_PER_TOKEN,
    RunEstimate,
    estimate_stage,
    format_estimates,
    local_data_bytes,
    shape_from_config,
    shape_from_demo,
)
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.data.splits import check_split_fractions
from pipeline.errors import ConfigError
from pipeline.fsutil import fmt_bytes
from pipeline.log import log
from pipeline.manifest import read_manifest, stage_dir
from pipeline.merge import validate_merge
from pipeline.merge.plan import planned_num_layers
from pipeline.stages import get_stage, selected_stages
from pipeline.stages.merge import resolved_merge_config
from pipeline.training.callbacks import device_peak_flops
from pipeline.training.distributed import load_deepspeed_config, validate_distributed
from pipeline.training.model import use_bf16


class PreflightFailed(ConfigError):
    """Several problems at once (one ConfigError each)."""

    def __init__(self, problems: list[ConfigError]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__("preflight", f"{len(problems)} problem(s) found before starting:\n{lines}")


def check_data_settings(cfg: PipelineConfig, stages: list[str]) -> None:
    # The held-out and selection splits' shares, each in [0, 1), leaving records to train on.
    check_split_fractions(cfg.data.heldout_fraction, cfg.data.selection_fraction)


def check_stages(cfg: PipelineConfig, stages: list[str]) -> None:
    """Each selected stage's own checks (pipeline/stages/*.py), and always the base model's: every
    stage's input comes from it. Every problem is collected."""
    problems: list[ConfigError] = []
    for stage in [get_stage("base"), *(s for s in selected_stages(cfg) if s.name != "base")]:
        try:
            stage.check(cfg, stages)
        except PreflightFailed as e:
            problems.extend(e.problems)
        except ConfigError as e:
            problems.append(e)
    if problems:
        raise PreflightFailed(problems)


def check_distributed(cfg: PipelineConfig, stages: list[str]) -> None:
    if any(s in stages for s in ("cpt", "sft")) and cfg.distributed.launcher == "accelerate":
        validate_distributed(cfg.distributed, cfg.paths.conf_dir)
    if cfg.distributed.launcher not in ("accelerate", "inprocess"):
        raise ConfigError("distributed.launcher", f"unknown launcher '{cfg.distributed.launcher}'", "use accelerate or inprocess")


def check_precision(cfg: PipelineConfig, stages: list[str]) -> None:
    """bf16 that this machine cannot train in (no bf16 GPU; on CPU: under DeepSpeed, or no bf16 cores)."""
    for stage in selected_stages(cfg):
        tc = getattr(cfg, stage.name, None)
        if isinstance(tc, TrainConfig) and tc.enabled and tc.bf16:
            try:
                use_bf16(tc.bf16, deepspeed=cfg.distributed.launcher == "accelerate")
            except ConfigError as e:
                raise ConfigError(f"{stage.name}.bf16", e.problem, e.fix) from None


CHECKS: list[Callable[[PipelineConfig, list[str]], None]] = [check_data_settings, check_stages, check_distributed,
                                                             check_precision]


def preflight(cfg: PipelineConfig) -> None:
    stages = [s.name for s in selected_stages(cfg)]
    problems: list[ConfigError] = []
    # The disk and pickle checks are defined below (kept apart from the data checks above).
    for check in [*CHECKS, check_pickle_only_base, check_context_length, check_batch_arithmetic, check_disk_space]:
        try:
            check(cfg, stages)
        except PreflightFailed as e:
            problems.extend(e.problems)
        except ConfigError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightFailed(problems)
    print_estimates(cfg, stages)


def check_pickle_only_base(cfg: PipelineConfig, stages: list[str]) -> None:
    """A base model with only pickle weights (pytorch_model*.bin) is refused unless model.allow_pickle:
    unpickling can run code. (With a merge in this run the merge's own check says the same.)"""
    if cfg.model.demo is not None or cfg.model.allow_pickle or "merge" in stages:
        return
    path = Path(cfg.model.name_or_path).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        raise ConfigError("model.allow_pickle", f"{path} holds only PyTorch pickle weights ({pickles[0].name}); "
                          "loading pickles can run arbitrary code, so they are refused by default",
                          "convert the model to safetensors, or set model.allow_pickle=true "
                          "(loaded with torch.load(weights_only=True))")


def check_context_length(cfg: PipelineConfig, stages: list[str]) -> None:
    """Sequences no longer than the model's context: the merged model keeps the base's
    max_position_embeddings, and rotary positions past it are untrained (or an index error)."""
    base = _base_shape(cfg)
    limit = base[0].max_position_embeddings if base else None
    if not limit:
        return
    where = "model.demo.max_position_embeddings" if cfg.model.demo is not None else f"{cfg.model.name_or_path}/config.json"
    # cpt blocks are always seq_len long; sft.max_length only caps a conversation unless packing
    # fills every sequence to it.
    for stage, fieldname, value, builds_full_length in (
            ("cpt", "cpt.seq_len", cfg.cpt.seq_len, True),
            ("sft", "sft.max_length", cfg.sft.max_length, cfg.sft.packing)):
        if stage in stages and getattr(cfg, stage).enabled and builds_full_length and value > limit:
            raise ConfigError(fieldname, f"{value} is longer than the model's context ({where}: max_position_embeddings={limit})",
                              f"set {fieldname} <= {limit}")


def check_batch_arithmetic(cfg: PipelineConfig, stages: list[str]) -> None:
    """Batch sizes fixed in the DeepSpeed config must equal the Trainer's: DeepSpeed asserts
    train_batch_size == micro batch x accumulation x world size only once the processes are up."""
    dist = cfg.distributed
    if dist.launcher != "accelerate" or not any(s in stages for s in ("cpt", "sft")):
        return
    if dist.num_processes < 1:
        return  # reported by the distributed check
    try:
        ds = load_deepspeed_config(dist, cfg.paths.conf_dir)
    except ConfigError:
        return  # reported by the distributed check
    world = dist.num_processes
    for stage in ("cpt", "sft"):
        tc = getattr(cfg, stage)
        if stage not in stages or not tc.enabled:
            continue
        for fieldname, value in (("per_device_train_batch_size", tc.per_device_train_batch_size),
                                 ("gradient_accumulation_steps", tc.gradient_accumulation_steps)):
            if value < 1:
                raise ConfigError(f"{stage}.{fieldname}", f"must be >= 1, got {value}")
        ours = {"train_micro_batch_size_per_gpu": tc.per_device_train_batch_size,
                "gradient_accumulation_steps": tc.gradient_accumulation_steps,
                "train_batch_size": tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world}
        for key, want in ours.items():
            got = ds.get(key, "auto")
            if got != "auto" and got != want:
                raise ConfigError(
                    "distributed.deepspeed_config",
                    f"sets {key}={got} but {stage} runs {tc.per_device_train_batch_size} per device x "
                    f"{tc.gradient_accumulation_steps} accumulation x {world} processes "
                    f"(train_batch_size {ours['train_batch_size']}, {key} {want})",
                    f'set "{key}": "auto" in the DeepSpeed JSON (the Trainer fills it in), or change '
                    f"{stage}.per_device_train_batch_size / {stage}.gradient_accumulation_steps / distributed.num_processes")


# --------------------------------------------------------------------- disk, memory and time estimates
# Kept apart from the data/model checks above: arithmetic on the model's shape and the training
# settings (pipeline/resources.py), never loading a model.

DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "float64": 8}


def _base_shape(cfg: PipelineConfig):
    """(shape of the base model, its stored bytes per weight), or None when unknown here (a hub id
    not in the local cache: the model checks report that)."""
    import json

    if cfg.model.demo is not None:
        return shape_from_demo(cfg.model.demo), 4  # built and saved in fp32 (pipeline/demo.py)
    path = Path(cfg.model.name_or_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        return shape_from_config(config), DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype")), 4)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # reported by the model checks


def _merged_layers(cfg: PipelineConfig, base_layers: int) -> int:
    if cfg.merge.merge_method == "auto" and cfg.merge.target_layers:
        return cfg.merge.target_layers
    try:
        return planned_num_layers(cfg.merge, base_layers=base_layers)
    except ConfigError:
        return base_layers  # the merge's own check reports the config


def estimate_run(cfg: PipelineConfig, stages: list[str]):
    """Disk, memory and time figures for this run, or None when the base model's shape is unknown."""
    import dataclasses

    base = _base_shape(cfg)
    if base is None:
        return None
    shape, base_wbytes = base
    est = None
    if "merge" in stages and cfg.model.demo is None:
        # The exact figures, from the plan the merge itself will follow (safetensors headers only).
        try:
            plan = validate_merge(resolved_merge_config(cfg, cfg.model.name_or_path), base_model=cfg.model.name_or_path,
                                  allow_pickle=cfg.model.allow_pickle, trust_remote_code=cfg.model.trust_remote_code)
            est = RunEstimate(shape=shape_from_config(plan.out_config), merged_params=plan.num_parameters,
                              merged_layers=len(plan.layer_map), merge_bytes=plan.bytes_to_write, merge_exact=True)
            new_layers = len(plan.new_layers)
        except (ConfigError, KeyError, TypeError, ValueError):
            est = None  # the model checks report why
    if est is None:
        layers = _merged_layers(cfg, shape.num_layers) if "merge" in stages else shape.num_layers
        out_bytes = DTYPE_BYTES.get(str(cfg.merge.out_dtype or cfg.merge.dtype), base_wbytes)
        merged = dataclasses.replace(shape, num_layers=layers)
        est = RunEstimate(shape=merged, merged_params=merged.num_parameters(), merged_layers=layers,
                          merge_bytes=merged.num_parameters() * out_bytes if "merge" in stages else 0,
                          merge_exact=False)
        new_layers = max(0, layers - shape.num_layers)
    if cfg.model.demo is not None and "base" in stages:
        est.base_bytes = shape.num_parameters() * 4

    dist = cfg.distributed
    world = dist.num_processes if dist.launcher == "accelerate" else 1
    zero = dist.zero_stage if dist.launcher == "accelerate" else 0
    offload_opt = offload_param = False
    if dist.launcher == "accelerate":
        try:
            zo = load_deepspeed_config(dist, cfg.paths.conf_dir).get("zero_optimization", {})
            offload_opt = (zo.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
            offload_param = (zo.get("offload_param") or {}).get("device", "none") not in ("none", None)
        except ConfigError:
            offload_opt = offload_param = dist.offload  # the distributed check reports the file
    peak = _peak()
    n, layers = est.merged_params, est.merged_layers
    for stage in ("cpt", "sft"):
        tc = getattr(cfg, stage)
        if stage not in stages or not tc.enabled:
            continue
        wbytes = 2 if _bf16(tc.bf16) else 4
        if stage == "cpt":
            seq_len = cfg.cpt.seq_len
            if cfg.cpt.trainable_layers or cfg.cpt.trainable_patterns or cfg.cpt.trainable_from_merge:
                chosen = len(set(cfg.cpt.trainable_layers or [])) + (new_layers if cfg.cpt.trainable_from_merge else 0)
                trainable = min(n, chosen * est.shape.params_per_layer)
                if cfg.cpt.trainable_patterns:
                    est.notes.append("cpt.trainable_patterns are not counted in the trainable parameters")
            else:
                trainable = n
            data = local_data_bytes(list(cfg.data.cpt_files))
        else:
            seq_len = cfg.sft.max_length
            trainable = est.shape.lora_parameters(cfg.sft.lora_r, layers) if cfg.sft.use_lora else n
            data = local_data_bytes(list(cfg.data.sft_files))
        # A LoRA stage exports the adapter; a full one the whole model in the training precision.
        export = trainable * 4 if stage == "sft" and cfg.sft.use_lora else n * wbytes
        est.stages.append(estimate_stage(
            stage=stage, shape=est.shape, num_layers=layers, n_params=n, n_trainable=trainable, weight_bytes=wbytes,
            tc=tc, seq_len=seq_len, world_size=world, zero_stage=zero, offload_optimizer=offload_opt,
            offload_param=offload_param, export_bytes=export,
            dataset_tokens=data / ASSUMED_BYTES_PER_TOKEN if data is not None else None, peak=peak))
    return est


def _bf16(requested) -> bool:
    try:
        return use_bf16(requested)
    except ConfigError:
        return True  # bf16 requested without a GPU: the training stage refuses it; estimate as asked


def _peak() -> tuple:
    return device_peak_flops()


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_needs(cfg: PipelineConfig, stages: list[str], est) -> list[tuple[str, Path, int, str]]:
    """(config field, directory, bytes, what) for everything this run writes. Stages that already
    finished in this run directory write nothing again."""
    run_dir, cache = Path(cfg.paths.run_dir), Path(cfg.paths.cache_dir)
    done = {s for s in ("merge", "cpt", "sft") if read_manifest(stage_dir(run_dir, s)) is not None}
    needs = []
    if est.base_bytes:
        needs.append(("paths.cache_dir", cache, est.base_bytes, "demo base model"))
    if "merge" in stages and "merge" not in done:
        needs.append(("paths.cache_dir", cache, est.merge_bytes, "merged model"))
        if _existing_ancestor(cache).stat().st_dev != _existing_ancestor(run_dir).stat().st_dev:
            # Hard links do not cross filesystems: the run gets a copy (pipeline/fsutil.link_or_copy_tree).
            needs.append(("paths.output_root", run_dir, est.merge_bytes, "copy of the merged model"))
    for s in est.stages:
        if s.stage in done:
            continue
        needs.append(("paths.output_root", run_dir, s.checkpoint_bytes * s.checkpoints_kept,
                      f"{s.stage} checkpoints ({s.checkpoints_kept} x {s.checkpoint_bytes / 1e9:.2f} GB)"))
        needs.append(("paths.output_root", run_dir, s.export_bytes, f"{s.stage} model export"))
    return needs


def check_disk_space(cfg: PipelineConfig, stages: list[str]) -> None:
    """The output locations are writable and their filesystems have room for what the run writes
    (free space from the real filesystem, ``shutil.disk_usage``)."""
    import os
    import shutil

    for fieldname, path in (("paths.output_root", Path(cfg.paths.run_dir)), ("paths.cache_dir", Path(cfg.paths.cache_dir))):
        anc = _existing_ancestor(path)
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ConfigError(fieldname, f"{path} cannot be created or written ({anc} is not writable)",
                              "point it at a writable directory")
    est = estimate_run(cfg, stages)
    if est is None:
        return
    by_fs: dict[int, list] = {}
    for need in disk_needs(cfg, stages, est):
        by_fs.setdefault(_existing_ancestor(need[1]).stat().st_dev, []).append(need)
    problems = []
    for needs in by_fs.values():
        total = sum(n[2] for n in needs)
        anc = _existing_ancestor(needs[0][1])
        free = shutil.disk_usage(anc).free
        if total > free:
            fields = sorted({n[0] for n in needs}, key=lambda f: f != "paths.output_root")
            where = " and ".join(dict.fromkeys(f"{n[0]} ({n[1]})" for n in needs))
            parts = ", ".join(f"{what} {fmt_bytes(b)}" for _, _, b, what in needs)
            problems.append(ConfigError(
                " / ".join(fields),
                f"needs about {fmt_bytes(total)} on the filesystem of {where} but only {fmt_bytes(free)} are free "
                f"there ({parts}; estimate, see docs/preflight.md)",
                "free some space, point paths.output_root / paths.cache_dir at a bigger disk, or keep fewer "
                "checkpoints (cpt.save_total_limit, sft.save_total_limit)"))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightFailed(problems)


def print_estimates(cfg: PipelineConfig, stages: list[str]) -> None:
    """Print the estimates before anything runs. A failure here never stops a run: they are advice."""
    try:
        est = estimate_run(cfg, stages)
    except Exception as e:  # noqa: BLE001 - an estimate must not block a run the checks passed
        log(f"estimates unavailable ({type(e).__name__}: {e})")
        return
    if est is not None:
        print(format_estimates(est), flush=True)

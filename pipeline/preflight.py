"""Checks that run before any expensive work, reporting every problem found at once.

A problem is a ``ConfigError`` naming the field or file and what to do. Nothing here trains,
merges or writes model files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.config import STAGES, PipelineConfig
from pipeline.errors import ConfigError


class PreflightFailed(ConfigError):
    def __init__(self, problems: list[ConfigError]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__("preflight", f"{len(problems)} problem(s) found before starting:\n{lines}")


def _check_files(files: list[str], *, field: str, column: str, column_field: str, txt_ok: bool, what: str) -> None:
    """Each file exists (or is a reachable hub dataset), is not empty, and has ``column``."""
    from pipeline.data import check_data_file, is_hub_dataset_name, read_rows, require_hub_access

    if not files:
        raise ConfigError(field, "is empty", f"list the {what}")
    for name in files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field=field)
            continue
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            if not txt_ok:
                raise ConfigError(field, f"{name} is a .txt file", f"give .jsonl/.json/.parquet rows with a '{column}' column")
            if path.stat().st_size == 0:
                raise ConfigError(field, f"{name} is empty")
            continue
        row = next(read_rows(path, field=field), None)
        if row is None:
            raise ConfigError(field, f"{name} has no rows")
        if column not in row:
            raise ConfigError(column_field, f"'{column}' is not a column of {name} (columns: {sorted(row)})",
                              f"set {column_field} to the right column, or convert the data")


def first_sft_rows(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """(file, first row) of each local sft file (hub datasets are checked for access only)."""
    from pipeline.data import check_data_file, is_hub_dataset_name, read_rows, require_hub_access

    out = []
    for name in cfg.data.sft_files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field="data.sft_files")
            continue
        path = check_data_file(name, field="data.sft_files")
        if path.suffix == ".txt":
            raise ConfigError("data.sft_files", f"{name} is a .txt file",
                              "give .jsonl/.json/.parquet rows: chat messages, ShareGPT, alpaca or prompt/completion")
        row = next(read_rows(path, field="data.sft_files"), None)
        if row is None:
            raise ConfigError("data.sft_files", f"{name} has no rows", "give a file with at least one conversation")
        out.append((name, row))
    return out


def check_sft_files(cfg: PipelineConfig) -> None:
    """Each sft file's first row converts to a conversation in its (detected) format."""
    from pipeline.data import sft_row_messages

    if not cfg.data.sft_files:
        raise ConfigError("data.sft_files", "is empty", "list the conversation files for sft")
    for name, row in first_sft_rows(cfg):
        sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column,
                         where=f"data.sft_files ({name}) row 0")


def check_sft_sample_formatting(cfg: PipelineConfig, tokenizer, source: str) -> None:
    """A sample row through the real formatting: the chat template applied and, with assistant-only
    loss, assistant tokens found (a template whose markers wrap nothing trains on nothing)."""
    from pipeline.data import sft_row_messages

    for name, row in first_sft_rows(cfg):
        msgs = sft_row_messages(row, fmt=cfg.data.sft_format, messages_column=cfg.data.messages_column,
                                where=f"data.sft_files ({name}) row 0")
        try:
            enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=cfg.sft.assistant_only_loss)
        except Exception as e:  # noqa: BLE001 - jinja/template errors come in many types; the user needs the cause
            raise ConfigError(f"tokenizer of {source}", f"its chat template fails on {name} row 0 ({type(e).__name__}: {e})",
                              "fix the template or the data's roles") from None
        if cfg.sft.assistant_only_loss and not any(enc["assistant_masks"]):
            raise ConfigError("sft.assistant_only_loss",
                              f"the chat template of {source} marks no assistant token in {name} row 0",
                              "put {% generation %} ... {% endgeneration %} around the assistant content")


def check_cpt_mixture(cfg: PipelineConfig) -> None:
    """Weights match the files; streaming has a step count."""
    from pipeline.cpt_data import cpt_sources

    cpt_sources(cfg)
    if cfg.data.streaming and cfg.cpt.max_steps <= 0:
        raise ConfigError("cpt.max_steps", "must be > 0 with data.streaming=true (a stream has no length to count epochs in)",
                          "set cpt.max_steps to the number of optimizer steps to train")


def check_data(cfg: PipelineConfig, stages: list[str]) -> None:
    if "cpt" in stages or "eval" in stages:
        _check_files(list(cfg.data.cpt_files), field="data.cpt_files", column=cfg.data.text_column,
                     column_field="data.text_column", txt_ok=True, what="raw-text files for continued pretraining")
    if "sft" in stages or "eval" in stages:
        check_sft_files(cfg)
    if "cpt" in stages and cfg.cpt.enabled:
        check_cpt_mixture(cfg)
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError("data.heldout_fraction", f"must be in [0, 1), got {cfg.data.heldout_fraction}")


def check_base_and_merge(cfg: PipelineConfig, stages: list[str]) -> None:
    """The base model exists and the slices fit it (for the demo: against the configured depth,
    since the model is built later)."""
    if cfg.model.demo is not None:
        from pipeline.demo import validate_demo_config

        validate_demo_config(cfg.model.demo, cfg.data.heldout_fraction)
        if "merge" in stages and not cfg.merge.config_file and cfg.merge.merge_method == "passthrough":
            depth = cfg.model.demo.num_hidden_layers
            for i, s in enumerate(cfg.merge.slices):
                for j, src in enumerate(s.sources):
                    lo, hi = (list(src.layer_range) + [None, None])[:2]
                    if lo is None or hi is None or not (0 <= lo < hi <= depth):
                        raise ConfigError(
                            f"merge.slices[{i}].sources[{j}].layer_range",
                            f"{list(src.layer_range)} is not a non-empty [start, end) range inside the base model's {depth} layers",
                            f"use 0 <= start < end <= {depth}",
                        )
        return
    src = cfg.model.name_or_path
    looks_local = src.startswith((".", "/", "~")) or Path(src).exists()
    if looks_local and not Path(src).is_dir():
        raise ConfigError("model.name_or_path", f"model directory {src} does not exist", "fix the path")
    if looks_local and not (Path(src) / "config.json").is_file():
        raise ConfigError("model.name_or_path", f"{src} has no config.json: not a Hugging Face model directory")
    if "merge" in stages:
        from pipeline.driver import resolved_merge_config
        from pipeline.merge import validate_merge

        validate_merge(resolved_merge_config(cfg, src), base_model=src, allow_pickle=cfg.model.allow_pickle)
    if "sft" in stages and cfg.sft.enabled and looks_local:
        from transformers import AutoTokenizer

        from pipeline.sft import check_chat_template

        tok_src = cfg.merge.tokenizer_source or src
        if Path(tok_src).is_dir():
            tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=cfg.model.trust_remote_code)
            check_chat_template(tok, assistant_only_loss=cfg.sft.assistant_only_loss, source=tok_src)
            check_sft_sample_formatting(cfg, tok, tok_src)


def check_distributed(cfg: PipelineConfig, stages: list[str]) -> None:
    from pipeline.distributed import validate_distributed

    if any(s in stages for s in ("cpt", "sft")) and cfg.distributed.launcher == "accelerate":
        validate_distributed(cfg.distributed, cfg.paths.conf_dir)
    if cfg.distributed.launcher not in ("accelerate", "inprocess"):
        raise ConfigError("distributed.launcher", f"unknown launcher '{cfg.distributed.launcher}'", "use accelerate or inprocess")


def check_eval(cfg: PipelineConfig, stages: list[str]) -> None:
    bad = [s for s in cfg.eval.stages if s not in STAGES or s == "eval"]
    if bad:
        raise ConfigError("eval.stages", f"unknown stage(s) {bad}", "use base, merge, cpt, sft")
    if "eval" in stages and cfg.eval.enabled and cfg.eval.use_harness and cfg.eval.harness_tasks:
        from pipeline.evaluate import check_tasks_available

        # Offline without the datasets cached (e.g. eval=leaderboard), fail now, not after training.
        check_tasks_available(list(cfg.eval.harness_tasks), include_path=cfg.eval.harness_include_path)


def check_release(cfg: PipelineConfig, stages: list[str]) -> None:
    if "eval" in stages and cfg.release.enabled and cfg.release.push_to_hub:
        from pipeline.release import check_push_settings

        check_push_settings(repo_id=cfg.release.repo_id, dry_run=cfg.release.dry_run, token_env=cfg.release.token_env)


CHECKS: list[Callable[[PipelineConfig, list[str]], None]] = [
    check_data, check_base_and_merge, check_distributed, check_eval, check_release,
]


def preflight(cfg: PipelineConfig) -> None:
    from pipeline.driver import selected_stages

    stages = selected_stages(cfg)
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
    from pipeline.distributed import load_deepspeed_config

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

    from pipeline.resources import shape_from_config, shape_from_demo

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


def _merged_layers_from_config(cfg: PipelineConfig, base_layers: int) -> int:
    m = cfg.merge
    if m.merge_method == "dus" and m.n_layers_removed is not None:
        return 2 * (base_layers - m.n_layers_removed)
    if m.merge_method == "block_expansion" and m.block_expansion_group_size:
        return base_layers + base_layers // m.block_expansion_group_size
    if m.slices and not m.config_file:
        total = 0
        for s in m.slices:
            rng = list(s.sources[0].layer_range) if s.sources else []
            total += (rng[1] - rng[0]) if len(rng) == 2 else base_layers
        return total
    return base_layers


def estimate_run(cfg: PipelineConfig, stages: list[str]):
    """Disk, memory and time figures for this run, or None when the base model's shape is unknown."""
    import dataclasses

    from pipeline.distributed import load_deepspeed_config
    from pipeline.resources import RunEstimate, estimate_stage, local_data_bytes, shape_from_config
    from pipeline.resources import ASSUMED_BYTES_PER_TOKEN

    base = _base_shape(cfg)
    if base is None:
        return None
    shape, base_wbytes = base
    est = None
    if "merge" in stages and cfg.model.demo is None:
        # The exact figures, from the plan the merge itself will follow (safetensors headers only).
        try:
            from pipeline.driver import resolved_merge_config
            from pipeline.merge import validate_merge

            plan = validate_merge(resolved_merge_config(cfg, cfg.model.name_or_path), base_model=cfg.model.name_or_path,
                                  allow_pickle=cfg.model.allow_pickle, trust_remote_code=cfg.model.trust_remote_code)
            est = RunEstimate(shape=shape_from_config(plan.out_config), merged_params=plan.num_parameters,
                              merged_layers=len(plan.layer_map), merge_bytes=plan.bytes_to_write, merge_exact=True)
            new_layers = len(plan.new_layers)
        except (ConfigError, KeyError, TypeError, ValueError):
            est = None  # the model checks report why
    if est is None:
        layers = _merged_layers_from_config(cfg, shape.num_layers) if "merge" in stages else shape.num_layers
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
    from pipeline.train import use_bf16

    try:
        return use_bf16(requested)
    except ConfigError:
        return True  # bf16 requested without a GPU: the training stage refuses it; estimate as asked


def _peak() -> tuple:
    from pipeline.train import device_peak_flops

    return device_peak_flops()


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_needs(cfg: PipelineConfig, stages: list[str], est) -> list[tuple[str, Path, int, str]]:
    """(config field, directory, bytes, what) for everything this run writes. Stages that already
    finished in this run directory write nothing again."""
    from pipeline.manifest import read_manifest, stage_dir

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

    from pipeline.resources import fmt_bytes

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
    from pipeline.resources import format_estimates

    try:
        est = estimate_run(cfg, stages)
    except Exception as e:  # noqa: BLE001 - an estimate must not block a run the checks passed
        print(f"[dus] estimates unavailable ({type(e).__name__}: {e})", flush=True)
        return
    if est is not None:
        print(format_estimates(est), flush=True)

"""What cpt and sft share: model loading, Trainer arguments, rank bookkeeping, throughput and
MFU logging, and the verified hand-off of a trained model to the next stage.

A stage's life (``run_training_stage``): find the input through the previous manifest -> build data
and model -> ``Trainer.train`` (resuming from the stage's own checkpoints if a previous attempt was
interrupted) -> save the consolidated model into the stage's partial directory -> compute the loss
of a fixed batch with the in-memory (possibly ZeRO-3-sharded) model on every rank -> rank 0 reloads
the saved directory in a fresh process and checks that loss -> manifest -> rename into place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import ConfigError, StageFailed
from pipeline.distributed import init_distributed_state, load_deepspeed_config
from pipeline.fsutil import atomic_write_json, disk_full_guard, fsync_tree, hash_path, partial_dir_for
from pipeline.resume import CheckpointBookkeeping, FaultInjection, plan_resume
from pipeline.manifest import latest_model_stage, resolve_model_dir, stage_dir, stage_key, write_manifest

# Dense bf16 peak FLOP/s per device, for MFU. Source: vendor datasheets (SXM parts, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}

# Relative tolerance when the reloaded model's fixed-batch loss is compared with the trained one.
VERIFY_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def use_bf16(requested: bool | None) -> bool:
    if requested is not None:
        if requested and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise ConfigError("bf16", "bf16=true needs a GPU with bf16 support", "leave it null (automatic) or set false on CPU")
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def attn_implementation(requested: str | None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def device_peak_flops() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "cpu (no published peak: MFU not reported)"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"{name}: unknown peak (MFU not reported)"


def training_flops_per_token(config, n_params: int, seq_len: int) -> float:
    """6·N per token for the matmuls (forward + backward) plus causal attention scores:
    12 · layers · hidden · seq_len / 2 (PaLM appendix B, halved for the causal mask)."""
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6 * n_params + 6 * layers * hidden * seq_len


def load_causal_lm(model_dir: str, *, bf16: bool, attn: str, trust_remote_code: bool, allow_pickle: bool = False):
    """Load a model for training. ``use_cache`` is turned off: transformers only derives the
    per-document (packed) attention mask from ``position_ids`` when no KV cache exists, and with
    ``use_cache=True`` it creates one even in training - packed documents would then attend to each
    other. The exported model gets ``use_cache=True`` back (``_finalize_model_files``).

    Safetensors only unless ``allow_pickle`` (model.allow_pickle): then ``pytorch_model*.bin`` is
    accepted too, read with ``torch.load(weights_only=True)`` (no arbitrary code from the pickle)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,  # None: safetensors if present, else *.bin
        weights_only=True,
    )
    model.config.use_cache = False
    return model


def trainer_kwargs(tc: TrainConfig, *, output_dir: Path, ds_config: dict | None, bf16: bool) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments (cpt) and TRL's SFTConfig (sft)."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=tc.learning_rate,
        max_steps=tc.max_steps,
        num_train_epochs=tc.num_train_epochs,
        per_device_train_batch_size=tc.per_device_train_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        warmup_steps=tc.warmup_steps,
        lr_scheduler_type=tc.lr_scheduler_type,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=tc.save_steps,
        # Kept by pipeline.resume.CheckpointBookkeeping instead, once every rank's part is on disk.
        save_total_limit=None,
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=tc.gradient_checkpointing,
        report_to=list(tc.report_to),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
    )
    if ds_config is not None:
        kwargs["deepspeed"] = ds_config
        # Use the PartialState created by init_distributed_state (gloo on CPU) - see distributed.py.
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def numel(param) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it (then ``numel()`` is 0)."""
    return getattr(param, "ds_numel", None) or param.numel()


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def freeze_except(model, *, layers: list[int] | None, patterns: list[str]) -> int:
    """Freeze every parameter except those of ``layers`` (decoder layer indices) or matching one
    of ``patterns``; returns the number of trainable parameters. No selection = all train."""
    if layers is None and not patterns:
        return sum(numel(p) for p in model.parameters())
    wanted = set(layers or [])
    regexes = [re.compile(p) for p in patterns]
    trainable = 0
    for name, param in model.named_parameters():
        m = _LAYER_INDEX.search(name)
        keep = (m is not None and int(m.group(1)) in wanted) or any(r.search(name) for r in regexes)
        param.requires_grad_(keep)
        trainable += numel(param) if keep else 0
    if trainable == 0:
        raise ConfigError("cpt.trainable_layers", f"selects no parameter (layers {sorted(wanted)}, patterns {patterns})",
                          "check the layer indices against the merged model's num_hidden_layers")
    return trainable


def layers_added_by_merge(merge_metrics: dict) -> list[int]:
    """Output layers the merge added: block expansion's inserted blocks, else each repeated source
    layer's later copies (a passthrough merge's duplicated layers)."""
    if merge_metrics.get("new_layers"):
        return list(merge_metrics["new_layers"])
    seen, added = set(), []
    for i, (model, layer) in enumerate(merge_metrics.get("layer_map", [])):
        if (model, layer) in seen:
            added.append(i)
        seen.add((model, layer))
    return added


class RecordingCollator:
    """Wraps a data collator and remembers a fingerprint of every example this rank trained on
    (the first ones), to prove that ranks are distinct and see different data."""

    def __init__(self, collate, keep_first: int = 64):
        self.collate, self.keep_first = collate, keep_first
        self.served: list[str] = []

    def __call__(self, examples):
        for ex in examples:
            if len(self.served) < self.keep_first:
                ids = ex["input_ids"]
                ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
                self.served.append(hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16])
        return self.collate(examples)


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s per device and MFU to the Trainer's logs."""

    def __init__(self, *, tokens_per_device_step: int, flops_per_token: float, world_size: int):
        self.tokens_per_device_step, self.flops_per_token, self.world_size = tokens_per_device_step, flops_per_token, world_size
        self.peak, self.peak_note = device_peak_flops()
        self.t0, self.step0, self.tokens0 = None, 0, 0

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.step0, self.tokens0 = time.perf_counter(), state.global_step, state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or state.global_step <= self.step0:
            return
        now = time.perf_counter()
        # Real (non-padding) tokens counted by the Trainer over all ranks; else the nominal count.
        seen = state.num_input_tokens_seen - self.tokens0
        per_device = seen / self.world_size if seen > 0 else (state.global_step - self.step0) * self.tokens_per_device_step
        tok_s = per_device / (now - self.t0)
        extra = {"tokens_per_s_per_device": round(tok_s, 1), "tokens_per_s_total": round(tok_s * self.world_size, 1)}
        if self.peak:
            extra["mfu"] = round(tok_s * self.flops_per_token / self.peak, 4)
        logs.update(extra)  # printed / sent to report_to
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer stored a copy before the callbacks ran
        self.t0, self.step0, self.tokens0 = now, state.global_step, state.num_input_tokens_seen


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (SLURM's warning before preemption) save a checkpoint and stop.

    The signal may reach only some ranks, and a ZeRO checkpoint is a collective save, so the
    ranks agree after every step through an all-reduce of the flag: all of them stop at the same
    step. The stage then exits non-zero without exporting; re-running resumes from that checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested = True

    def on_step_end(self, args, state, control, **kw):
        flag = torch.tensor([int(self.requested)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


@torch.no_grad()
def fixed_batch_loss(model, batch: dict[str, list[list[int]]]) -> float:
    """Loss of one fixed batch. Called on every rank at once under ZeRO-3 (parameters are gathered
    collectively during forward)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tensors = {k: torch.tensor(v, device=device) for k, v in batch.items()}
    loss = model(**tensors, use_cache=False).loss.float().item()
    model.train(was_training)
    return loss


def write_rank_record(log_dir: Path, *, stage: str, served: list[int], world_size: int, rank: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(log_dir / f"rank_{rank}.json", {
        "stage": stage, "rank": rank, "world_size": world_size,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "pid": os.getpid(),
        "host": os.uname().nodename, "served_indices": served,
    })


def write_log_history(log_dir: Path, history: list[dict]) -> None:
    """The Trainer's log history as JSON and CSV: local logs whatever ``report_to`` says."""
    import csv

    (log_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    columns = sorted({k for row in history for k in row}, key=lambda k: (k not in ("step", "epoch"), k))
    with open(log_dir / "log_history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes ``checkpoint-N/`` in place, each rank its
    own shards, so a save cut short (disk full, kill -9) leaves a directory that transformers'
    get_last_checkpoint would take (it only looks for the name; even ``trainer_state.json`` is
    written by rank 0 before the other ranks are done). Complete = marked by
    ``pipeline.resume.CheckpointBookkeeping`` after a barrier."""
    from pipeline.resume import complete_checkpoints

    complete = complete_checkpoints(checkpoint_dir)
    return str(complete[-1][1]) if complete else None


def resume_dir(cfg: PipelineConfig, stage: str, inputs: list[dict]) -> Path:
    """Where a stage's checkpoints live. Keyed like the result (a changed config or input never
    resumes stale state) except for the world size: a re-run on another number of processes resumes."""
    from pipeline.resume import resume_key

    key = resume_key(stage, stage_config_for_key(cfg, stage), inputs)
    return stage_dir(cfg.paths.run_dir, stage).parent / "checkpoints" / stage / key[:16]


def stage_input(cfg: PipelineConfig, stage: str) -> tuple[str, dict, str]:
    """(previous stage name, its manifest, its model dir) - the hand-off, read from manifests."""
    prev, manifest = latest_model_stage(cfg.paths.run_dir, stage)
    return prev, manifest, resolve_model_dir(cfg.paths.run_dir, prev, manifest)


def prepare_partial_dir(final: Path, *, is_main: bool, barrier) -> Path:
    partial = partial_dir_for(final)
    if is_main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    barrier()
    return partial


def verify_in_fresh_process(model_dir: Path, batch_file: Path, *, expected_loss: float, bf16: bool,
                            attn: str, merge_adapter_onto: str | None = None) -> dict:
    """Reload the saved model in a new process (no ZeRO state, no shared memory with training)
    and compare its fixed-batch loss with the trained model's."""
    from pipeline.distributed import clean_child_env

    cmd = [sys.executable, "-m", "pipeline.verify", str(model_dir), str(batch_file),
           "--bf16" if bf16 else "--fp32", "--attn", attn]
    if merge_adapter_onto:
        cmd += ["--merge-adapter-onto", merge_adapter_onto]
    proc = subprocess.run(cmd, env=clean_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"verification of {model_dir} failed:\n{proc.stderr[-4000:]}")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
    rtol = VERIFY_RTOL["bf16" if bf16 else "fp32"]
    diff = abs(reloaded - expected_loss)
    result = {"trained_fixed_batch_loss": expected_loss, "reloaded_fixed_batch_loss": reloaded,
              "abs_diff": diff, "rtol": rtol}
    if not math.isfinite(reloaded) or diff > rtol * max(abs(expected_loss), 1e-6):
        raise StageFailed(
            f"the saved model in {model_dir} does not reproduce the trained model: fixed-batch loss "
            f"{reloaded:.6f} after reload vs {expected_loss:.6f} in training (|diff| {diff:.2e} > "
            f"rtol {rtol}). With ZeRO-3 this is the known partial-save failure: keep "
            f"stage3_gather_16bit_weights_on_model_save=true in the DeepSpeed config."
        )
    return result


def finish_stage(cfg: PipelineConfig, *, stage: str, partial: Path, key: str, inputs: list[dict],
                 stage_config: dict, metrics: dict, started_at: float) -> Path:
    final = stage_dir(cfg.paths.run_dir, stage)
    # Trainer.save_model also writes its arguments as a pickle; that is resume state, not model.
    (partial / "training_args.bin").unlink(missing_ok=True)
    write_manifest(partial, stage=stage, key=key, inputs=inputs, config=stage_config, metrics=metrics,
                   started_at=started_at)
    fsync_tree(partial)
    if final.exists():
        shutil.rmtree(final)
    os.rename(partial, final)
    return final


def stage_config_for_key(cfg: PipelineConfig, stage: str) -> dict:
    """The part of the config that defines a training stage's result (its key)."""
    tc = getattr(cfg, stage)
    return {
        stage: asdict(tc),
        "data": asdict(cfg.data),
        "distributed": {"zero_stage": cfg.distributed.zero_stage, "num_processes": cfg.distributed.num_processes,
                        "num_machines": cfg.distributed.num_machines},
    }


def training_key(cfg: PipelineConfig, stage: str, inputs: list[dict]) -> str:
    return stage_key(stage, stage_config_for_key(cfg, stage), inputs)


def training_inputs(cfg: PipelineConfig, stage: str, prev_stage: str, prev_manifest: dict, input_model: str) -> list[dict]:
    inputs = [{"role": "model", "stage": prev_stage, "path": input_model, "sha256": prev_manifest["key"]}]
    for f in (cfg.data.cpt_files if stage == "cpt" else cfg.data.sft_files):
        inputs.append({"role": "data", "path": f, "sha256": hash_path(f)})
    return inputs


def run_training_stage(cfg: PipelineConfig, stage: str):
    """Train one stage ("cpt" or "sft") on every rank; rank 0 verifies, writes the manifest, renames."""
    from transformers import AutoTokenizer

    started = time.time()
    # DeepSpeed calls a torch API deprecated in 2.13 on every ZeRO step; one line per step buries the logs.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    state = init_distributed_state()
    is_main, rank, world = state.is_main_process, state.process_index, state.num_processes
    tc = getattr(cfg, stage)
    prev_stage, prev_manifest, input_model = stage_input(cfg, stage)
    ds_config = load_deepspeed_config(cfg.distributed, cfg.paths.conf_dir) if world > 1 or state.distributed_type.name == "DEEPSPEED" else None
    bf16, attn = use_bf16(tc.bf16), attn_implementation(tc.attn_implementation)

    inputs = training_inputs(cfg, stage, prev_stage, prev_manifest, input_model)
    key = training_key(cfg, stage, inputs)

    final = stage_dir(cfg.paths.run_dir, stage)
    partial = prepare_partial_dir(final, is_main=is_main, barrier=state.wait_for_everyone)
    checkpoint_dir = resume_dir(cfg, stage, inputs)
    # Before the Trainer exists: loading a checkpoint of another world size changes the DeepSpeed
    # config (universal checkpoint) and gradient accumulation (same global batch).
    plan = plan_resume(checkpoint_dir, stage=stage, world_size=world, deepspeed=ds_config is not None,
                       per_device_train_batch_size=tc.per_device_train_batch_size,
                       gradient_accumulation_steps=tc.gradient_accumulation_steps, is_main=is_main,
                       barrier=state.wait_for_everyone, log=(lambda m: print(m, flush=True)) if is_main else (lambda m: None))
    run_cfg = cfg
    if plan.gradient_accumulation_steps != tc.gradient_accumulation_steps:
        run_cfg = replace(cfg, **{stage: replace(tc, gradient_accumulation_steps=plan.gradient_accumulation_steps)})
    if plan.load_universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    tc = getattr(run_cfg, stage)
    tokenizer = AutoTokenizer.from_pretrained(input_model, trust_remote_code=cfg.model.trust_remote_code)

    if stage == "cpt":
        from pipeline.cpt import build_cpt_trainer as build_trainer
    else:
        from pipeline.sft import build_sft_trainer as build_trainer
    with disk_full_guard(cfg.paths.cache_dir):  # the tokenized-data cache is written there
        trainer, collator, fixed_batch, data_stats, seq_len, adapter = build_trainer(
            run_cfg, tokenizer=tokenizer, input_model=input_model, checkpoint_dir=checkpoint_dir,
            ds_config=ds_config, bf16=bf16, attn=attn,
        )
    model = trainer.model

    n_params = sum(numel(p) for p in model.parameters())
    n_trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    tokens_per_device_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * seq_len
    cb = ThroughputCallback(tokens_per_device_step=tokens_per_device_step,
                            flops_per_token=training_flops_per_token(model.config, n_params, seq_len), world_size=world)
    trainer.add_callback(cb)
    if is_main:
        print(f"[{stage}] input: {input_model} (from stage '{prev_stage}') | ranks: {world} | ZeRO: "
              f"{ds_config['zero_optimization']['stage'] if ds_config else 'off'} | precision: {'bf16' if bf16 else 'fp32'} | "
              f"attention: {attn} | params: {n_params:,} ({n_trainable:,} trainable) | "
              f"tokens/step: {tokens_per_device_step * world:,} | peak: {cb.peak_note} | data: {data_stats}", flush=True)

    resume = plan.checkpoint
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    if (fault := FaultInjection.from_env(rank)) is not None:
        trainer.add_callback(fault)  # before the bookkeeping: a kill "during the save" lands before the mark
    trainer.add_callback(CheckpointBookkeeping(
        world_size=world, zero_stage=ds_config["zero_optimization"]["stage"] if ds_config else None,
        keep=tc.save_total_limit, is_main=is_main, barrier=state.wait_for_everyone,
        per_device_train_batch_size=tc.per_device_train_batch_size, gradient_accumulation_steps=tc.gradient_accumulation_steps))
    # A checkpoint save that runs out of space ends as one clear error naming the directory.
    with disk_full_guard(checkpoint_dir):
        train_result = trainer.train(resume_from_checkpoint=resume)
    if preemption.stopped_at is not None:
        state.wait_for_everyone()
        if is_main:
            print(f"[{stage}] SIGTERM: checkpoint saved at step {preemption.stopped_at} in {checkpoint_dir}; "
                  f"run the same command again to resume", flush=True)
        sys.exit(128 + signal.SIGTERM)
    write_rank_record(partial / "logs", stage=stage, served=collator.served, world_size=world, rank=rank)

    # Every rank takes part: ZeRO-3 gathers the sharded weights collectively for both calls.
    save_target = partial / "adapter" if adapter else partial
    with disk_full_guard(save_target):
        trainer.save_model(str(save_target))
    trained_loss = fixed_batch_loss(trainer.model, fixed_batch)
    state.wait_for_everyone()

    if is_main:
        batch_file = partial / "logs" / "fixed_batch.json"
        batch_file.write_text(json.dumps(fixed_batch))
        if adapter:
            tokenizer.save_pretrained(partial)
        verification = verify_in_fresh_process(partial, batch_file, expected_loss=trained_loss, bf16=bf16, attn=attn,
                                               merge_adapter_onto=input_model if adapter else None)
        _finalize_model_files(partial, tokenizer)
        write_log_history(partial / "logs", trainer.state.log_history)
        metrics = {
            **{k: v for k, v in train_result.metrics.items() if isinstance(v, (int, float))},
            "global_step": trainer.state.global_step,
            "world_size": world,
            "num_parameters": n_params,
            "trainable_parameters": n_trainable,
            "tokens_seen": trainer.state.global_step * tokens_per_device_step * world,
            "precision": "bf16" if bf16 else "fp32",
            "attn_implementation": attn,
            "zero_stage": ds_config["zero_optimization"]["stage"] if ds_config else None,
            "resumed_from": resume,
            "resume": plan.metrics(),
            "verification": verification,
            **{f"data_{k}": v for k, v in data_stats.items()},
        }
        final = finish_stage(cfg, stage=stage, partial=partial, key=key, inputs=inputs,
                             stage_config=stage_config_for_key(cfg, stage), metrics=metrics, started_at=started)
        print(f"[{stage}] done: {final} | train loss {metrics.get('train_loss', float('nan')):.4f} | "
              f"verified reload: |diff| {verification['abs_diff']:.2e}", flush=True)
    state.wait_for_everyone()
    return stage_dir(cfg.paths.run_dir, stage)


def _finalize_model_files(model_dir, tokenizer) -> None:
    """What a released checkpoint needs (as alignment-handbook does): use_cache back on and the
    generation config's eos/pad from the tokenizer."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = True
    config.save_pretrained(model_dir)
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(model_dir)

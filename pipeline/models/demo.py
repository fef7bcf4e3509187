"""The embedded demo's base model: a tiny Mistral pretrained from scratch on the shipped corpus.

The demo has to run on a small CPU with no network, so it cannot download a base model. Instead
it trains its own byte-level BPE tokenizer and pretrains a tiny ``MistralForCausalLM`` on the
corpus's *train* split (the records that ``pipeline.data.split_records`` does not hold out); the
real pipeline then up-scales that model like any other Hugging Face checkpoint.

The result is an ordinary checkpoint directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load with no project
code, plus ``train_log.json`` (the loss curve), ``build_metrics.json`` (final train loss,
held-out loss/perplexity, a unigram baseline, tokens, time) and ``demo_build.json`` (the config). ``ensure_demo_base`` caches it under ``<cache_dir>/demo_base/<key>/``, keyed by the
config and the content of its input files, so it is built once and reused by later runs and
concurrent sweep jobs.

Tokenizer conventions (Mistral/Llama-like):

* ids 0..3 are ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, then the chat role markers
  ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Byte-level BPE covers every byte, so ``<unk>``
  is never produced; it exists for tools that expect one.
* ``tokenizer(text)`` prepends ``<s>`` (``add_bos_token=True``) and appends nothing
  (``add_eos_token=False``). Pretraining packs each record as ``<s> text </s>``, so the model
  sees a document start after every end-of-document, and the eos of a record is what separates
  it from the next one in a packed block.
* The chat template renders ``<s><|user|>question<|assistant|>answer</s>`` (a system turn is
  ``<|system|>text`` before the first user turn). Turns are delimited by special tokens only, so
  the tokens of a rendered conversation are exactly the concatenation of the tokens of each
  message's content: the prompt is always a token prefix of prompt + answer, and the
  ``{% generation %}`` span (the answer and its ``</s>``) maps onto whole tokens. The template
  already emits ``<s>``; ``apply_chat_template`` tokenizes with ``add_special_tokens=False``, so
  there is no double bos.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.config import DemoModelConfig
from pipeline.data import (
    conversation_key,
    load_conversations,
    load_text_records,
    read_rows,
    split_records,
    tokenize_records,
)
from pipeline.errors import ConfigError, StageFailed
from pipeline.evaluation.metrics import heldout_perplexity
from pipeline.fsutil import atomic_output_dir, atomic_write_json, file_lock, hash_path, hash_text, link_or_copy_tree
from pipeline.log import progress as progress_display

log = logging.getLogger(__name__)

# Bump when a change to this module changes what gets built, so cached demo bases are rebuilt.
DEMO_BUILD_VERSION = 1

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, SYSTEM, USER, ASSISTANT)

# Every boundary is a special token (see the module docstring). The assistant's content and its
# eos are inside {% generation %} so TRL's assistant_only_loss trains exactly the reply and the stop.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- '<|system|>' + message['content'] }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '<|user|>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- raise_exception('Unsupported chat role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

# metrics (flat dict; the driver copies it into the base stage's manifest), what was built, loss curve
BUILD_METRICS_FILE = "build_metrics.json"
DEMO_BUILD_FILE = "demo_build.json"
TRAIN_LOG_FILE = "train_log.json"

# Demo bases built by this recipe and shipped with the repository, one directory per key (the
# build takes 9-22 minutes on 2 shared cores; the cpt/sft/eval of the demo under 10). A shipped
# build is used when its key is the one asked for; tests/test_demo.py checks that the recipe still
# produces it (its key, its tokenizer, its first training steps, its held-out perplexity). After a
# change to the recipe or its data, rebuild and ship it: ``DUS_MACHINE_CACHE=$(mktemp -d) python -m
# pipeline stage=base paths.cache_dir=/tmp/demo-build paths.output_root=/tmp/demo-build/out``, then
# ``git rm -r assets/demo_base/<old key>`` and copy ``/tmp/demo-build/demo_base/<new key>`` there.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo_base"
# Every checkout on a machine shares one copy of each demo base (as llama.cpp's build is shared).
MACHINE_CACHE_ENV = "DUS_MACHINE_CACHE"


def machine_cache_dir() -> Path:
    """``$DUS_MACHINE_CACHE`` or ``~/.cache/dus-pipeline``: shared by every checkout of this user."""
    return Path(os.environ.get(MACHINE_CACHE_ENV) or Path.home() / ".cache" / "dus-pipeline")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, *, model_max_length: int | None = None):
    """Train a byte-level BPE tokenizer on ``texts`` and save it into ``out_dir`` (created if missing).

    Returns the ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained(out_dir)`` loads the same).
    ``vocab_size`` includes the 256 byte symbols and the special tokens; on a small text the BPE
    trainer may stop below it (``len(tokenizer)`` is the real size).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ConfigError("model.demo.vocab_size", f"{vocab_size} is too small for a byte-level BPE tokenizer",
                          f"use at least {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    if tok.get_vocab_size() <= min_vocab:
        raise ConfigError("model.demo", "the tokenizer training text is empty", "check the corpus / tokenizer_files")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert [ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))), ids
    # Saved in tokenizer.json too, so the backend alone adds bos like the transformers wrapper.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, ids[BOS])]
    )

    kwargs = {}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT], add_bos_token=True, add_eos_token=False,
        padding_side="right", clean_up_tokenization_spaces=False, **kwargs,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_demo_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """How raw text becomes records: must match ``DataConfig`` so the held-out split is the eval's."""

    txt_document_separator: str = "\n\n\n"
    max_record_chars: int = 4000


def load_demo_corpus(cfg: DemoModelConfig, heldout_fraction: float, records: RecordOptions = RecordOptions()):
    """The corpus's records, split into train / held-out exactly as ``pipeline.data`` does."""
    recs = load_text_records(
        [cfg.corpus], txt_document_separator=records.txt_document_separator,
        max_record_chars=records.max_record_chars, field="model.demo.corpus",
    )
    return split_records(recs, heldout_fraction)


def tokenizer_training_texts(
    cfg: DemoModelConfig, heldout_fraction: float, records: RecordOptions = RecordOptions()
) -> list[str]:
    """Text the tokenizer is trained on: the corpus's train split plus ``cfg.tokenizer_files``.

    A ``tokenizer_files`` entry with a ``messages`` column contributes the contents of its
    train-split conversations (split like the sft stage does); any other file its train-split
    records. The corpus itself is always used; listing it again is harmless.
    """
    texts = list(load_demo_corpus(cfg, heldout_fraction, records).train)
    corpus = Path(cfg.corpus).resolve()
    for name in cfg.tokenizer_files:
        path = Path(name)
        if path.exists() and path.resolve() == corpus:
            continue
        if path.suffix != ".txt" and "messages" in next(read_rows(path, field="model.demo.tokenizer_files"), {}):
            convs = load_conversations([name], field="model.demo.tokenizer_files")
            for conv in split_records(convs, heldout_fraction, key=conversation_key).train:
                texts.extend(m["content"] for m in conv)
        else:
            recs = load_text_records(
                [name], txt_document_separator=records.txt_document_separator,
                max_record_chars=records.max_record_chars, field="model.demo.tokenizer_files",
            )
            texts.extend(split_records(recs, heldout_fraction).train)
    return texts


def pack_records(tokenizer, records: Sequence[str]):
    """One long 1-D LongTensor: ``<s> record </s>`` for each record, in order (as cpt packs them)."""
    import torch

    return torch.tensor([t for doc in tokenize_records(tokenizer, list(records)) for t in doc], dtype=torch.long)


def _blocks(stream, seq_len: int, offset: int = 0):
    n = (len(stream) - offset) // seq_len
    return stream[offset: offset + n * seq_len].view(n, seq_len)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def validate_demo_config(cfg: DemoModelConfig, heldout_fraction: float) -> None:
    """Raise ``ConfigError`` for values that cannot work, before anything expensive starts."""
    f = "model.demo"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "seq_len", "batch_size", "train_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{f}.{name}", f"must be a positive integer, got {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{f}.hidden_size", f"{cfg.hidden_size} is not divisible by num_attention_heads={cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{f}.num_key_value_heads",
                          f"num_attention_heads={cfg.num_attention_heads} is not divisible by {cfg.num_key_value_heads}")
    if cfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"{f}.seq_len", f"{cfg.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"{f}.learning_rate", f"must be > 0, got {cfg.learning_rate!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError("data.heldout_fraction", f"must be in [0, 1), got {heldout_fraction!r}")
    if not Path(cfg.corpus).is_file():
        raise ConfigError(f"{f}.corpus", f"{cfg.corpus} does not exist", "fix the path")
    for name in cfg.tokenizer_files:
        if not Path(name).is_file():
            raise ConfigError(f"{f}.tokenizer_files", f"{name} does not exist", "fix the path or remove it")


def mistral_config(cfg: DemoModelConfig, tokenizer):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        use_cache=True,
    )


def unigram_ppl(train_stream, eval_stream, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model from the train tokens: the bar a real LM must clear."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    tgt = eval_stream[1:]
    return float(torch.exp(-logp[tgt].mean())) if len(tgt) else float("nan")


def build_demo_base(
    cfg: DemoModelConfig,
    out_dir: Path,
    *,
    heldout_fraction: float,
    progress: bool = True,
    records: RecordOptions = RecordOptions(),
    tokenizer_dir: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the tokenizer, pretrain the tiny Mistral from scratch, save both atomically to ``out_dir``.

    ``tokenizer_dir`` reuses an already trained tokenizer instead of training one (tests).
    Returns the metrics (also in ``out_dir/build_metrics.json``; the config it was built from is in
    ``out_dir/demo_build.json``); the per-step loss is in
    ``out_dir/train_log.json`` as a list of ``{"step", "loss", "lr", "time_s"}`` (``time_s``: seconds
    since training started, after that step).
    """
    validate_demo_config(cfg, heldout_fraction)
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    split = load_demo_corpus(cfg, heldout_fraction, records)
    if not split.train:
        raise ConfigError("data.heldout_fraction", f"{heldout_fraction} leaves no training records in {cfg.corpus}")

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if tokenizer_dir is None:
            tokenizer = train_demo_tokenizer(
                tokenizer_training_texts(cfg, heldout_fraction, records), cfg.vocab_size, tmp,
                model_max_length=cfg.max_position_embeddings,
            )
        else:
            tokenizer = load_demo_tokenizer(tokenizer_dir)
            tokenizer.save_pretrained(tmp)
        t_tok = time.perf_counter()
        train_stream = pack_records(tokenizer, split.train)
        if len(train_stream) < cfg.seq_len * 2:
            raise ConfigError("model.demo.seq_len", f"the corpus train split has only {len(train_stream)} tokens, "
                              f"too few for seq_len={cfg.seq_len}", "use a smaller seq_len or a larger corpus")
        model, log_rows, train_s = pretrain(cfg, tokenizer, train_stream, progress=progress)
        metrics = {
            **summarize_pretraining(cfg, model, tokenizer, split, train_stream, log_rows),
            "steps_per_s": cfg.train_steps / train_s,
            "train_time_s": train_s,
            "tokenizer_time_s": t_tok - t_start,
        }
        save_demo_base(tmp, model, tokenizer, log_rows=log_rows, metrics=metrics, t_start=t_start, build={
            "build_version": DEMO_BUILD_VERSION,
            "config": dataclasses.asdict(cfg),
            "heldout_fraction": heldout_fraction,
            "records": dataclasses.asdict(records),
            "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None,
        })
    log.info("demo base built in %.0fs: held-out ppl %s (unigram %s), %d params -> %s",
             metrics["wall_time_s"], metrics["heldout_ppl"], metrics["unigram_heldout_ppl"], metrics["num_params"], out_dir)
    return metrics


def pretrain(cfg: DemoModelConfig, tokenizer, train_stream, *, progress: bool, stop_after: int | None = None):
    """Pretrain a fresh tiny Mistral on ``seq_len`` blocks of the train stream (each epoch a new
    random phase and order). Returns (model, per-step log rows, training seconds).
    ``stop_after``: stop after that many of the ``train_steps`` steps (same schedule; the check
    that a shipped build's first steps are still what the recipe does)."""
    import torch
    from transformers import MistralForCausalLM, get_cosine_schedule_with_warmup

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = MistralForCausalLM(mistral_config(cfg, tokenizer)).float()
    model.config.use_cache = False
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, min(100, cfg.train_steps // 10)), cfg.train_steps)
    batches = _batches(train_stream, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    log_rows: list[dict] = []
    t_train = time.perf_counter()
    bar = progress_display(total=cfg.train_steps, desc="demo base: pretraining", unit="step", disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in range(1, min(cfg.train_steps, stop_after or cfg.train_steps) + 1):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise StageFailed(f"demo base pretraining diverged at step {step} (loss {value}); "
                              "lower model.demo.learning_rate")
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        log_rows.append({"step": step, "loss": round(value, 5), "lr": float(f"{scheduler.get_last_lr()[0]:.6g}"),
                         "time_s": round(time.perf_counter() - t_train, 3)})
        bar.update(1)
        if step % 5 == 0 or step == cfg.train_steps:
            bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    return model, log_rows, time.perf_counter() - t_train


def _batches(train_stream, *, seq_len: int, batch_size: int, seed: int):
    """Endless batches of ``seq_len`` blocks; each epoch cuts the stream at a new random offset and
    shuffles the blocks (the first epoch at offset 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    blocks, epochs = None, 0
    while True:
        rows = []
        while len(rows) < batch_size:
            if not order:
                offset = int(torch.randint(0, seq_len, (1,), generator=gen)) if epochs else 0
                blocks = _blocks(train_stream, seq_len, offset)
                order = torch.randperm(len(blocks), generator=gen).tolist()
                epochs += 1
            rows.append(blocks[order.pop()])
        yield torch.stack(rows)


def summarize_pretraining(cfg: DemoModelConfig, model, tokenizer, split, train_stream, log_rows: list[dict]) -> dict:
    """The build's metrics; the held-out figure is the eval stage's own measure
    (``pipeline.evaluation.metrics.heldout_perplexity`` at the demo's sequence length)."""
    import torch

    heldout = (heldout_perplexity(model, tokenizer, split.heldout, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
               if split.heldout else None)  # heldout_fraction 0: no held-out metrics (None, not NaN, in the JSON)
    heldout_stream = pack_records(tokenizer, split.heldout) if split.heldout else None
    tail = [r["loss"] for r in log_rows[-max(1, min(20, len(log_rows))):]]
    return {
        "final_train_loss": log_rows[-1]["loss"],
        "final_train_loss_avg20": sum(tail) / len(tail),
        "heldout_loss": heldout["loss"] if heldout else None,
        "heldout_ppl": heldout["perplexity"] if heldout else None,
        "heldout_tokens": heldout["tokens"] if heldout else 0,
        "unigram_heldout_ppl": unigram_ppl(train_stream, heldout_stream, len(tokenizer)) if heldout else None,
        "vocab_size": len(tokenizer),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_records": len(split.train),
        "heldout_records": len(split.heldout),
        "train_stream_tokens": len(train_stream),
        "tokens_seen": cfg.train_steps * cfg.batch_size * cfg.seq_len,
        "epochs": cfg.train_steps * cfg.batch_size * cfg.seq_len / max(1, len(train_stream)),
        "train_steps": cfg.train_steps,
        "torch_threads": torch.get_num_threads(),
    }


def save_demo_base(out: Path, model, tokenizer, *, log_rows: list[dict], metrics: dict, t_start: float, build: dict) -> None:
    from transformers import GenerationConfig

    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    atomic_write_json(out / TRAIN_LOG_FILE, log_rows)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    atomic_write_json(out / DEMO_BUILD_FILE, build)
    atomic_write_json(out / BUILD_METRICS_FILE, metrics)
    _make_readable(out)


def _make_readable(root: Path) -> None:
    """Some writers create files 0600; a shared cache must be readable by every user the umask allows."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in root.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def demo_base_key(cfg: DemoModelConfig, *, heldout_fraction: float, records: RecordOptions = RecordOptions()) -> str:
    """Identity of a demo base: its config, its input files' content (not their paths), the split."""
    fields = dataclasses.asdict(cfg)
    fields.pop("corpus")
    fields.pop("tokenizer_files")
    payload = {
        "build_version": DEMO_BUILD_VERSION,
        "config": fields,
        "corpus": hash_path(cfg.corpus),
        "tokenizer_files": [hash_path(p) for p in cfg.tokenizer_files],
        "heldout_fraction": heldout_fraction,
        "records": dataclasses.asdict(records),
    }
    return hash_text(json.dumps(payload, sort_keys=True))


def built_demo_base(cfg: DemoModelConfig, cache_dir: Path, *, heldout_fraction: float,
                    records: RecordOptions = RecordOptions()) -> Path | None:
    """The demo base's directory if it is already built (nothing is built here), else None."""
    final = Path(cache_dir) / "demo_base" / demo_base_key(cfg, heldout_fraction=heldout_fraction, records=records)[:16]
    return final if _is_complete(final) else None


def ensure_demo_base(
    cfg: DemoModelConfig,
    cache_dir: Path,
    *,
    heldout_fraction: float,
    records: RecordOptions = RecordOptions(),
    progress: bool = True,
) -> Path:
    """``<cache_dir>/demo_base/<key16>/``, built only when missing (one builder at a time)."""
    validate_demo_config(cfg, heldout_fraction)
    key = demo_base_key(cfg, heldout_fraction=heldout_fraction, records=records)[:16]
    root = Path(cache_dir) / "demo_base"
    final = root / key
    if _is_complete(final):
        return final
    machine = machine_cache_dir() / "demo_base" / key
    with file_lock(root / f".{key}.lock"):
        if _is_complete(final):  # built by another process while we waited
            return final
        for found in (machine, SHIPPED_DIR / key):
            if _is_complete(found) and found.resolve() != final.resolve():
                log.info("demo base %s: copying %s", key, found)
                with atomic_output_dir(final, overwrite=final.exists()) as tmp:
                    link_or_copy_tree(found, tmp)
                _share(final, machine)
                return final
        log.info("building the demo base model into %s", final)
        build_demo_base(cfg, final, heldout_fraction=heldout_fraction, progress=progress, records=records,
                        overwrite=final.exists())
        _share(final, machine)
    return final


def _share(built: Path, machine: Path) -> None:
    """Put a demo base into the machine cache for the next checkout; a read-only home only costs a rebuild."""
    if _is_complete(machine) or machine.resolve() == built.resolve():
        return
    try:
        machine.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(machine.parent / f".{machine.name}.lock"):
            if not _is_complete(machine):
                with atomic_output_dir(machine, overwrite=machine.exists()) as tmp:
                    link_or_copy_tree(built, tmp)
    except OSError as e:
        log.warning("could not share the demo base in %s (%s): the next checkout builds it again", machine, e)


def _is_complete(path: Path) -> bool:
    # atomic_output_dir only renames a finished directory into place; the checks guard against
    # a directory someone put there by hand.
    return (path / BUILD_METRICS_FILE).is_file() and (path / "model.safetensors").is_file()

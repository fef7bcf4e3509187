"""cpt throughput, side by side in one run, as ratios against baselines timed in the same run.

1. Wrapping overhead: our cpt stage's training setup (HF Trainer with the stage's arguments,
   collator, throughput and preemption callbacks) vs a plain PyTorch loop (forward, backward,
   clip, AdamW step) on the same model, the same packed batches, the same number of steps.
   Target: ours / plain <= 1.05 (per-step time).
2. Packing: useful (non-padding) tokens per second with packed blocks (EOS-separated documents,
   per-document position_ids) vs padded batches (one document per row, truncated/padded to the
   same length), both through the plain loop.

Runs alternate (plain, ours, plain, ours, ...) and the medians are reported, so load from other
processes hits both sides alike. CPU by default; on a GPU it runs in bf16.

    python scripts/bench_train.py --steps 20 --repeats 3 --out bench/train_results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import REPO_ROOT, CPTConfig  # noqa: E402
from pipeline.data import load_text_records, pack_documents, tokenize_records  # noqa: E402

WARMUP_STEPS = 3
# Documents of at most ~1000 characters (~250 tokens here): padded rows of 512 are about half padding.
RECORD_CHARS = 1000


def build_model(vocab: int, seed: int, dtype):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        sliding_window=None, use_cache=False)
    model = MistralForCausalLM(cfg).to(dtype)
    return model.cuda() if torch.cuda.is_available() else model


def batches_packed(docs, seq_len, batch, steps):
    packed = pack_documents(docs, seq_len)
    out = []
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        out.append({"input_ids": torch.tensor(packed.input_ids[sl]), "position_ids": torch.tensor(packed.position_ids[sl]),
                    "labels": torch.tensor(packed.labels[sl])})
    return out


def batches_padded(docs, seq_len, batch, steps, pad_id):
    out = []
    for i in range(steps):
        rows = [d[:seq_len] for d in docs[i * batch:(i + 1) * batch]]
        ids = torch.full((batch, seq_len), pad_id)
        mask = torch.zeros((batch, seq_len), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def useful_tokens(batch) -> int:
    return int((batch["labels"] != -100).sum())


def plain_loop(model, batches) -> float:
    """Seconds per step after warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = next(model.parameters()).device
    model.train()
    for i, b in enumerate(batches):
        if i == WARMUP_STEPS:
            sync()
            t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in b.items()}
        loss = model(**b, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / (len(batches) - WARMUP_STEPS)


def our_stage(model, batches, tokenizer, out_dir: Path, bf16: bool) -> float:
    """The cpt stage's Trainer on the same batches (one batch per step, no shuffling effect:
    the dataset is exactly these blocks in order)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from pipeline.training.callbacks import ConsumedTokens, PreemptionCallback, RecordingCollator, ThroughputCallback
    from pipeline.training.model import trainer_kwargs

    import datasets

    # The blocks as the stage reads them: an Arrow dataset saved to disk, memory-mapped, torch format
    # (pipeline/cpt_data.py), so the per-example cost of the cache is part of what is measured.
    columns = {k: [row for b in batches for row in b[k].tolist()] for k in batches[0]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(out_dir / "blocks"))
    blocks = datasets.load_from_disk(str(out_dir / "blocks")).with_format("torch")

    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    tc = CPTConfig(per_device_train_batch_size=len(batches[0]["input_ids"]), max_steps=len(batches),
                   learning_rate=1e-4, logging_steps=5, save_steps=10**9, warmup_steps=0, lr_scheduler_type="constant")
    kwargs = trainer_kwargs(tc, output_dir=out_dir, ds_config=None, bf16=bf16)
    kwargs.update(disable_tqdm=True, report_to=[], save_strategy="no", optim="adamw_torch")
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=blocks,
                      data_collator=RecordingCollator(default_data_collator), processing_class=tokenizer)
    consumed = ConsumedTokens(trainer, pad_token_id=tokenizer.pad_token_id)
    trainer.add_callback(consumed)
    trainer.add_callback(ThroughputCallback(consumed=consumed, flops_per_token=0.0, world_size=1))
    trainer.add_callback(PreemptionCallback())
    trainer.add_callback(StepClock())
    trainer.train()
    # Step WARMUP_STEPS..end, the same steps the plain loop times.
    return (times[-1] - times[WARMUP_STEPS - 1]) / (len(times) - WARMUP_STEPS)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "train_results.md"))
    args = ap.parse_args()

    from pipeline.models.demo import train_demo_tokenizer

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    load_start = os.getloadavg()
    records = load_text_records([str(REPO_ROOT / "data" / "demo" / "corpus.txt")], max_record_chars=RECORD_CHARS)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_demo_tokenizer(records[:200], 2048, Path(tmp) / "tok")
        docs = tokenize_records(tokenizer, records)
        packed = batches_packed(docs, args.seq_len, args.batch, args.steps)
        padded = batches_padded(docs, args.seq_len, args.batch, args.steps, tokenizer.pad_token_id)

        plain_s, ours_s, padded_s = [], [], []
        for r in range(args.repeats):
            plain_s.append(plain_loop(build_model(len(tokenizer), r, dtype), packed))
            ours_s.append(our_stage(build_model(len(tokenizer), r, dtype), packed, tokenizer, Path(tmp) / f"o{r}", bf16))
            padded_s.append(plain_loop(build_model(len(tokenizer), r, dtype), padded))
            print(f"repeat {r}: plain {plain_s[-1]:.4f}s/step  ours {ours_s[-1]:.4f}s/step  padded {padded_s[-1]:.4f}s/step",
                  flush=True)

    plain, ours, pad = (statistics.median(x) for x in (plain_s, ours_s, padded_s))
    tok_packed = statistics.mean(useful_tokens(b) for b in packed[WARMUP_STEPS:])
    tok_padded = statistics.mean(useful_tokens(b) for b in padded[WARMUP_STEPS:])
    packed_tps, padded_tps = tok_packed / plain, tok_padded / pad
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    lines = [
        "# cpt training throughput",
        "",
        f"Command: `python scripts/bench_train.py --steps {args.steps} --repeats {args.repeats} --seq-len {args.seq_len} --batch {args.batch}`",
        f"Machine: {device}; torch {torch.__version__}; {'bf16' if bf16 else 'fp32'}; "
        f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        "Model: Mistral-shaped, hidden 256, 4 layers, vocab 2048 (random init); "
        f"{args.batch} x {args.seq_len} tokens per step; demo corpus records (<= {RECORD_CHARS} chars each).",
        f"Medians of {args.repeats} alternating repeats, {args.steps - WARMUP_STEPS} timed steps each after {WARMUP_STEPS} warm-up steps.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| plain PyTorch loop, packed | {plain:.4f} s/step |",
        f"| our cpt stage (Trainer + callbacks), packed | {ours:.4f} s/step |",
        f"| **overhead: ours / plain** | **{ours / plain:.3f}** (target <= 1.05) |",
        f"| packed: useful tokens/s | {packed_tps:,.0f} ({tok_packed / (args.batch * args.seq_len):.1%} of positions are real tokens) |",
        f"| padded: useful tokens/s | {padded_tps:,.0f} ({tok_padded / (args.batch * args.seq_len):.1%} of positions are real tokens) |",
        f"| **packed / padded useful tokens per second** | **{packed_tps / padded_tps:.2f}x** |",
        "",
        "Per repeat (s/step): plain " + ", ".join(f"{x:.4f}" for x in plain_s) + "; ours " +
        ", ".join(f"{x:.4f}" for x in ours_s) + "; padded " + ", ".join(f"{x:.4f}" for x in padded_s) + ".",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

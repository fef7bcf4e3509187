"""Short continued pretraining from two seams of the same depth, same tokens, same seed.

    python scripts/bench_seam_cpt.py MODEL_DIR --seam 6,2 --seam 5,1 --steps 300 --out /tmp/seam_cpt.json

Each seam ``a,b`` is merged ([0, a) + [b, N), passthrough) and trained with a plain PyTorch loop
(AdamW, linear warm-up then cosine decay, fp32, batch x seq_len tokens a step) on the *training*
records of the corpus (those ``is_heldout(text, 0.05)`` leaves out), in the same order for every
seam; held-out perplexity (the held-out records, as in ``pipeline.analyze``) before and after.
Tiny-model figures on shared CPUs: a sanity check of the ranking, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_blocks(tokenizer, corpus: str, seq_len: int, n_blocks: int, heldout_fraction: float):
    from pipeline.data import is_heldout, iter_text_records, tokenize_records

    ids: list[int] = []
    need = n_blocks * seq_len
    for text in iter_text_records(corpus):
        if is_heldout(text, heldout_fraction):
            continue
        ids.extend(tokenize_records(tokenizer, [text])[0])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the corpus has {len(ids)} training tokens, {need} needed")
    return torch.tensor(ids[:need]).view(n_blocks, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seam", action="append", required=True, help="a,b for [0, a) + [b, N)")
    ap.add_argument("--corpus", default="data/demo/corpus.txt")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # SIGTERM (kill, a job scheduler) ends the run through the finally below, removing the merges.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.analysis import Candidate, measure_perplexity, passthrough_merge_config, source_depth
    from pipeline.analysis.tokens import heldout_token_batches
    from pipeline.merge import run_merge

    n_layers = source_depth(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    evals = heldout_token_batches(tokenizer, [args.corpus], num_tokens=args.eval_tokens, seq_len=args.seq_len,
                                  batch_size=args.batch_size)
    blocks = train_blocks(tokenizer, args.corpus, args.seq_len, args.steps * args.batch_size, 0.05)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="seam-cpt-"))
    try:
        for seam in args.seam:
            a, b = (int(x) for x in seam.split(","))
            cand = Candidate(first_end=a, second_start=b, source_layers=n_layers, predicted_damage=0.0)
            merged = tmp / f"m-{a}-{b}"
            run_merge(passthrough_merge_config(args.model, cand), merged, progress=False)
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
            model.config.use_cache = False
            before = measure_perplexity(model=model.eval(), token_batches=evals, progress=False)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
            warmup = max(1, args.steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                      (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
            model.train()
            started = time.perf_counter()
            losses = []
            for step in range(args.steps):
                batch = blocks[step * args.batch_size:(step + 1) * args.batch_size]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            seconds = time.perf_counter() - started
            after = measure_perplexity(model=model.eval(), token_batches=evals, progress=False)
            row = {"seam": [[0, a], [b, n_layers]], "heldout_ppl_before": before, "heldout_ppl_after": after,
                   "train_loss_first10": sum(losses[:10]) / len(losses[:10]),
                   "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                   "steps": args.steps, "tokens": args.steps * args.batch_size * args.seq_len,
                   "train_seconds": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
            del model, opt
            shutil.rmtree(merged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "eval_tokens": evals.num_tokens,
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Cost of the similarity pass vs one plain forward pass over the same tokens, same loaded model.

    python scripts/bench_analysis_cost.py MODEL_DIR --tokens 2048 --repeats 3

The two alternate (plain, analysis, plain, analysis, ...) after one untimed warm-up of each, so
load changes on a shared machine hit both; prints every time and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", default="data/demo/corpus.txt")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.analysis import analyze_layers, load_model_for_analysis, measure_perplexity, prepare_tokens

    tokens = prepare_tokens(args.model, data_files=[args.data], num_tokens=args.tokens, seq_len=args.seq_len,
                            batch_size=args.batch_size, heldout_fraction=0.05, text_column="text")
    model = load_model_for_analysis(args.model, device="cpu")
    measure_perplexity(model=model, token_batches=tokens.batches[:1], progress=False)
    analyze_layers(model=model, token_batches=tokens.batches[:1], progress=False)
    plain, analysis = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        measure_perplexity(model=model, token_batches=tokens, progress=False)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        analyze_layers(model=model, token_batches=tokens, progress=False)
        analysis.append(time.perf_counter() - started)
    ratios = [a / p for a, p in zip(analysis, plain)]
    print(json.dumps({"model_layers": model.config.num_hidden_layers, "tokens": tokens.num_tokens,
                      "threads": args.threads, "plain_s": [round(x, 2) for x in plain],
                      "analysis_s": [round(x, 2) for x in analysis], "ratio_each": [round(r, 3) for r in ratios],
                      "ratio_median": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()

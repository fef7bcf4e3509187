"""``python -m pipeline.quantize``: the GGUF ladder of one Hugging Face model directory.

    python -m pipeline.quantize --model outputs/run/03_sft --out outputs/run/06_quantize \
        --data data/demo/corpus.txt --rungs Q4_K_M,Q8_0

Scored and calibration text come from the held-out split of --data (--heldout-fraction, the
pipeline's data.heldout_fraction by default; 1 for a file that is all held-out text).
Exit 2 with one line on bad input (ConfigError).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.quantize.data import ladder_texts_from_files
from pipeline.quantize.ladder import GgufLadderConfig, run_gguf_ladder
from pipeline.quantize.types import DEFAULT_LADDER


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model directory (safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output directory of the ladder")
    p.add_argument("--data", required=True, nargs="+", help=".txt/.jsonl/.parquet files with held-out text")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--rungs", default=",".join(DEFAULT_LADDER), help="comma-separated quant types; TYPE+imatrix for an imatrix rung")
    p.add_argument("--reference-type", default="auto")
    p.add_argument("--pre-tokenizer", default="auto")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-transformers-check", action="store_true")
    args = p.parse_args(argv)
    config = GgufLadderConfig(rungs=[r for r in args.rungs.split(",") if r.strip()], reference_type=args.reference_type,
                              pre_tokenizer=args.pre_tokenizer, window=args.window, max_eval_tokens=args.max_eval_tokens,
                              n_threads=args.threads, compare_with_transformers=not args.no_transformers_check)
    try:
        texts = ladder_texts_from_files(args.data, heldout_fraction=args.heldout_fraction)
        result = run_gguf_ladder(model_dir=args.model, out_dir=args.out, config=config, eval_texts=texts.eval_texts,
                                 calibration_texts=texts.calibration_texts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "ladder.md").read_text())
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.analyze MODEL --target-layers L``: choose a depth up-scaling seam from data.

A thin shim over ``pipeline.analysis.recommend_seam`` (docs/analysis.md). MODEL is a local model
directory (safetensors) or a ``.gguf`` file, converted once by ``pipeline.models.gguf``. A user
error prints one line on stderr and exits with code 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from pipeline.errors import ConfigError

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from pipeline.analysis.recommend import DEFAULT_TOKENS
    from pipeline.analysis.tokens import DEFAULT_HELDOUT_FRACTION, DEFAULT_SELECTION_FRACTION

    ap = argparse.ArgumentParser(prog="python -m pipeline.analyze", description=(
        "Layer similarity of a causal LM (Block Influence, angular distances) and the best seam "
        "[0, a) + [b, N) for a SOLAR-style depth up-scaling to --target-layers."))
    ap.add_argument("model", help="model directory (safetensors) or a .gguf file")
    ap.add_argument("--target-layers", type=int, required=True, help="depth of the merged model")
    ap.add_argument("--data", action="append", default=None,
                    help="text data (.txt/.jsonl/.json/.parquet; repeatable) [default: data/demo/corpus.txt]")
    ap.add_argument("--text-column", default="text", help="column holding the text in .jsonl/.json/.parquet [text]")
    ap.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                    help="the pipeline's data.heldout_fraction: these records (eval's test set) are never used "
                         f"[{DEFAULT_HELDOUT_FRACTION}]")
    ap.add_argument("--selection-fraction", type=float, default=DEFAULT_SELECTION_FRACTION,
                    help="score on the selection split: the records after the held-out ones by content hash "
                         f"(the pipeline's data.selection_fraction) [{DEFAULT_SELECTION_FRACTION}]")
    ap.add_argument("--all-records", action="store_true",
                    help="score on every record of --data instead (a file set aside for choosing)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"analysis tokens [{DEFAULT_TOKENS}]")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per block [min(256, context)]")
    ap.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass [4]")
    ap.add_argument("--top-k", type=int, default=3, help="seams merged and scored, besides SOLAR's [3]")
    ap.add_argument("--out", default=None, help="report directory [analysis/<model>-L<target>]")
    ap.add_argument("--model-ref", default=None,
                    help="model name written into the merge YAML [MODEL as given, or the converted GGUF dir]")
    ap.add_argument("--cache-dir", default=".cache", help="where GGUF conversions are cached [.cache]")
    ap.add_argument("--work-dir", default=None,
                    help="where the scored merges are written, one at a time, and removed [system temp dir]")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N [cuda if available]")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 [bf16 on GPU, fp32 on CPU]")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.analysis import recommend_seam

    try:
        if not args.all_records:
            for flag, value in (("--heldout-fraction", args.heldout_fraction), ("--selection-fraction", args.selection_fraction)):
                if not 0.0 <= value < 1.0:
                    raise ConfigError(flag, f"must be in [0, 1), got {value}", "or pass --all-records")
            if args.selection_fraction <= 0 or args.heldout_fraction + args.selection_fraction >= 1.0:
                raise ConfigError("--selection-fraction", f"{args.selection_fraction} (with --heldout-fraction "
                                  f"{args.heldout_fraction}) leaves no selection split or no training records",
                                  "use e.g. --selection-fraction 0.05, or --all-records")
        model = args.model
        if model.endswith(".gguf"):
            from pipeline.models.gguf import import_gguf

            model = str(import_gguf(model, Path(args.cache_dir) / "gguf"))
        out = args.out or str(Path("analysis") / f"{Path(args.model).name.removesuffix('.gguf')}-L{args.target_layers}")
        report = recommend_seam(
            model, target_layers=args.target_layers, top_k=args.top_k, data_files=args.data, num_tokens=args.tokens,
            seq_len=args.seq_len, batch_size=args.batch_size,
            heldout_fraction=None if args.all_records else args.heldout_fraction,
            selection_fraction=args.selection_fraction,
            text_column=args.text_column, out_dir=out, model_ref=args.model_ref, device=args.device,
            dtype=args.dtype, work_dir=args.work_dir, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    summary = {
        "recommended_slices": [list(s) for s in report.slices],
        "recommended_perplexity": report.recommended.measured_perplexity,
        "solar_slices": [list(s) for s in report.solar.slices],
        "solar_perplexity": report.solar.measured_perplexity,
        "solar_measured_rank": report.solar.measured_rank,
        "spearman_rho": report.spearman_rho,
        "spearman_n": len(report.scored),
        "report": report.paths.get("report_md"),
        "merge_yaml": report.paths.get("merge_yaml"),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.merge CONFIG.yml OUT_DIR`` (or ``dus-merge``), mirroring ``mergekit-yaml``.

A user error (bad config, missing model, ...) prints one line on stderr and exits with code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from pipeline.errors import ConfigError
from pipeline.merge.config import MergeConfig

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dus-merge", description="Merge models from a mergekit YAML config "
                                 "(passthrough, dus, block_expansion), streaming tensors at disk speed.")
    ap.add_argument("config", help="mergekit YAML config")
    ap.add_argument("out_dir", help="output model directory (must not exist unless --overwrite)")
    ap.add_argument("--out-shard-size", default="5B",
                    help="bytes of tensor data per output shard, mergekit notation: 5B, 500M, or an integer [default: 5B]")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="accept PyTorch *.bin checkpoints (loaded with torch.load(weights_only=True))")
    ap.add_argument("--trust-remote-code", action="store_true", help="passed to transformers' AutoConfig")
    ap.add_argument("--base-model", default=None,
                    help="model used where a source has no `model` (and for dus/block_expansion without base_model)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (atomically)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--metrics-json", default=None, help="also write the merge metrics to this file")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.merge.execute import run_merge

    cfg = MergeConfig(config_file=args.config, out_shard_size=args.out_shard_size)
    try:
        metrics = run_merge(cfg, args.out_dir, base_model=args.base_model, allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
                            overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(metrics, f, indent=2)
    summary = {k: metrics[k] for k in ("num_hidden_layers", "num_parameters", "bytes_written", "wall_time_s")}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.report RUN_DIR [--out DIR] [--with-model]``: the model card and results of a
finished run, regenerated from its manifests without running anything. ``--sweep DIR``: a growth
study's sweep report instead (pipeline/cluster/growth.py).

Writes README.md (the model card), mergekit_config.yml, results.json and results.md (from the eval
stage's results.json) and the eval plots into ``DIR`` (default ``RUN_DIR/release``). The model
files already there are left as they are; ``--with-model`` rebuilds the whole release directory
(the final model's files hard-linked in, as the pipeline's release step does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.release.package import build_release, regenerate_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="Regenerate a run's model card (README.md) and results from its manifests.",
    )
    parser.add_argument("run_dir", type=Path, nargs="?", default=None, help="the run directory (e.g. outputs/demo)")
    parser.add_argument("--sweep", type=Path, default=None, metavar="DIR",
                        help="instead: a growth study's sweep directory (e.g. outputs/growth-study): rewrite its "
                             "sweep_report.md/.json and loss_vs_tokens.png (docs/growth-study.md)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR/release)")
    parser.add_argument("--with-model", action="store_true",
                        help="rebuild the whole release directory, model files included (hard links)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.sweep is not None:
        from pipeline.cluster.growth import write_sweep_report

        try:
            written = write_sweep_report(args.sweep)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log(f"wrote {', '.join(p.name for p in written)} to {args.sweep}", where="report")
        return 0
    if args.run_dir is None:
        parser.error("give RUN_DIR, or --sweep DIR")
    try:
        if args.with_model:
            out = build_release(args.run_dir, args.out)
            written = sorted(p for p in out.iterdir() if p.is_file())
        else:
            written = regenerate_card(args.run_dir, args.out)
            out = written[0].parent
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {', '.join(p.name for p in written)} to {out}", where="report")
    log(f"model card: {out / 'README.md'}", where="report")
    if not (out / "config.json").is_file():
        log(f"{out} holds no model files; --with-model links the final model in", where="report")
    return 0


if __name__ == "__main__":
    sys.exit(main())

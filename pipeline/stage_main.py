"""Entry point of one training stage on every rank: ``python -m pipeline.stage_main CONFIG.yaml STAGE OUT_DIR``.

The driver starts it with ``accelerate launch`` (``pipeline.training.launch``) on the resolved config
it saved in the run directory; the ranks train into OUT_DIR, the stage's temporary directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.configio import load_config_file
from pipeline.stages import training_stage
from pipeline.training.runner import run_training_on_rank


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        sys.exit("usage: python -m pipeline.stage_main RESOLVED_CONFIG.yaml STAGE OUT_DIR")
    cfg = load_config_file(argv[0])
    run_training_on_rank(training_stage(argv[1]), cfg, out_dir=Path(argv[2]))


if __name__ == "__main__":
    main()

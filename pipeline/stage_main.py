"""Entry point of one training stage on every rank: ``python -m pipeline.stage_main CONFIG.yaml STAGE``.

The driver starts it with ``accelerate launch`` on the resolved config it saved in the run dir.
"""

from __future__ import annotations

import sys

from pipeline.configio import load_config_file


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[1] not in ("cpt", "sft"):
        sys.exit("usage: python -m pipeline.stage_main RESOLVED_CONFIG.yaml {cpt,sft}")
    cfg = load_config_file(argv[0])
    from pipeline.train import run_training_stage

    run_training_stage(cfg, argv[1])


if __name__ == "__main__":
    main()

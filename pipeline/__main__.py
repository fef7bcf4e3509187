"""``python -m pipeline [hydra overrides]``: the Hydra layer, kept thin.

It composes and validates the config, then either drives the whole pipeline (one driver process
that starts each training stage with ``accelerate launch``) or, when it is itself running under
``accelerate launch`` (``accelerate launch -m pipeline stage=cpt``), runs that training stage on
this rank.
"""

from __future__ import annotations

import os
import sys

from pipeline.errors import ConfigError, StageFailed


def _hydra_main():
    import hydra
    from hydra.core.config_store import ConfigStore

    from pipeline.config import PipelineConfig

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def app(dict_cfg) -> float | None:
        # Handled here: Hydra would otherwise print a traceback for what is a user's config error.
        try:
            return _run(dict_cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except StageFailed as e:
            print(f"failed: {e}", file=sys.stderr)
            sys.exit(1)

    def _run(dict_cfg) -> float | None:
        from pipeline.configio import to_typed
        from pipeline.distributed import under_launcher

        cfg = to_typed(dict_cfg)
        if under_launcher():
            if cfg.stage not in ("cpt", "sft"):
                raise ConfigError("stage", f"under accelerate launch only a training stage can run, got '{cfg.stage}'",
                                  "add stage=cpt or stage=sft (run base/merge/eval with plain `python -m pipeline`)")
            from pipeline.train import run_training_stage

            run_training_stage(cfg, cfg.stage)
            return None
        from pipeline.driver import run_pipeline

        results = run_pipeline(cfg)
        # The value a sweeper (Optuna) optimises: the final model's held-out perplexity.
        return results.get("objective")

    return app


def main() -> None:
    # Only rank 0 writes Hydra's .hydra/ files: ranks racing on them is hydra#2070.
    if os.environ.get("RANK", "0") != "0":
        sys.argv.append("hydra.output_subdir=null")
    _hydra_main()()


if __name__ == "__main__":
    main()

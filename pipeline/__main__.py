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
        except (ConfigError, StageFailed) as e:
            print(f"{'error' if isinstance(e, ConfigError) else 'failed'}: {e}", file=sys.stderr)
            if _in_multirun():
                # Raised, not sys.exit: Hydra then marks this job failed, runs the other jobs,
                # records it (pipeline/sweep.py) and exits non-zero after the batch. SystemExit
                # would end the whole sweep here (basic launcher) or lose every job's result (submitit).
                raise
            sys.exit(2 if isinstance(e, ConfigError) else 1)

    def _run(dict_cfg) -> float | None:
        from pipeline.configio import to_typed
        from pipeline.training.distributed import under_launcher

        cfg = to_typed(dict_cfg)
        if under_launcher():
            if cfg.stage not in ("cpt", "sft"):
                raise ConfigError("stage", f"under accelerate launch only a training stage can run, got '{cfg.stage}'",
                                  "add stage=cpt or stage=sft (run base/merge/eval with plain `python -m pipeline`)")
            from pipeline.driver import run_training_under_launcher

            run_training_under_launcher(cfg)
            return None
        from pipeline.cluster.slurm import (apply_slurm_environment, check_run_dir_shared, is_follower,
                                            record_leader_failure, run_follower)
        from pipeline.driver import run_pipeline

        # Inside a multi-node SLURM job every node runs this; node 0 leads, the others join training.
        cfg = apply_slurm_environment(cfg)
        check_run_dir_shared(cfg)
        if is_follower(cfg):
            run_follower(cfg)
            return None
        try:
            results = run_pipeline(cfg)
        except BaseException as e:
            record_leader_failure(cfg, e)
            raise
        # The value a sweeper (Optuna) optimises: the final model's held-out perplexity.
        return results.get("objective")

    return app


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    # Only rank 0 writes Hydra's .hydra/ files: ranks racing on them is hydra#2070. SLURM_PROCID:
    # `srun python -m pipeline` on N nodes runs one driver per node into the same run dir.
    if os.environ.get("RANK", "0") != "0" or os.environ.get("SLURM_PROCID", "0") != "0":
        sys.argv.append("hydra.output_subdir=null")
    _hydra_main()()


if __name__ == "__main__":
    main()

"""The release step after eval: ``<run_dir>/release/`` holds the final model, its model card,
``mergekit_config.yml``, results and plots, ready for the Hub (``pipeline.release``); pushed when
``release.push_to_hub``. A publishing step: not keyed, no manifest (a release holds no pipeline
bookkeeping); it runs whenever eval runs. Config group ``conf/release/``; tests: tests/test_release.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.config import PipelineConfig
from pipeline.manifest import StageInput
from pipeline.release.push import check_push_settings, run_release
from pipeline.stages.stage import BaseStage, StageOutput


class ReleaseStage(BaseStage):
    name = "release"
    publishes = True
    follows = "eval"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.release.enabled

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        rc = cfg.release
        if rc.push_to_hub:
            check_push_settings(repo_id=rc.repo_id, dry_run=rc.dry_run, token_env=rc.token_env)

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        return []

    def key_config(self, cfg: PipelineConfig) -> dict:
        return {}

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path | None = None) -> StageOutput:
        rc = cfg.release
        out = run_release(run_dir=Path(cfg.paths.run_dir), push_to_hub=rc.push_to_hub, repo_id=rc.repo_id,
                          private=rc.private, dry_run=rc.dry_run, token_env=rc.token_env)
        return StageOutput(metrics={"release_dir": str(out)}, model_dir=str(out))

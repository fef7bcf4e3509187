"""The stages, in the order a run goes through them. Each is one file here, with its config group
of the same name under ``conf/``; ``stage.py`` says what a stage is to the driver.

To add a stage: write ``stages/<name>.py`` with a class following ``stage.Stage`` (``BaseStage`` or
``TrainingStage`` give the defaults), add it to ``REGISTRY`` below and its name to
``pipeline.config.STAGES`` (which numbers the stage directories), and give it a config section and
group. The driver, preflight and ``stage=<name>`` then pick it up.
"""

from __future__ import annotations

from pipeline.config import STAGES, PipelineConfig
from pipeline.errors import ConfigError
from pipeline.stages.base import BaseModelStage
from pipeline.stages.cpt import CPTStage
from pipeline.stages.dpo import DPOStage
from pipeline.stages.eval import EvalStage
from pipeline.stages.merge import MergeStage
from pipeline.stages.quantize import QuantizeStage
from pipeline.stages.release import ReleaseStage
from pipeline.stages.sft import SFTStage
from pipeline.stages.stage import Stage, TrainingStage

REGISTRY: tuple[Stage, ...] = (BaseModelStage(), MergeStage(), CPTStage(), SFTStage(), DPOStage(), EvalStage(),
                               QuantizeStage(), ReleaseStage())
BY_NAME: dict[str, Stage] = {s.name: s for s in REGISTRY}
# The numbered stage directories follow pipeline.config.STAGES; the registry must agree with it. A
# raise, not an assert: ``python -O`` drops asserts, and the stage directories would then be misnumbered.
_REGISTERED = tuple(s.name for s in REGISTRY if not s.publishes)
if _REGISTERED != STAGES:
    raise RuntimeError(f"pipeline/stages/__init__.py REGISTRY lists the stages {_REGISTERED} but pipeline/config.py "
                       f"STAGES is {STAGES}: list every non-publishing stage in both, in the same order")


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ConfigError("stage", f"unknown stage '{name}'", f"use one of: all, {', '.join(BY_NAME)}")
    return BY_NAME[name]


def training_stage(name: str) -> TrainingStage:
    stage = get_stage(name)
    if not isinstance(stage, TrainingStage):
        raise ConfigError("stage", f"'{name}' is not a training stage",
                          f"use one of: {', '.join(s.name for s in REGISTRY if isinstance(s, TrainingStage))}")
    return stage


def selected_stages(cfg: PipelineConfig) -> list[Stage]:
    """``stage=all``: every enabled stage in order; ``stage=<name>``: that one. A publishing step
    (release) runs when enabled and the stage it publishes (eval) runs too."""
    if cfg.stage == "all":
        chosen = [s for s in REGISTRY if s.enabled(cfg) and not s.publishes]
    else:
        chosen = [get_stage(cfg.stage)]
    names = {s.name for s in chosen}
    return chosen + [s for s in REGISTRY if s.publishes and s.enabled(cfg) and s.follows in names and s not in chosen]

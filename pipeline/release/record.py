"""The run as the release sees it: every stage's manifest, the merge config and the eval results,
read from the run directory alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from pipeline.config import STAGES
from pipeline.errors import ConfigError
from pipeline.manifest import Manifest, model_chain, read_manifest, resolve_model_dir, stage_dir

RELEASE_DIR_NAME = "release"
CARD_NAME = "README.md"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"
RESULTS_FILES = ("results.json", "results.md")
GGUF_RELEASE_DIR_NAME = "release-gguf"  # the quant ladder's files, published as <repo_id>-GGUF
LADDER_FILES = ("ladder.md", "ladder.png")
PLOTS = (
    ("training.png", "Training loss across cpt and sft, with each stage's held-out perplexity"),
    ("tasks.png", "Every metric by stage"),
)
PAPER_URL = "https://arxiv.org/abs/2312.15166"
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
MODEL_STAGES = ("merge", "cpt", "sft", "dpo")  # stages whose directory is a model, in pipeline order
BASE_TAGS = ("mergekit", "merge", "depth-upscaling")


# Not copied into a release: pipeline bookkeeping, resume state, and pickles (code run at load time).
EXCLUDE_NAMES = {"manifest.json", "merge_metrics.json", "build_metrics.json", "trainer_state.json",
                  "training_args.bin", CARD_NAME, MERGEKIT_CONFIG_NAME}
EXCLUDE_DIRS = {"logs", "checkpoints", "runs", "__pycache__"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")




def format_size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


@dataclass
class RunRecord:
    """What a finished run directory says about itself (read once, checked for consistency)."""

    run_dir: Path
    manifests: dict[str, dict]  # completed stages only
    final_stage: str  # the stage whose model is released
    merge_yaml: str  # 01_merge/mergekit_config.yml, verbatim
    results: Optional[dict]  # {"stages": {stage: metrics}, "chance": {...}[, "leaderboard": {...}]} or None
    plots: list[str] = field(default_factory=list)  # plot files present in NN_eval
    release_cfg: dict = field(default_factory=dict)  # the `release` section of <run_dir>/config.yaml
    run_name: str = ""  # run_name of <run_dir>/config.yaml, else the directory's name
    ladder: Optional[dict] = None  # NN_quantize/ladder.json when the quantize stage ran on the released model

    @property
    def quantize_dir(self) -> Path:
        return stage_dir(self.run_dir, "quantize")

    @property
    def base(self) -> dict:
        return self.manifests.get("base") or {}

    @property
    def eval_dir(self) -> Path:
        return stage_dir(self.run_dir, "eval")

    def model_dir(self) -> Path:
        return Path(resolve_model_dir(self.run_dir, self.final_stage, Manifest.from_dict(self.manifests[self.final_stage])))


def load_run(run_dir: Path | str) -> RunRecord:
    """Read the manifests of ``run_dir`` and check they describe one chain of results.

    ConfigError when there is no merge, or when a later stage (or the eval) was made from an
    earlier stage's result that has since been replaced (a partial re-run): the card would
    describe a model that is not the one released.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(str(run_dir), "is not a directory", "give the run directory (e.g. outputs/demo)")
    cfg = _run_config(run_dir)
    # Only this run's chain (model_chain of its config.yaml): the directory of a stage since turned
    # off is neither described nor released. Without a config.yaml every completed stage counts.
    chain = model_chain(cfg) if cfg else STAGES
    # As JSON: the card renders what was recorded, field by field.
    manifests = {s: m.to_dict() for s in STAGES if (s in chain or s not in MODEL_STAGES)
                 and (m := read_manifest(stage_dir(run_dir, s))) is not None}
    if "merge" not in manifests:
        raise ConfigError(str(stage_dir(run_dir, "merge")), "no completed merge stage in this run directory: nothing to release",
                          "run the pipeline first (`python -m pipeline`, stage=all)")
    for stage in (*MODEL_STAGES, "eval"):
        m = manifests.get(stage)
        for inp in (m or {}).get("inputs", []):
            prev = inp.get("stage")
            if prev is None or (prev not in MODEL_STAGES and prev != "base"):
                continue
            pm = manifests.get(prev)
            if pm is None or pm.get("key") != inp.get("sha256"):
                now = "is gone" if pm is None else "has been re-run since"
                raise ConfigError(
                    str(stage_dir(run_dir, stage)),
                    f"was made from a {prev} result that {now} ({stage_dir(run_dir, prev).name}/): "
                    f"it does not belong to the models in this run directory",
                    f"re-run `python -m pipeline stage={stage}` with this run directory, "
                    f"or delete {stage_dir(run_dir, stage).name}/ if {stage} is no longer part of the run",
                )
    final_stage = [s for s in MODEL_STAGES if s in manifests][-1]
    yml = stage_dir(run_dir, "merge") / MERGEKIT_CONFIG_NAME
    if not yml.is_file():
        raise ConfigError(str(yml), "is missing: the merge stage writes it", "re-run `python -m pipeline stage=merge`")
    results, plots = None, []
    if "eval" in manifests:
        eval_dir = stage_dir(run_dir, "eval")
        results = _read_results(eval_dir, manifests["eval"])
        plots = [name for name, _ in PLOTS if (eval_dir / name).is_file()]
    release_cfg = cfg.get("release") if isinstance(cfg.get("release"), dict) else {}
    return RunRecord(run_dir=run_dir, manifests=manifests, final_stage=final_stage, merge_yaml=yml.read_text(),
                     results=results, plots=plots, release_cfg=release_cfg,
                     run_name=str(cfg.get("run_name") or run_dir.name), ladder=_read_ladder(run_dir, manifests, final_stage))


def _read_ladder(run_dir: Path, manifests: dict, final_stage: str) -> Optional[dict]:
    """The quant ladder of the released model: None without one, or when it was made from another
    model (a stage re-run since)."""
    import json

    q = manifests.get("quantize")
    path = stage_dir(run_dir, "quantize") / "ladder.json"
    made_from = next((i for i in (q or {}).get("inputs", []) if i.get("role") == "model"), {})
    if not q or not path.is_file() or made_from.get("sha256") != manifests[final_stage].get("key"):
        return None
    return json.loads(path.read_text())


def _read_results(eval_dir: Path, manifest: dict) -> dict:
    """results.json of the eval stage (with the leaderboard run's n, shots and contamination when
    eval=leaderboard ran); its manifest's metrics (no chance levels) when that is gone."""
    import json

    path = eval_dir / "results.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("stages"), dict):
            results = {"stages": data["stages"], "chance": data.get("chance") or {}}
            if data.get("leaderboard"):
                results["leaderboard"] = data["leaderboard"]
            return results
    return {"stages": dict(manifest.get("metrics") or {}), "chance": {}}


def _run_config(run_dir: Path) -> dict:
    """The run's resolved config (``<run_dir>/config.yaml``, written by the driver); {} if none."""
    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}

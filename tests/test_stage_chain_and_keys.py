"""Issue 18 items 2, 3, 16: stage keys on content, the stage chain of this run, no stale GGUF release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.manifest import StageInput, stage_key


def test_stage_key_follows_data_content_not_its_absolute_path(tmp_path):
    """Item 16: the same data under another checkout path keeps the key; other content changes it."""
    a, b = tmp_path / "checkout_a" / "data", tmp_path / "checkout_b" / "data"
    a.mkdir(parents=True)
    (a / "corpus.txt").write_text("the same words\n\n\nin both checkouts\n")
    shutil.copytree(a, b)
    inputs = [StageInput(role="model", stage="merge", path="x", sha256="k")]

    def key(d: Path) -> str:
        return stage_key("cpt", {"data": {"cpt_files": [str(d / "corpus.txt")]}, "eval": {"mc": str(d)}}, inputs)

    assert key(a) == key(b)
    (b / "corpus.txt").write_text("other words\n")
    assert key(a) != key(b)
    # A hub id or a path that does not exist is kept as written.
    assert stage_key("base", {"model": "org/name"}, []) != stage_key("base", {"model": "org/other"}, [])


def _fake_run(tmp_path: Path, *, dpo_enabled: bool):
    """A run directory with completed base, merge, sft and dpo stages (dpo from an earlier run with
    dpo on), and this run's config saying whether dpo is on."""
    from pipeline.config import DPOConfig, EvalConfig, ModelConfig, PathsConfig, PipelineConfig
    from pipeline.configio import save_config
    from pipeline.manifest import new_manifest, stage_dir, write_manifest

    run = tmp_path / "run"
    cfg = PipelineConfig(model=ModelConfig(name_or_path="org/base"), dpo=DPOConfig(enabled=dpo_enabled),
                         eval=EvalConfig(stages=["base", "merge", "cpt", "sft", "dpo"]),
                         paths=PathsConfig(run_dir=str(run), cache_dir=str(tmp_path / "cache")))
    prev_key = last = None
    for name in ("base", "merge", "sft", "dpo"):
        d = stage_dir(run, name)
        d.mkdir(parents=True)
        inputs = []
        if prev_key is not None:
            inputs = [StageInput(role="model", stage=last, path=str(stage_dir(run, last)), sha256=prev_key)]
        write_manifest(d, new_manifest(stage=name, key=f"key-{name}", inputs=inputs, config={}, metrics={},
                                       started_at=0.0, model_dir="org/base" if name == "base" else "."))
        prev_key, last = f"key-{name}", name
    (stage_dir(run, "merge") / "mergekit_config.yml").write_text("merge_method: passthrough\n")
    save_config(cfg, run / "config.yaml")
    return cfg, run


def test_a_stage_turned_off_is_not_handed_on_evaluated_or_released(tmp_path):
    """Item 3: dpo's directory from an earlier run stays on disk; with dpo.enabled=false the
    quantize stage, the eval and the release all take sft's model, not the old dpo one."""
    from pipeline.release.record import load_run
    from pipeline.stages.eval import stage_models
    from pipeline.stages.stage import previous_model

    cfg, run = _fake_run(tmp_path, dpo_enabled=False)
    assert previous_model(cfg, "quantize")[0] == "sft"
    assert list(stage_models(cfg)) == ["base", "merge", "sft"]
    record = load_run(run)
    assert record.final_stage == "sft" and "dpo" not in record.manifests
    # With dpo on, the same directories hand on dpo's model.
    cfg_on, run_on = _fake_run(tmp_path / "on", dpo_enabled=True)
    assert previous_model(cfg_on, "quantize")[0] == "dpo"
    assert "dpo" in stage_models(cfg_on) and load_run(run_on).final_stage == "dpo"

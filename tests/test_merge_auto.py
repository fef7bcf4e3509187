"""merge=auto in the pipeline: the merge stage runs the seam analysis on the base model, merges the
recommended slices, records why (manifest + report in the merge directory), and a re-run reuses it."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DataConfig, ModelConfig, PathsConfig, PipelineConfig
from pipeline.driver import run_stage
from pipeline.errors import ConfigError
from pipeline.merge import MergeConfig
from pipeline.stages import get_stage


def auto_cfg(tmp_path, model_dir, corpus, **merge) -> PipelineConfig:
    out = tmp_path / "out"
    return PipelineConfig(
        model=ModelConfig(name_or_path=str(model_dir)),
        merge=MergeConfig(merge_method="auto", **{"target_layers": 6, "auto_top_k": 2, "auto_tokens": 256, **merge}),
        data=DataConfig(cpt_files=[str(corpus)], heldout_fraction=0.2),
        paths=PathsConfig(run_dir=str(out / "run"), cache_dir=str(tmp_path / "cache"), output_root=str(out)),
    )


def test_auto_merge_chooses_scores_and_records_the_seam(tmp_path, tiny_base_model_dir, tiny_data_dir):
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir / "corpus.txt")
    get_stage("merge").check(cfg, ["base", "merge"])
    run_stage(get_stage("base"), cfg)
    manifest = run_stage(get_stage("merge"), cfg)
    analysis = manifest.metrics["seam_analysis"]
    (lo1, hi1), (lo2, hi2) = analysis["slices"]
    assert lo1 == 0 and hi2 == 4 and (hi1 - lo1) + (hi2 - lo2) == 6 and hi1 > lo2  # a SOLAR-shaped seam
    merged = tmp_path / "out" / "run" / "01_merge"
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 6
    report = json.loads((merged / "seam_analysis" / "seam_report.json").read_text())
    assert [list(s) for s in report["recommended"]["slices"]] == analysis["slices"]
    assert (merged / "seam_analysis" / "seam_report.md").is_file()
    scored = [c for c in report["candidates"] if c.get("measured_perplexity") is not None]
    assert len(scored) >= 2 and report["recommended"]["measured_perplexity"] == min(c["measured_perplexity"] for c in scored)
    # The merge as done, reproducible from the run: the mergekit config names the chosen slices.
    import yaml

    done = yaml.safe_load((merged / "mergekit_config.yml").read_text())
    assert [s["sources"][0]["layer_range"] for s in done["slices"]] == analysis["slices"]
    again = run_stage(get_stage("merge"), cfg)  # up to date: the same manifest, no new analysis
    assert again.key == manifest.key and again.started_at == manifest.started_at
    from pipeline.release.card import _merge_section
    from pipeline.release.record import load_run

    card = "\n".join(_merge_section(load_run(tmp_path / "out" / "run")))
    chosen = " + ".join(f"[{lo}, {hi})" for lo, hi in analysis["slices"])
    assert "chosen from data (`merge=auto`, 6 layers)" in card and f"| **{chosen}** (chosen) |" in card


@pytest.mark.parametrize("merge, message", [
    ({"target_layers": 4}, "not deeper than the source model"),
    ({"target_layers": None}, "required by merge=auto"),
    ({"n_layers_removed": 1}, "auto chooses the slices itself"),
])
def test_auto_merge_bad_settings_are_refused_before_any_model_loads(tmp_path, tiny_base_model_dir, tiny_data_dir,
                                                                    merge, message):
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir / "corpus.txt", **merge)
    with pytest.raises(ConfigError, match=message):
        get_stage("merge").check(cfg, ["merge"])


def test_target_layers_without_auto_is_refused(tmp_path, tiny_base_model_dir, tiny_data_dir):
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir / "corpus.txt")
    cfg.merge.merge_method = "passthrough"
    with pytest.raises(ConfigError, match="only used by merge=auto"):
        get_stage("merge").check(cfg, ["merge"])

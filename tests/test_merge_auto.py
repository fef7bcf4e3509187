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


def auto_cfg(tmp_path, model_dir, corpus, selection_fraction=0.2, **merge) -> PipelineConfig:
    out = tmp_path / "out"
    return PipelineConfig(
        model=ModelConfig(name_or_path=str(model_dir)),
        merge=MergeConfig(merge_method="auto", **{"target_layers": 6, "auto_top_k": 2, "auto_tokens": 256, **merge}),
        data=DataConfig(cpt_files=[str(corpus)], heldout_fraction=0.2, selection_fraction=selection_fraction),
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
    from pipeline.release.card_sections import merge_section
    from pipeline.release.record import load_run

    card = "\n".join(merge_section(load_run(tmp_path / "out" / "run")))
    chosen = " + ".join(f"[{lo}, {hi})" for lo, hi in analysis["slices"])
    assert "chosen from data (`merge=auto`, 6 layers)" in card and f"| **{chosen}** (chosen) |" in card
    assert "tokens of the selection split (records at content-hash position [0.2, 0.4)" in card
    assert "held-out perplexity" not in card and "Spearman" not in card  # 2-3 scored seams: no rho


def test_auto_merge_scores_on_the_selection_split_never_on_evals_heldout_tokens(tmp_path, tiny_base_model_dir,
                                                                                 tiny_data_dir):
    """The seam's numbers are measured on the selection split: the base perplexity in the report is the
    base model's perplexity on the selection records' tokens, not on the held-out tokens eval reports."""
    from transformers import AutoTokenizer

    from pipeline.analysis.similarity import load_model_for_analysis, measure_perplexity
    from pipeline.analysis.tokens import heldout_token_batches, split_token_batches
    from pipeline.data.splits import RecordSplits

    corpus = tiny_data_dir / "corpus.txt"
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, corpus)
    run_stage(get_stage("base"), cfg)
    report = run_stage(get_stage("merge"), cfg).metrics["seam_analysis"]
    assert report["split"] == {"name": "selection", "heldout_fraction": 0.2, "selection_fraction": 0.2}
    tok = AutoTokenizer.from_pretrained(str(tiny_base_model_dir))
    common = dict(num_tokens=256, seq_len=256, batch_size=4)  # the analysis' own settings (context 256)
    selection = split_token_batches(tok, [str(corpus)], splits=RecordSplits(0.2, 0.2), **common)
    heldout = heldout_token_batches(tok, [str(corpus)], heldout_fraction=0.2, **common)  # eval's first tokens
    model = load_model_for_analysis(str(tiny_base_model_dir), device="cpu")
    on_selection = measure_perplexity(model=model, token_batches=selection, progress=False)
    on_heldout = measure_perplexity(model=model, token_batches=heldout, progress=False)
    assert report["base_perplexity"] == pytest.approx(on_selection, rel=1e-4)
    assert abs(on_heldout - on_selection) > 1e-3 * on_selection  # different tokens, a different number


def test_auto_merge_without_a_selection_split_is_refused(tmp_path, tiny_base_model_dir, tiny_data_dir):
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir / "corpus.txt", selection_fraction=0.0)
    with pytest.raises(ConfigError, match="merge=auto chooses on the selection split") as e:
        get_stage("merge").check(cfg, ["merge"])
    assert e.value.where == "data.selection_fraction"


def test_a_selection_split_too_small_is_refused_before_the_model_loads(tmp_path, tiny_base_model_dir, tiny_data_dir,
                                                                        monkeypatch):
    import pipeline.analysis.recommend as recommend_module

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the selection split was checked")

    monkeypatch.setattr(recommend_module, "load_model_for_analysis", refuse)
    cfg = auto_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir / "corpus.txt", selection_fraction=0.01,
                   auto_tokens=200_000)
    run_stage(get_stage("base"), cfg)
    with pytest.raises(ConfigError, match=r"asked for 200000 tokens but the selection split \(records at "
                                          r"content-hash position \[0.2, 0.21\)") as e:
        run_stage(get_stage("merge"), cfg)
    assert e.value.where == "merge.auto_tokens" and "raise data.selection_fraction" in e.value.fix


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

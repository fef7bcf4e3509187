"""The growth study (issue #21, docs/growth-study.md): the operators of conf/growth/ reach one depth,
the function-preserving one computes the base's logits before training, a sweep of points that are
not comparable is refused before any model loads, and the demo sweep writes its report.

That the selection split and the held-out split share no record is tests/test_splits.py
(test_selection_split_shares_no_record_with_heldout_or_train_on_the_demo_corpus); here the study
refuses fractions that would leave no disjoint selection split.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cluster.growth import check_points, crossing, planned_cpt_tokens, summarize, typed_job_config
from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import run_cli, tiny_overrides  # noqa: E402

DEMO_OPERATORS = ("solar", "auto", "llama_pro", "llama_pro_new_only", "control")


def compose(*overrides: str) -> PipelineConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        return typed_job_config(cfg, "/tmp/not-run")


def demo_point(op: str, *extra: str) -> tuple[str, PipelineConfig]:
    return op, compose("experiment=growth_study_demo", f"growth=demo/{op}", *extra)


def test_demo_operators_reach_one_depth_with_equal_tokens():
    planned = check_points([demo_point(op) for op in DEMO_OPERATORS])
    assert {k: v["layers"] for k, v in planned.items()} == {
        "solar": 12, "auto": 12, "llama_pro": 12, "llama_pro_new_only": 12, "control": 8}
    assert {v["cpt_tokens"] for v in planned.values()} == {8 * 1024}
    # Only the new-blocks point freezes; every point keeps the same selection split out of cpt.
    cfgs = dict(demo_point(op) for op in DEMO_OPERATORS)
    assert [op for op, c in cfgs.items() if c.cpt.trainable_from_merge == "added"] == ["llama_pro_new_only"]
    assert {c.data.selection_fraction for c in cfgs.values()} == {0.05}


def test_an_operator_short_of_the_depth_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"do not reach the study's depth 14.*llama_pro -> 12 layers"):
        check_points([demo_point("solar", "merge.n_layers_removed=1"), demo_point("llama_pro")])


def test_points_with_unequal_cpt_tokens_are_refused_unless_allowed():
    points = [demo_point("solar"), demo_point("control", "cpt.max_steps=9")]
    with pytest.raises(ConfigError, match=r"differ in planned cpt tokens: solar: 8,192; control: 9,216"):
        check_points(points)
    assert check_points(points, allow_unequal_tokens=True)["control"]["cpt_tokens"] == 9 * 1024
    with pytest.raises(ConfigError, match="train by epochs"):
        check_points([demo_point("solar", "cpt.max_steps=-1"), demo_point("control")])


def test_split_fractions_without_a_disjoint_selection_split_are_refused():
    with pytest.raises(ConfigError, match=r"data\.selection_fraction"):
        check_points([demo_point("auto", "data.heldout_fraction=0.5", "data.selection_fraction=0.5")])


def test_planned_tokens_count_every_process():
    cfg = compose("experiment=demo", "cpt.max_steps=3")  # 8 blocks x 2 processes x 256 tokens
    assert planned_cpt_tokens(cfg) == 3 * 8 * 2 * 256


def test_llama_pro_operator_computes_the_base_logits(tiny_base_model_dir, tmp_path):
    """The study's function-preserving operator, as configured, on a real (tiny) base: same logits."""
    from transformers import AutoModelForCausalLM

    from pipeline.merge import run_merge

    merge_cfg = demo_point("llama_pro")[1].merge
    metrics = run_merge(merge_cfg, tmp_path / "grown", base_model=str(tiny_base_model_dir), progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir, dtype=torch.float32).eval()
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32).eval()
    assert grown.config.num_hidden_layers == base.config.num_hidden_layers * 3 // 2 and metrics["new_layers"]
    tokens = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (grown(tokens).logits - base(tokens).logits).abs().max().item()
    assert diff < 1e-5


def _curve(*points):
    return {"curve": [{"tokens_seen": t, "heldout_loss": loss} for t, loss in points]}


def test_crossing_measured_or_labelled_extrapolation():
    control = _curve((1000, 3.0), (2000, 2.8), (3000, 2.7))
    assert crossing(_curve((1000, 3.3), (2000, 2.9), (3000, 2.65)), control) == {
        "kind": "measured", "tokens": 3000, "text": "below the control from 3,000 tokens (measured)"}
    later = crossing(_curve((1000, 3.6), (2000, 3.1), (3000, 2.85)), control)
    assert later["kind"] == "extrapolated" and later["tokens"] > 3000 and "EXTRAPOLATED" in later["text"]
    assert "least squares on 3 and 3 curve points" in later["fit"]
    never = crossing(_curve((1000, 3.2), (2000, 3.1), (3000, 3.05)), control)
    assert never["kind"] == "none" and "does not cross within 3,000 tokens" in never["text"]


def _study_point(operator: str, parameters: int, cpt_tokens: int, curve: list[tuple[int, float]]) -> dict:
    return {"operator": operator, "is_control": operator == "control", "parameters": parameters,
            "cpt_tokens": cpt_tokens, "training_flops": 6 * parameters * cpt_tokens, "heldout_ppl_cpt": None,
            "curve": [{"tokens_seen": t, "heldout_loss": loss} for t, loss in curve]}


def test_equal_flops_reads_the_cheapest_point_at_the_end_of_its_curve():
    """Found on the 200k SmolLM2 study: the manifest counted 200,704 cpt tokens, the Trainer's curve
    ended at 200,559 (pad = eos), so the control could not be read at its own budget and the grown
    point 'won' at equal FLOPs by default. Each curve is read at the budget's fraction of its run."""
    control = _study_point("control", 100, 200_704, [(100_000, 3.3), (200_559, 3.2)])
    grown = _study_point("solar", 150, 200_704, [(100_000, 3.4), (200_559, 3.25)])
    summary = summarize([control, grown])
    assert summary["heldout_loss_at_equal_flops"]["control"] == 3.2
    # The grown point's budget buys 2/3 of its run: 133,706 of its curve's tokens, between 3.4 and 3.25.
    expected = 3.4 - 0.15 * (200_559 * 2 / 3 - 100_000) / 100_559
    assert summary["heldout_loss_at_equal_flops"]["solar"] == pytest.approx(expected)
    assert summary["winner_at_equal_flops"] == "control"
    no_curve = _study_point("control", 100, 200_704, [])
    assert summarize([no_curve, grown])["winner_at_equal_flops"].startswith(
        "n/a (no held-out curve at the budget for: control")


@pytest.mark.slow
def test_demo_growth_sweep_writes_the_report_with_all_points(tmp_path, tiny_data_dir):
    """Three points (SOLAR, LLaMA Pro, control), 4 cpt steps each, through `python -m pipeline -m`."""
    sweep = tmp_path / "study"
    args = [o for o in tiny_overrides(tiny_data_dir, tmp_path) if not o.startswith("run_name")]
    run_cli(["-m", "experiment=growth_study_demo", "growth=demo/solar,demo/llama_pro,demo/control", *args,
             "cpt.max_steps=4", "cpt.eval_every_tokens=512", "sft.max_steps=2", "eval.max_heldout_tokens=2048",
             "eval.max_sft_heldout_examples=4", "release.enabled=false", f"hydra.sweep.dir={sweep}"])
    report = json.loads((sweep / "sweep_report.json").read_text())
    points = {p["operator"]: p for p in report["points"]}
    assert set(points) == {"solar", "llama_pro", "control"}
    # 4 steps x 4 blocks x 64 tokens, counted by the trainer, equal for every point.
    assert {p["cpt_tokens"] for p in points.values()} == {1024} and report["summary"]["equal_cpt_tokens"]
    assert {k: p["layers"] for k, p in points.items()} == {"solar": 12, "llama_pro": 12, "control": 8}
    for p in points.values():
        assert [c["tokens_seen"] for c in p["curve"]] == [512, 1024]
        assert all(Path(p[f"{s}_model_dir"]).is_dir() for s in ("merge", "cpt", "sft"))
        assert all(p[f"heldout_ppl_{s}"] > 1 for s in ("merge", "cpt", "sft"))
        assert p["training_flops"] == 6 * p["parameters"] * 1024
    # The function-preserving point starts where the base is: its merged ppl equals the control's.
    assert points["llama_pro"]["heldout_ppl_merge"] == pytest.approx(points["control"]["heldout_ppl_merge"], rel=1e-4)
    md = (sweep / "sweep_report.md").read_text()
    assert "control (control)" in md and "Winner at equal cpt tokens" in md and "6 · N · cpt tokens" in md
    assert report["summary"]["winner_at_equal_tokens"] in points
    assert (sweep / "loss_vs_tokens.png").stat().st_size > 1000
    # The same report again from the directory alone.
    (sweep / "sweep_report.md").unlink()
    from pipeline.report import main as report_main

    assert report_main(["--sweep", str(sweep)]) == 0 and (sweep / "sweep_report.md").read_text() == md


@pytest.mark.slow
def test_a_sweep_with_unequal_tokens_is_refused_before_any_job_runs(tmp_path, tiny_data_dir):
    sweep = tmp_path / "study"
    args = [o for o in tiny_overrides(tiny_data_dir, tmp_path) if not o.startswith("run_name")]
    proc = run_cli(["-m", "experiment=growth_study_demo", "growth=demo/solar,demo/control", *args,
                    "cpt.max_steps=2,3", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode != 0
    assert "differ in planned cpt tokens" in proc.stderr + proc.stdout
    assert not list(sweep.glob("*/01_merge"))


def test_the_report_takes_the_leaderboard_average_over_the_tasks_that_ran():
    from pipeline.cluster.growth import _leaderboard

    results = {"leaderboard": {"tasks": {"arc_challenge": {}, "winogrande": {}}},
               "stages": {"sft": {"arc_challenge/acc_norm": 0.25, "winogrande/acc": 0.75, "heldout/perplexity": 30.0},
                          "cpt": {"heldout/perplexity": 29.0}}}
    assert _leaderboard(results, "sft") == pytest.approx(0.5)
    assert _leaderboard(results, "cpt") is None  # no board task scored: n/a, not 0
    assert _leaderboard({"stages": {"sft": {"heldout/perplexity": 30.0}}}, "sft") is None

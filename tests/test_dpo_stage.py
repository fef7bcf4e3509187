"""The dpo stage (pipeline/stages/dpo.py): config and preflight refusals, its trainer built from a
PipelineConfig on the tiny model, the conf group, and (slow) the whole pipeline with dpo on 2 ranks
under ZeRO-3, with preference accuracy for sft and dpo in the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, DataConfig, DPOConfig, PathsConfig, PipelineConfig
from pipeline.errors import ConfigError
from pipeline.stages import BY_NAME
from pipeline.stages.dpo import DPOStage, build_dpo_stage_trainer, check_dpo_config

DEMO_PREFS = REPO_ROOT / "data" / "demo" / "preferences.jsonl"


def dpo_cfg(tmp_path, files=(str(DEMO_PREFS),), **dpo) -> PipelineConfig:
    return PipelineConfig(data=DataConfig(dpo_files=list(files)), dpo=DPOConfig(enabled=True, **dpo),
                          paths=PathsConfig(run_dir=str(tmp_path)))


def test_dpo_is_a_registered_training_stage_between_sft_and_eval():
    from pipeline.config import STAGES, TRAINING_STAGES

    assert isinstance(BY_NAME["dpo"], DPOStage)
    assert STAGES.index("sft") < STAGES.index("dpo") < STAGES.index("eval") and "dpo" in TRAINING_STAGES
    assert DPOConfig().enabled is False  # opt-in: dpo.enabled=true


@pytest.mark.parametrize("overrides, field", [
    ({"beta": 0.0}, "dpo.beta"),
    ({"beta": -1.0}, "dpo.beta"),
    ({"loss_type": "orpo"}, "dpo.loss_type"),
    ({"max_length": 256, "max_prompt_length": 300}, "dpo.max_prompt_length"),
    ({"rpo_alpha": -0.5}, "dpo.rpo_alpha"),
])
def test_preflight_refuses_bad_settings(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_dpo_config(dpo_cfg(tmp_path, **overrides))


def test_preflight_checks_the_preference_files(tmp_path):
    check_dpo_config(dpo_cfg(tmp_path))  # the shipped demo pairs pass
    with pytest.raises(ConfigError, match=r"data\.dpo_files.*is empty"):
        check_dpo_config(dpo_cfg(tmp_path, files=()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DEMO_PREFS.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl\) row 1.*same text"):
        check_dpo_config(dpo_cfg(tmp_path, files=(str(bad),)))
    with pytest.raises(ConfigError, match="does not exist"):
        check_dpo_config(dpo_cfg(tmp_path, files=(str(tmp_path / "missing.jsonl"),)))


def test_conf_group_composes_default_and_lora():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)  # as pipeline/__main__.py does
    run = ["paths.run_dir=/nonexistent", "run_name=t"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        default = compose("config", overrides=["dpo.enabled=true", *run])
        lora = compose("config", overrides=["dpo=lora", *run])
    assert default.dpo.enabled and not default.dpo.use_lora and default.dpo.beta > 0
    assert lora.dpo.use_lora and lora.dpo.learning_rate > default.dpo.learning_rate
    assert [Path(f).name for f in default.data.dpo_files] == ["preferences.jsonl"]


def test_stage_trainer_from_the_config_trains_one_step(tmp_path, tiny_base_model_dir):
    """The stage's build_trainer on the tiny model: held-out pairs kept out of training, the fixed
    batch is chosen conversations with the loss on the replies, one real DPO step (loss ln 2)."""
    import math

    from transformers import AutoTokenizer

    cfg = dpo_cfg(tmp_path, beta=0.1, max_length=96, max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3)
    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    setup = build_dpo_stage_trainer(cfg, tokenizer=tok, input_model=str(tiny_base_model_dir),
                                    checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")
    assert setup.data_stats["heldout_pairs"] == 96 and setup.data_stats["train_pairs"] + setup.data_stats[
        "dropped_by_trl_max_length"] == 288
    assert not setup.saves_adapter and setup.seq_len == 96
    labels = setup.fixed_batch["labels"]
    assert len(labels) == 4 and all(any(t != -100 for t in row) and row[0] == -100 for row in labels)
    setup.trainer.train()
    first = next(h for h in setup.trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_pipeline_with_dpo_on_two_ranks(tmp_path, tiny_data_dir):
    """`python -m pipeline dpo.enabled=true ...`: base -> merge -> cpt -> sft -> dpo -> eval, the
    training stages on 2 ranks with ZeRO-3. dpo starts from sft's model (its manifest input), its
    ranks trained on different pairs, its export is verified, and the results table has preference
    accuracy and margin for sft and dpo."""
    from test_pipeline import run_cli, tiny_overrides

    from pipeline.manifest import read_manifest, stage_dir

    overrides = [*tiny_overrides(tiny_data_dir, tmp_path), "dpo.enabled=true", f"data.dpo_files=[{DEMO_PREFS}]",
                 "dpo.max_length=128", "dpo.per_device_train_batch_size=4", "dpo.max_steps=4", "dpo.save_steps=2",
                 "dpo.logging_steps=1", "dpo.learning_rate=1e-3"]
    run_cli(overrides)
    run_dir = tmp_path / "tiny"
    dpo = read_manifest(stage_dir(run_dir, "dpo"))
    [model_input] = [i for i in dpo.inputs if i.role == "model"]
    assert model_input.stage == "sft" and model_input.sha256 == read_manifest(stage_dir(run_dir, "sft")).key
    m = dpo.metrics
    assert m["global_step"] == 4 and m["world_size"] == 2
    v = m["verification"]
    assert v["abs_diff"] <= v["rtol"] * abs(v["trained_fixed_batch_loss"])
    ranks = [json.loads((stage_dir(run_dir, "dpo") / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert not set(ranks[0]["served_indices"]) & set(ranks[1]["served_indices"])
    results = json.loads((stage_dir(run_dir, "eval") / "results.json").read_text())["stages"]
    # sft scored against itself: its reward metrics are undefined (every reward 0), shown as n/a.
    assert results["sft"]["preference/reward_accuracy"] is None and results["sft"]["preference/reference_is_policy"]
    assert results["dpo"]["preference/examples"] > 0 and "preference/reward_margin" in results["dpo"]
    assert 0.0 <= results["dpo"]["preference/logprob_accuracy"] <= 1.0
    md = (stage_dir(run_dir, "eval") / "results.md").read_text()
    assert "held-out preference accuracy (chance 0.5)" in md and "n/a (reference = itself)" in md
    # Something real about dpo: on the pairs it trained on (found by the fingerprints its ranks
    # recorded), the chosen replies gained reward over the rejected ones against the sft reference.
    from transformers import AutoTokenizer

    from pipeline.data.preference import load_preferences, tokenize_pair
    from pipeline.evaluation.preference import evaluate_preferences
    from pipeline.training.callbacks import token_fingerprint

    served = set(ranks[0]["served_indices"]) | set(ranks[1]["served_indices"])  # fingerprints of prompt + chosen ids
    tok = AutoTokenizer.from_pretrained(stage_dir(run_dir, "sft"))
    pairs = load_preferences([str(DEMO_PREFS)])
    trained = [p for p in pairs if token_fingerprint((t := tokenize_pair(tok, p)).prompt_ids + t.chosen_ids) in served]
    assert trained, "no trained pair found by its fingerprint"
    on_train = evaluate_preferences(policy_dir=stage_dir(run_dir, "dpo"), reference_dir=stage_dir(run_dir, "sft"),
                                    pairs=trained, beta=0.1, max_length=128)
    assert on_train.mean_reward_margin > 0, on_train


@pytest.mark.slow  # a Hydra CLI start: 54 s seen on the loaded shared cores
def test_cli_preflight_refuses_a_bad_dpo_setting_before_any_work(tmp_path):
    """`python -m pipeline preflight=true dpo.enabled=true dpo.beta=0`: the stage's check runs in the
    preflight (nothing is built), and the message names the field."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "preflight=true", "dpo.enabled=true", "dpo.beta=0",
                           f"paths.output_root={tmp_path}", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "dpo.beta" in proc.stdout + proc.stderr and "must be > 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "cache" / "demo_base").exists()

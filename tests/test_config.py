"""Every config composes into the typed schema; bad keys and types fail at composition."""


import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.configio import scrub_secrets, to_typed
from pipeline.errors import ConfigError

CONF = REPO_ROOT / "conf"
ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def compose_typed(overrides, tmp_path) -> PipelineConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.run_dir={tmp_path}", "run_name=t"])
    return to_typed(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_typed([f"experiment={experiment}"], tmp_path)
    assert isinstance(cfg, PipelineConfig)
    from pipeline.training.distributed import validate_distributed

    if cfg.distributed.num_machines == 1 and cfg.distributed.launcher == "accelerate":  # inprocess: no DeepSpeed
        validate_distributed(cfg.distributed, cfg.paths.conf_dir)


def test_solar_recipe_is_the_papers(tmp_path):
    cfg = compose_typed(["experiment=solar_10.7b"], tmp_path)
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.3"
    assert cfg.model.demo is None and cfg.model.trust_remote_code is False
    assert cfg.merge.merge_method == "passthrough" and cfg.merge.dtype == "bfloat16"
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in cfg.merge.slices] == [
        ("mistralai/Mistral-7B-Instruct-v0.3", [0, 24]), ("mistralai/Mistral-7B-Instruct-v0.3", [8, 32])]
    assert sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in cfg.merge.slices) == 48
    assert cfg.distributed.zero_stage == 3 and cfg.distributed.num_processes == 8
    assert cfg.cpt.enabled and cfg.sft.enabled
    # The paper's fourth step (DPO on the sft model) and the quantized release are on too.
    assert cfg.dpo.enabled and cfg.dpo.precompute_ref_log_probs and cfg.quantize.backend == "gguf"


def test_demo_is_the_default(tmp_path):
    cfg = compose_typed([], tmp_path)
    assert cfg.model.demo is not None and cfg.model.demo.num_hidden_layers == 8
    assert [s.sources[0].layer_range for s in cfg.merge.slices] == [[0, 6], [2, 8]]
    assert cfg.distributed.num_processes == 2 and cfg.distributed.zero_stage == 3


@pytest.mark.parametrize("group", ["model", "merge", "data", "cpt", "sft", "eval", "distributed", "release"])
def test_every_group_option_composes(group, tmp_path):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if option == "from_file":
            overrides.append("merge.config_file=x.yml")
        if option == "zero3_multinode":
            continue  # reads SLURM variables; composed in test_multinode_reads_slurm_env
        compose_typed(overrides, tmp_path)


def test_multinode_reads_slurm_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("DUS_TOTAL_GPUS", "32")
    cfg = compose_typed(["distributed=zero3_multinode"], tmp_path)
    d = cfg.distributed
    assert (d.num_machines, d.machine_rank, d.num_processes, d.main_process_ip) == (4, 2, 32, "10.0.0.1")


@pytest.mark.parametrize("override", ["cpt.learning_rat=1e-4", "+cpt.learning_rat=1e-4"])
def test_unknown_key_fails_at_composition(override, tmp_path):
    with pytest.raises(Exception, match="learning_rat"):
        compose_typed([override], tmp_path)


def test_wrong_type_fails_with_the_key(tmp_path):
    with pytest.raises(Exception, match="max_steps"):
        compose_typed(["cpt.max_steps=lots"], tmp_path)


def test_to_typed_names_the_missing_key():
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="model.name_or_path"):
        to_typed(OmegaConf.create({"paths": {"run_dir": "/tmp/x"}}))


def test_secrets_are_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefsecret")
    cfg = {"hub_token": "x", "wandb_api_key": "y", "num_key_value_heads": 8, "max_tokens": 5,
           "nested": [{"note": "hf_abcdefsecret"}], "password": "p"}
    out = scrub_secrets(cfg)
    assert out["hub_token"] == out["wandb_api_key"] == out["password"] == "***"
    assert out["nested"][0]["note"] == "***"
    assert out["num_key_value_heads"] == 8 and out["max_tokens"] == 5

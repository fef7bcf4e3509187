"""Every user error is a ConfigError naming the field or file, raised before anything is written;
the CLI turns it into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.merge import InputSlice, MergeConfig, OutputSlice, run_merge, validate_merge  # noqa: E402
from pipeline.merge.__main__ import main  # noqa: E402
from pipeline.merge.testing import make_tiny_model, make_tiny_tokenizer  # noqa: E402


def cfg_of(*sources, **kw) -> MergeConfig:
    """sources: (model, [start, end]) pairs, one slice each."""
    return MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(m), layer_range=list(r))]) for m, r in sources],
                       **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("errs") / "llama"
    make_tiny_model("LlamaForCausalLM", d)
    return d


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_layer_range_outside_the_model_names_the_slice(llama, tmp_path):
    msg = raises(r"merge\.slices\[1\]\.sources\[0\]\.layer_range", validate_merge, cfg_of((llama, [0, 3]), (llama, [2, 5])))
    assert "[2, 5) lies outside" in msg and "has 4 layers" in msg


@pytest.mark.parametrize("rng, problem", [([2, 2], "is empty"), ([3, 1], "is reversed"), ([0], "two integers"),
                                          ([-1, 2], "negative"), ([0, "4"], "two integers")])
def test_bad_layer_ranges(llama, rng, problem):
    msg = raises(r"merge\.slices\[0\]\.sources\[0\]\.layer_range", validate_merge, cfg_of((llama, rng)))
    assert problem in msg


def test_missing_model_directory(tmp_path):
    msg = raises(r"merge\.slices\[0\]\.sources\[0\]\.model", validate_merge, cfg_of((tmp_path / "nope", [0, 1])))
    assert "does not exist" in msg


def test_hub_repo_offline_names_the_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = raises(r"merge\.slices\[0\]\.sources\[0\]\.model", validate_merge, cfg_of(("some-org/some-model", [0, 1])))
    assert "'some-org/some-model'" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_repo_in_the_local_cache_works_offline(llama, tmp_path, monkeypatch):
    # the HF cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0" * 40
    shutil.copytree(llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = run_merge(cfg_of(("tiny-org/tiny-llama", [0, 2]), ("tiny-org/tiny-llama", [1, 4])), tmp_path / "out",
                  progress=False)
    assert m["num_hidden_layers"] == 5 and (tmp_path / "out" / "tokenizer.json").is_file()


def test_missing_config_json(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m")
    (d / "config.json").unlink()
    raises(r"config\.json: missing", validate_merge, cfg_of((d, [0, 1])))


def test_unknown_architecture_is_refused(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    msg = raises(rf"{d}/config\.json: unknown architecture \['GPT2LMHeadModel'\]", validate_merge, cfg_of((d, [0, 1])))
    assert "MistralForCausalLM" in msg  # lists what is supported


def test_different_architectures_and_hidden_sizes(llama, tmp_path):
    make_tiny_model("MistralForCausalLM", tmp_path / "mistral", tokenizer=False)
    msg = raises(r"merge\.slices\[1\]\.sources\[0\]\.model", validate_merge,
                 cfg_of((llama, [0, 2]), (tmp_path / "mistral", [2, 4])))
    assert "MistralForCausalLM" in msg and "LlamaForCausalLM" in msg
    make_tiny_model("LlamaForCausalLM", tmp_path / "wide", hidden_size=128, tokenizer=False)
    msg = raises(r"merge\.slices\[1\]\.sources\[0\]\.model", validate_merge,
                 cfg_of((llama, [0, 2]), (tmp_path / "wide", [2, 4])))
    assert "hidden_size=128" in msg and "hidden_size=64" in msg


def test_shard_named_in_index_is_missing(tmp_path):
    d = tmp_path / "sharded"
    model = make_tiny_model("LlamaForCausalLM", d, tokenizer=False)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    validate_merge(cfg_of((d, [0, 4])))  # complete: fine
    shards[1].unlink()
    msg = raises(r"model\.safetensors\.index\.json: names shard", validate_merge, cfg_of((d, [0, 4])))
    assert shards[1].name in msg


def test_pickle_checkpoints_refused_unless_allowed(llama, tmp_path):
    d = copy_model(llama, tmp_path / "pickled")
    from safetensors.torch import load_file

    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    cfg = cfg_of((d, [0, 3]), (d, [1, 4]))
    msg = raises(r"pytorch_model\.bin: only a PyTorch pickle checkpoint", validate_merge, cfg)
    assert "allow_pickle" in msg
    run_merge(cfg, tmp_path / "from_pickle", allow_pickle=True, progress=False)
    run_merge(cfg_of((llama, [0, 3]), (llama, [1, 4])), tmp_path / "from_st", progress=False)
    for shard in (tmp_path / "from_st").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "from_pickle" / shard.name).read_bytes()
    # casting from a pickle source goes through the same transform
    run_merge(cfg_of((d, [0, 4]), dtype="bfloat16"), tmp_path / "pickle_bf16", allow_pickle=True, progress=False)
    from safetensors.torch import load_file as load

    out = load(tmp_path / "pickle_bf16" / "model-00001-of-00001.safetensors")
    assert torch.equal(out["lm_head.weight"], state["lm_head.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b[:5], "shorter than the 8-byte header length"),
    (lambda b: b[:100], "does not fit"),
    (lambda b: b[:8] + b"{not json" + b[17:], "header is not JSON"),
    (lambda b: b[: len(b) - 1000], "outside"),
])
def test_truncated_or_corrupt_safetensors(llama, tmp_path, damage, problem):
    d = copy_model(llama, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    msg = raises(rf"{f}: not a valid safetensors file", validate_merge, cfg_of((d, [0, 1])))
    assert problem in msg


def test_unknown_tensor_is_refused_not_dropped(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_model(llama, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["model.layers.0.mlp.extra_gate.weight"] = torch.zeros(4)
    save_file(state, d / "model.safetensors")
    msg = raises(r"model\.safetensors: holds 1 tensor\(s\) the LlamaForCausalLM layout does not know", validate_merge,
                 cfg_of((d, [0, 1])))
    assert "extra_gate" in msg


def test_two_sources_in_a_passthrough_slice(llama):
    cfg = MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(llama), layer_range=[0, 2]),
                                                   InputSlice(model=str(llama), layer_range=[2, 4])])])
    raises(r"merge\.slices\[0\]\.sources: passthrough takes exactly one source", validate_merge, cfg)


def test_missing_model_without_base_model(llama):
    raises(r"merge\.slices\[0\]\.sources\[0\]\.model: not set", validate_merge,
           MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 2])])]))


def test_bad_parameters_and_dtypes(llama):
    raises(r"merge\.slices\[0\]\.parameters\.weight: not a parameter", validate_merge,
           MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(llama), layer_range=[0, 2])],
                                           parameters={"weight": 0.5})]))
    raises(r"merge\.parameters\.scale: expected a number", validate_merge,
           cfg_of((llama, [0, 2]), parameters={"scale": "big"}))
    raises(r"merge\.dtype: unsupported dtype 'fp8'", validate_merge, cfg_of((llama, [0, 2]), dtype="fp8"))
    raises(r"merge\.out_shard_size", validate_merge, cfg_of((llama, [0, 2]), out_shard_size="lots"))
    raises(r"merge\.chat_template: 'chatml' is not a Jinja template", validate_merge,
           cfg_of((llama, [0, 2]), chat_template="chatml"))


def test_tokenizer_source_with_another_vocabulary(llama, tmp_path):
    other = tmp_path / "other_tok"
    make_tiny_tokenizer(other, vocab_size=200)
    raises(r"merge\.tokenizer_source: the vocabulary of .* differs", validate_merge,
           cfg_of((llama, [0, 2]), tokenizer_source=str(other)))
    raises(r"merge\.tokenizer_source: 'union'", validate_merge, cfg_of((llama, [0, 2]), tokenizer_source="union"))


def test_existing_output_dir_is_not_touched(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    raises(rf"{out}: already exists", run_merge, cfg_of((llama, [0, 2])), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    raises(r"lies inside the source model directory", run_merge, cfg_of((llama, [0, 2])), llama / "merged",
           progress=False)


def test_mergekit_yaml_errors(llama, tmp_path):
    yml = tmp_path / "m.yml"
    yml.write_text(f"slices:\n  - sources:\n      - model: {llama}\n        layer_range: [0, 9]\nmerge_method: passthrough\n")
    raises(rf"{yml}: slices\[0\]\.sources\[0\]\.layer_range: \[0, 9\) lies outside", validate_merge,
           MergeConfig(config_file=str(yml)))
    yml.write_text("slices: []\nmerge_method: passthrough\ndtpye: bfloat16\n")
    raises(rf"{yml}: dtpye: unknown key", validate_merge, MergeConfig(config_file=str(yml)))
    yml.write_text("slices: [\n")
    raises(rf"{yml}: not valid YAML", validate_merge, MergeConfig(config_file=str(yml)))
    raises(r"merge\.config_file: .* does not exist", validate_merge, MergeConfig(config_file=str(tmp_path / "x.yml")))


def test_cli_exit_code_2_and_nothing_written(llama, tmp_path, capsys):
    yml = tmp_path / "bad.yml"
    yml.write_text(f"slices:\n  - sources:\n      - model: {llama}\n        layer_range: [3, 1]\nmerge_method: passthrough\n")
    out = tmp_path / "out"
    assert main([str(yml), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "slices[0].sources[0].layer_range" in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]
    assert main([str(yml), str(out), "--out-shard-size", "huge"]) == 2

    good = tmp_path / "good.yml"
    good.write_text(f"slices:\n  - sources:\n      - model: {llama}\n        layer_range: [0, 3]\n"
                    f"  - sources:\n      - model: {llama}\n        layer_range: [1, 4]\nmerge_method: passthrough\n")
    assert main([str(good), str(out), "--no-progress", "--out-shard-size", "50K",
                 "--metrics-json", str(tmp_path / "metrics.json")]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert json.loads((tmp_path / "metrics.json").read_text())["num_shards"] > 1


def test_cli_as_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.merge", str(tmp_path / "missing.yml"), str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "merge.config_file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()

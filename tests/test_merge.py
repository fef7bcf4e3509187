"""Passthrough merge: layer mapping, bit-identity, config, dtype, scale, tokenizer, sharding, atomicity."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.merge import InputSlice, MergeConfig, OutputSlice, run_merge, to_mergekit_yaml, validate_merge  # noqa: E402
from pipeline.merge import execute  # noqa: E402
from pipeline.merge.testing import make_tiny_model  # noqa: E402


def slices(*ranges, model=None, scale=None):
    return [OutputSlice(sources=[InputSlice(model=model, layer_range=list(r))],
                        parameters=None if scale is None else {"scale": scale}) for r in ranges]


def read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(model_dir / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def read_source(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_models")
    built = {
        "mistral": ("MistralForCausalLM", {"num_hidden_layers": 8}),
        "mistral_b": ("MistralForCausalLM", {"num_hidden_layers": 8, "seed": 1}),
        "qwen2": ("Qwen2ForCausalLM", {"num_hidden_layers": 8, "max_window_layers": 6}),
        "qwen3_tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
        "llama_bf16": ("LlamaForCausalLM", {"dtype": "bfloat16"}),
        "gemma2": ("Gemma2ForCausalLM", {}),
    }
    out = {}
    for key, (arch, kw) in built.items():
        make_tiny_model(arch, root / key, **kw)
        out[key] = root / key
    return out


def test_layer_map_and_bit_identity(models, tmp_path):
    src = models["mistral"]
    m = run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(src))), tmp_path / "out", progress=False)
    assert m["num_hidden_layers"] == 12 and m["num_layers_in"] == {str(src): 8}
    assert m["layer_map"] == [[str(src), i] for i in [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]]
    merged, source = read_all(tmp_path / "out"), read_source(src)
    for out_layer, (_, src_layer) in enumerate(m["layer_map"]):
        prefix, src_prefix = f"model.layers.{out_layer}.", f"model.layers.{src_layer}."
        names = [n for n in merged if n.startswith(prefix)]
        assert len(names) == 9
        for n in names:
            a, b = merged[n], source[src_prefix + n[len(prefix):]]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), n
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[n], source[n])
    assert len(merged) == 12 * 9 + 3
    assert m["num_parameters"] == sum(t.numel() for t in merged.values())
    assert m["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))


def test_config_fields(models, tmp_path):
    src = models["qwen2"]  # sliding window on layers >= 6 of 8
    run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(src)), dtype="bfloat16"), tmp_path / "o",
              progress=False)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    src_types = json.loads((src / "config.json").read_text())["layer_types"]
    assert cfg["num_hidden_layers"] == 12
    assert cfg["layer_types"] == [src_types[i] for i in [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]]
    assert cfg["layer_types"][-2:] == ["sliding_attention"] * 2 and cfg["layer_types"].count("sliding_attention") == 2
    # source layers >= 6 slide; in the output they are layers 10 and 11: the threshold moves to 10
    assert cfg["max_window_layers"] == 10
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(tmp_path / "o")
    assert loaded.layer_types == cfg["layer_types"] and loaded.num_hidden_layers == 12


def test_gemma2_layer_types_follow_their_layers(models, tmp_path):
    src = models["gemma2"]  # alternating sliding/full starting with sliding
    run_merge(MergeConfig(slices=slices((0, 3), (2, 4), model=str(src))), tmp_path / "o", progress=False)
    types = json.loads((tmp_path / "o" / "config.json").read_text())["layer_types"]
    assert types == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def test_tied_embeddings_stay_tied(models, tmp_path):
    src = models["qwen3_tied"]
    run_merge(MergeConfig(slices=slices((0, 3), (1, 4), model=str(src))), tmp_path / "o", progress=False)
    merged = read_all(tmp_path / "o")
    assert "lm_head.weight" not in merged
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "o", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cast_to_bf16_and_out_dtype(models, tmp_path):
    src = models["mistral"]
    run_merge(MergeConfig(slices=slices((0, 8), model=str(src)), dtype="bfloat16"), tmp_path / "bf16", progress=False)
    merged, source = read_all(tmp_path / "bf16"), read_source(src)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    for n, t in merged.items():
        assert torch.equal(t, source[n].to(torch.bfloat16)), n
    # mergekit order: cast to dtype, then to out_dtype (a lossy round trip through bfloat16)
    run_merge(MergeConfig(slices=slices((0, 8), model=str(src)), dtype="bfloat16", out_dtype="float32"),
              tmp_path / "rt", progress=False)
    rt = read_all(tmp_path / "rt")
    assert torch.equal(rt["lm_head.weight"], source["lm_head.weight"].to(torch.bfloat16).to(torch.float32))
    assert json.loads((tmp_path / "rt" / "config.json").read_text())["dtype"] == "float32"


def test_bf16_source_is_copied_bit_for_bit_and_upcast(models, tmp_path):
    src = models["llama_bf16"]
    run_merge(MergeConfig(slices=slices((0, 4), model=str(src)), dtype="float32"), tmp_path / "o", progress=False)
    merged, source = read_all(tmp_path / "o"), read_source(src)
    assert all(torch.equal(merged[n], source[n].float()) for n in source)


def test_scale_parameter(models, tmp_path):
    src = models["mistral"]
    cfg = MergeConfig(
        slices=[
            OutputSlice(sources=[InputSlice(model=str(src), layer_range=[0, 6])]),
            # duplicated layers damped: only the residual writers, by a gradient 0.5 -> 1.0 over the slice
            OutputSlice(sources=[InputSlice(model=str(src), layer_range=[2, 8], parameters={"scale": [
                {"filter": "o_proj", "value": [0.5, 1.0]}, {"filter": "down_proj", "value": 0.25}]})]),
        ],
        parameters={"scale": 2.0},  # global fallback: every other tensor, pre and post weights included
    )
    m = run_merge(cfg, tmp_path / "o", progress=False)
    merged, source = read_all(tmp_path / "o"), read_source(src)
    assert torch.equal(merged["model.embed_tokens.weight"], source["model.embed_tokens.weight"] * 2.0)
    assert torch.equal(merged["lm_head.weight"], source["lm_head.weight"] * 2.0)
    for i in range(6, 12):
        t = (i - 6) / 5
        src_layer = m["layer_map"][i][1]
        o = "model.layers.{}.self_attn.o_proj.weight"
        assert torch.equal(merged[o.format(i)], source[o.format(src_layer)] * ((1 - t) * 0.5 + t * 1.0))
        d = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(merged[d.format(i)], source[d.format(src_layer)] * 0.25)
        q = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(merged[q.format(i)], source[q.format(src_layer)] * 2.0)


def test_frankenmerge_of_two_models(models, tmp_path):
    a, b = models["mistral"], models["mistral_b"]
    cfg = MergeConfig(slices=slices((0, 5), model=str(a)) + slices((3, 8), model=str(b)))
    m = run_merge(cfg, tmp_path / "o", progress=False)
    assert m["num_layers_in"] == {str(a): 8, str(b): 8}
    merged, sa, sb = read_all(tmp_path / "o"), read_source(a), read_source(b)
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice's model
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])  # last slice's model
    assert torch.equal(merged["lm_head.weight"], sb["lm_head.weight"])
    assert torch.equal(merged["model.layers.4.mlp.up_proj.weight"], sa["model.layers.4.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.5.mlp.up_proj.weight"], sb["model.layers.3.mlp.up_proj.weight"])


def test_tokenizer_generation_config_and_mergekit_yaml_are_written(models, tmp_path):
    src = models["mistral"]
    cfg = MergeConfig(slices=slices((0, 6), (2, 8), model=str(src)), dtype="bfloat16")
    run_merge(cfg, tmp_path / "o", progress=False)
    out = tmp_path / "o"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "t5"}], tokenize=False).startswith("<s> user t5")
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert (out / "mergekit_config.yml").read_text() == to_mergekit_yaml(cfg)


def test_mergekit_yaml_config_file_roundtrip(models, tmp_path):
    src = models["mistral"]
    yml = tmp_path / "merge.yml"
    yml.write_text(f"""\
slices:
  - sources:
      - model: {src}
        layer_range: [0, 6]
  - sources:
      - model: {src}
        layer_range: [2, 8]
merge_method: passthrough
dtype: bfloat16
""")
    m = run_merge(MergeConfig(config_file=str(yml), slices=slices((0, 1), model="ignored")), tmp_path / "o",
                  progress=False)
    assert m["num_hidden_layers"] == 12
    assert (tmp_path / "o" / "mergekit_config.yml").read_text() == yml.read_text()  # verbatim, like mergekit
    # our own dataclass config exported to mergekit YAML reads back to the same merge
    cfg = MergeConfig(slices=slices((0, 6), (2, 8)), dtype="bfloat16")
    text = to_mergekit_yaml(cfg, base_model=str(src))
    assert "layer_range: [2, 8]" in text and f"model: {src}" in text
    (tmp_path / "again.yml").write_text(text)
    m2 = run_merge(MergeConfig(config_file=str(tmp_path / "again.yml")), tmp_path / "o2", progress=False)
    assert m2["layer_map"] == m["layer_map"]
    a, b = read_all(tmp_path / "o"), read_all(tmp_path / "o2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_none_means_base_model(models, tmp_path):
    m = run_merge(MergeConfig(slices=slices((0, 6), (2, 8))), tmp_path / "o", base_model=str(models["mistral"]),
                  progress=False)
    assert m["layer_map"][0] == [str(models["mistral"]), 0]


def test_small_out_shard_size_makes_several_shards(models, tmp_path):
    src = models["mistral"]
    # bytes of tensor data per shard, like mergekit: 150K ~ two float32 layers (one is ~80 KB)
    cfg = MergeConfig(slices=slices((0, 6), (2, 8), model=str(src)), out_shard_size="150K")
    m = run_merge(cfg, tmp_path / "o", progress=False)
    out = tmp_path / "o"
    shards = sorted(out.glob("model-*.safetensors"))
    assert m["num_shards"] == len(shards) > 3
    assert [s.name for s in shards][:2] == [f"model-00001-of-{len(shards):05d}.safetensors",
                                          f"model-00002-of-{len(shards):05d}.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            assert sum(4 * math.prod(f.get_slice(k).get_shape()) for k in keys) <= 150_000 or len(keys) == 1
            assert all(index["weight_map"][k] == shard.name for k in keys)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_all(out).values())
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_crash_mid_write_leaves_nothing(models, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = execute._write_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "_write_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(models["mistral"])), out_shard_size="40K"),
                  out, progress=False)
    assert calls["n"] == 21
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .out.partial left either


def test_overwrite_replaces_atomically(models, tmp_path):
    out = tmp_path / "o"
    cfg = MergeConfig(slices=slices((0, 8), model=str(models["mistral"])))
    run_merge(cfg, out, progress=False)
    (out / "stale.txt").write_text("old")
    run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(models["mistral"]))), out, progress=False,
              overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 12


def test_validate_merge_plans_without_writing(models, tmp_path):
    plan = validate_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(models["mistral"]))))
    assert len(plan.layer_map) == 12 and plan.bytes_to_read < plan.bytes_to_write
    assert plan.new_layers == []


def test_buffered_copy_mode_gives_the_same_bytes(models, tmp_path):
    cfg = MergeConfig(slices=slices((0, 6), (2, 8), model=str(models["mistral"])))
    a = run_merge(cfg, tmp_path / "a", progress=False, copy_mode="kernel")
    b = run_merge(cfg, tmp_path / "b", progress=False, copy_mode="buffered")
    assert b["copy_mode"] == "pread/pwrite"
    for shard in (tmp_path / "a").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    assert a["bytes_written"] == b["bytes_written"]


def test_gradients_on_pre_and_post_weights_are_read_at_t0(models, tmp_path):
    # mergekit plans embeddings with slice 0's parameters and the final norm/lm_head with the last
    # slice's, both at t = 0 (mergekit/plan.py plan_module)
    src = models["mistral"]
    run_merge(MergeConfig(slices=slices((0, 4), model=str(src), scale=[3.0, 5.0]) +
                          slices((4, 8), model=str(src), scale=[2.0, 4.0])), tmp_path / "o", progress=False)
    merged, source = read_all(tmp_path / "o"), read_source(src)
    assert torch.equal(merged["model.embed_tokens.weight"], source["model.embed_tokens.weight"] * 3.0)
    assert torch.equal(merged["model.norm.weight"], source["model.norm.weight"] * 2.0)
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], source["model.layers.3.mlp.up_proj.weight"] * 5.0)
    assert torch.equal(merged["model.layers.7.mlp.up_proj.weight"], source["model.layers.7.mlp.up_proj.weight"] * 4.0)


def test_plain_merge_imports_neither_torch_nor_transformers(models, tmp_path):
    # a same-dtype merge is pure byte copying: the multi-second torch/transformers import is avoided
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipeline.merge import MergeConfig, OutputSlice, InputSlice, run_merge\n"
        f"cfg = MergeConfig(slices=[OutputSlice(sources=[InputSlice(model={str(models['mistral'])!r}, layer_range=[0, 8])])])\n"
        f"run_merge(cfg, {str(tmp_path / 'o')!r}, progress=False)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_legacy_config_without_layer_types_is_derived_by_transformers(models, tmp_path):
    # hub Qwen2 configs predating layer_types: transformers derives it from max_window_layers
    src = tmp_path / "legacy"
    shutil.copytree(models["qwen2"], src)
    cfg = json.loads((src / "config.json").read_text())
    expected = cfg.pop("layer_types")
    (src / "config.json").write_text(json.dumps(cfg))
    run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(src))), tmp_path / "o", progress=False)
    out = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out["layer_types"] == [expected[i] for i in [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]]


def test_chunked_transforms_and_copies_match_whole_tensor_results(models, tmp_path, monkeypatch):
    # tiny chunks (not a multiple of 4 bytes) force every tensor through many chunk boundaries
    from pipeline.merge.safetensors_io import ByteCopier

    monkeypatch.setattr(execute, "COMPUTE_CHUNK", 4098)
    monkeypatch.setattr(execute, "ByteCopier", lambda mode: ByteCopier(mode, chunk=1002))
    src = models["mistral"]
    cfg = MergeConfig(slices=slices((0, 6), model=str(src)) + slices((2, 8), model=str(src), scale=0.5),
                      dtype="bfloat16")
    run_merge(cfg, tmp_path / "cast", progress=False)
    merged, source = read_all(tmp_path / "cast"), read_source(src)
    assert torch.equal(merged["model.layers.6.mlp.up_proj.weight"],
                       source["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16) * 0.5)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                       source["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16))
    run_merge(MergeConfig(slices=slices((0, 6), (2, 8), model=str(src))), tmp_path / "copy", progress=False,
              copy_mode="buffered")
    copied = read_all(tmp_path / "copy")
    assert all(torch.equal(copied[f"model.layers.{o}.{n}"], source[f"model.layers.{s}.{n}"])
               for o, s in [(0, 0), (7, 3), (11, 7)] for n in ("mlp.down_proj.weight", "self_attn.q_proj.weight"))

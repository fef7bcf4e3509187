"""Seam analysis (pipeline/analysis, python -m pipeline.analyze): metrics on models whose layers are
built to be identity blocks (so the expected values are known), candidate enumeration, Spearman's
rho, the CLI end to end on the tiny demo base, and the bad-input refusals (before any model load)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.analysis import (  # noqa: E402
    analyze_layers, candidate_seams, enumerate_seams, recommend_seam, score_candidates, select_for_scoring,
    solar_seam, spearman_rho,
)
from pipeline.analysis import recommend as recommend_module  # noqa: E402
from pipeline.analysis.similarity import load_model_for_analysis  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.merge import ARCHITECTURES, MergeConfig, validate_merge  # noqa: E402
from pipeline.merge.testing import make_tiny_model  # noqa: E402

from conftest import torch_threads  # noqa: E402

IDENTITY_LAYERS = (3, 4)  # of 6; the lossless 6 -> 8 seam is then [0, 5) + [3, 6), SOLAR's is [0, 4) + [2, 6)


def make_model_with_identity_layers(path: Path, arch: str = "LlamaForCausalLM", num_layers: int = 6,
                                    identity=IDENTITY_LAYERS) -> Path:
    """A tiny random model whose ``identity`` layers have zeroed attention and MLP output projections:
    they add nothing to the residual stream (LLaMA Pro's identity blocks)."""
    model = make_tiny_model(arch, path, num_hidden_layers=num_layers)
    from pipeline.merge import ARCHITECTURES

    zeroed = ARCHITECTURES[arch].block_expansion_zeroed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"layers.{l}.{z}" in name for l in identity for z in zeroed):
                p.zero_()
    model.save_pretrained(str(path))
    return path


def random_batches(vocab: int = 256, n_batches: int = 3, batch: int = 2, seq: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (batch, seq), generator=gen) for _ in range(n_batches)]


def write_word_corpus(path: Path, n_docs: int = 60, words: int = 40) -> Path:
    """Text in the tiny WordLevel tokenizer's vocabulary (t4 ... t255)."""
    rng = random.Random(0)
    path.write_text("".join(" ".join(f"t{rng.randrange(4, 256)}" for _ in range(words)) + "\n\n\n"
                            for _ in range(n_docs)))
    return path


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    return make_model_with_identity_layers(tmp_path_factory.mktemp("identity") / "model")


def reference_states(model, batches):
    """Independent oracle: the input of every layer and the input of the final norm, by hooks."""
    layers = model.model.layers
    captured = {i: [] for i in range(len(layers) + 1)}
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: captured[i].append(
        (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size).double()),
        with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(
        lambda m, args: captured[len(layers)].append(args[0].reshape(-1, model.config.hidden_size).double())))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(captured[i]) for i in range(len(layers) + 1)]


def test_identity_layers_have_zero_block_influence_and_distance(identity_model):
    batches = random_batches(batch=4, seq=96)  # 384 tokens a batch: accumulated in chunks of 256
    with torch_threads(1):
        model = load_model_for_analysis(identity_model, device="cpu")
        sim = analyze_layers(model=model, token_batches=batches, progress=False)
        states = reference_states(model, batches)
    assert sim.num_layers == 6 and sim.num_tokens == 3 * 4 * 96
    for layer in IDENTITY_LAYERS:
        assert sim.block_influence[layer] == pytest.approx(0.0, abs=1e-9)
    # h_3 = h_4 = h_5 exactly: every distance among them is 0.
    assert sim.distance(3, 1) == pytest.approx(0.0, abs=1e-7)
    assert sim.distance(3, 2) == pytest.approx(0.0, abs=1e-7)
    assert sim.distance(4, 1) == pytest.approx(0.0, abs=1e-7)
    for layer in (0, 1, 2, 5):  # random layers do change the stream
        assert sim.block_influence[layer] > 1e-3
    # Streaming over batches equals the mean over all tokens at once (an oracle built from hooks),
    # and the last state is the raw output of the last layer, not the normed one.
    unit = [s / s.norm(dim=-1, keepdim=True) for s in states]
    for i in range(7):
        for j in range(7):
            cos = (unit[i] * unit[j]).sum(-1).clamp(-1, 1)
            expected = 0.0 if i == j else float((torch.arccos(cos) / math.pi).mean())
            assert sim.angular_distance[i][j] == pytest.approx(expected, abs=1e-6), (i, j)
    for layer in range(6):
        cos = (unit[layer] * unit[layer + 1]).sum(-1)
        assert sim.block_influence[layer] == pytest.approx(float(1 - cos.mean()), abs=1e-6)
    # The base perplexity is the model's own loss on these tokens.
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss for b in batches]
    assert sim.perplexity == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - {"LlamaForCausalLM"}))
def test_identity_layers_found_in_other_architectures(tmp_path, arch):
    model_dir = make_model_with_identity_layers(tmp_path / "m", arch=arch, num_layers=4, identity=(1,))
    with torch_threads(1):
        sim = analyze_layers(model_dir, random_batches(n_batches=1), device="cpu", progress=False)
    # Post-block norms (Gemma2/3 sandwich, OLMo2/3) of a zero block output are still zero.
    assert sim.block_influence[1] == pytest.approx(0.0, abs=1e-9)
    assert sim.distance(1, 1) == pytest.approx(0.0, abs=1e-7)
    assert min(sim.block_influence[i] for i in (0, 2, 3)) > 1e-4


def test_candidate_enumeration_and_solar_seam():
    assert enumerate_seams(8, 12) == [(4, 0), (5, 1), (6, 2), (7, 3), (8, 4)]
    assert solar_seam(8, 12) == (6, 2)  # conf/merge/demo.yaml
    assert solar_seam(32, 48) == (24, 8)  # SOLAR 10.7B
    assert solar_seam(30, 44) == (22, 8)  # SmolLM2 in STACK-NOTES
    assert solar_seam(5, 7) == (4, 2)  # odd target: [0, 4) + [2, 5) = 7 layers
    assert enumerate_seams(4, 8) == [(4, 0)]  # 2N: the whole model twice
    for n, target in [(8, 12), (30, 44), (5, 7), (6, 7)]:
        seams = enumerate_seams(n, target)
        assert len(seams) == 2 * n - target + 1
        assert all(0 <= b < a <= n and a + n - b == target for a, b in seams)
        assert solar_seam(n, target) in seams
    with pytest.raises(ConfigError, match="not deeper"):
        enumerate_seams(8, 8)
    with pytest.raises(ConfigError, match="more than twice"):
        enumerate_seams(8, 17)


def test_identity_seam_is_predicted_best_and_measured_lossless(identity_model, tmp_path):
    batches = random_batches()
    with torch_threads(1):
        sim = analyze_layers(identity_model, batches, device="cpu", progress=False)
        cands = candidate_seams(sim, 8)
        assert [c.slices for c in cands][0] == [(0, 5), (3, 6)]
        assert cands[0].predicted_damage == pytest.approx(0.0, abs=1e-7)
        assert [c.predicted_rank for c in cands] == list(range(1, len(cands) + 1))
        assert sorted(c.predicted_damage for c in cands) == [c.predicted_damage for c in cands]
        solar = [c for c in cands if c.is_solar]
        assert len(solar) == 1 and solar[0].slices == [(0, 4), (2, 6)]
        chosen = select_for_scoring(cands, 1)
        assert [c.slices for c in chosen] == [[(0, 5), (3, 6)], [(0, 4), (2, 6)]]  # top 1 + SOLAR
        score_candidates(identity_model, chosen, batches, work_dir=tmp_path, device="cpu", progress=False)
    # Duplicating identity layers changes nothing: the merged model's perplexity is the source's.
    assert chosen[0].measured_perplexity == pytest.approx(sim.perplexity, rel=1e-5)
    # (a random model is near-uniform, so the loss differs little, but well above float noise)
    assert chosen[1].measured_perplexity > sim.perplexity * (1 + 1e-5)
    assert [c.measured_rank for c in chosen] == [1, 2]
    assert list(tmp_path.iterdir()) == []  # merges are removed after scoring


def test_spearman_rho():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman_rho([1, 2], [1, 2]) is None
    assert spearman_rho([1, 1, 1], [1, 2, 3]) is None
    # With ties (average ranks): x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4] -> rho = 4.5 / sqrt(4.5 * 5)
    assert spearman_rho([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    x, y = [rng.random() for _ in range(20)], [rng.randrange(5) for _ in range(20)]
    assert spearman_rho(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_recommend_seam_writes_report_and_usable_merge_yaml(identity_model, tmp_path):
    data = write_word_corpus(tmp_path / "words.txt")
    with torch_threads(1):
        report = recommend_seam(identity_model, target_layers=8, top_k=2, data_files=[str(data)], num_tokens=600,
                                seq_len=64, heldout_fraction=None, out_dir=tmp_path / "report", device="cpu",
                                progress=False)
    assert report.num_tokens == 600 and report.source_layers == 6
    lossless = report.candidates[0]
    assert lossless.slices == [(0, 5), (3, 6)] and lossless.measured_perplexity == pytest.approx(report.base_perplexity, rel=1e-5)
    # An untrained model is near-uniform: another seam may score a hair better by chance, so only
    # the rule is checked here (the lowest measured perplexity wins); the trained case is below.
    assert report.recommended.measured_perplexity == min(c.measured_perplexity for c in report.scored)
    assert report.solar.slices == [(0, 4), (2, 6)] and report.solar.measured_rank is not None
    assert len(report.scored) == 2 + (report.solar.predicted_rank > 2)  # top 2, plus SOLAR's if not among them
    paths = {k: Path(v) for k, v in report.paths.items()}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["heatmap_png"].read_bytes()[:4] == b"\x89PNG"
    data_json = json.loads(paths["report_json"].read_text())
    assert data_json["recommended_slices"] == [list(s) for s in report.slices]
    assert len(data_json["candidates"]) == 5 and len(data_json["angular_distance"]) == 7
    # The YAML is a mergekit config the merge stage reads as is (merge=from_file).
    plan = validate_merge(MergeConfig(config_file=str(paths["merge_yaml"])))
    assert len(plan.layer_map) == 8
    (_, a), (b, n) = report.slices
    assert [ls.layer for ls in plan.layer_map] == list(range(a)) + list(range(b, n))
    assert f"[0, {a}) + [{b}, 6)" in paths["report_md"].read_text()
    assert not list(tmp_path.glob(".report*"))  # no partial dir left
    # 2-3 seams the prediction picked: no rank correlation is given, and the report says why, with n.
    n = len(report.scored)
    assert report.spearman_rho is None and data_json["spearman_rho"] is None and data_json["spearman_n"] == n
    assert f"Spearman's rho: not given (n = {n} scored seams, below 6" in paths["report_md"].read_text()
    assert data_json["split"] == {"name": "all records"}


def test_spearman_rho_is_given_with_its_n_from_six_scored_seams(identity_model, tmp_path):
    """6 layers -> 7: 2N - L + 1 = 6 candidate seams, all scored: rho is given, labelled n = 6, all seams."""
    data = write_word_corpus(tmp_path / "words.txt")
    with torch_threads(1):
        report = recommend_seam(identity_model, target_layers=7, top_k=6, data_files=[str(data)], num_tokens=256,
                                seq_len=64, heldout_fraction=None, out_dir=tmp_path / "report", device="cpu",
                                progress=False)
    assert len(report.scored) == len(report.candidates) == 6
    expected = spearman_rho([c.predicted_damage for c in report.scored], [c.measured_perplexity for c in report.scored])
    assert report.spearman_rho == pytest.approx(expected)
    md = Path(report.paths["report_md"]).read_text()
    assert f"{report.spearman_rho:.3f} (n = 6: all candidate seams)" in md
    assert json.loads(Path(report.paths["report_json"]).read_text())["spearman_over"] == "all candidate seams"


def test_cli_end_to_end_on_demo_base(tiny_base_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.analyze", str(tiny_base_model_dir), "--target-layers", "6",
         "--data", str(tiny_data_dir / "corpus.txt"), "--tokens", "512", "--seq-len", "64", "--top-k", "1",
         "--out", str(out), "--model-ref", "demo-base", "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    report = json.loads((out / "seam_report.json").read_text())
    assert report["source_layers"] == 4 and report["target_layers"] == 6 and report["num_tokens"] == 512
    assert len(report["candidates"]) == 3
    scored = [c for c in report["candidates"] if c["measured_perplexity"] is not None]
    assert any(c["is_solar"] for c in scored) and 1 <= len(scored) <= 2
    best = min(scored, key=lambda c: c["measured_perplexity"])
    assert summary["recommended_slices"] == best["slices"] == report["recommended_slices"]
    assert summary["solar_slices"] == [[0, 3], [1, 4]]
    # Scored on the selection split (after the held-out 5% by content hash), never on eval's held-out records.
    assert report["split"] == {"name": "selection", "heldout_fraction": 0.05, "selection_fraction": 0.05}
    assert "tokens of the selection split (records at content-hash position [0.05, 0.1)" in (out / "seam_report.md").read_text()
    # Not a broken merge (on this undertrained 4-layer model a duplicated layer can even help a little).
    assert best["measured_perplexity"] < 2 * report["base_perplexity"]
    yaml_text = (out / "recommended_merge.yml").read_text()
    assert 'model: "demo-base"' in yaml_text
    # --model-ref is a name, not a directory; with the model reference pointing at the directory, the YAML validates as a 6-layer merge.
    local_yaml = tmp_path / "local.yml"
    local_yaml.write_text(yaml_text.replace('"demo-base"', json.dumps(str(tiny_base_model_dir))))
    assert len(validate_merge(MergeConfig(config_file=str(local_yaml))).layer_map) == 6


# ---------------------------------------------------------------------------------------------
# Bad input: a ConfigError naming the field, before any model is loaded.


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(recommend_module, "load_model_for_analysis", refuse)


def test_bad_target_depth(identity_model, tmp_path, no_model_load):
    data = write_word_corpus(tmp_path / "words.txt")
    for target, match in [(6, "not deeper than the source model \\(6 layers\\)"), (4, "not deeper"),
                          (13, "more than twice")]:
        with pytest.raises(ConfigError, match=match) as e:
            recommend_seam(identity_model, target_layers=target, data_files=[str(data)], heldout_fraction=None)
        assert e.value.where == "target_layers"


def test_more_tokens_than_the_data_has(identity_model, tmp_path, no_model_load):
    data = write_word_corpus(tmp_path / "words.txt", n_docs=5, words=20)  # 5 * (20 + 2) = 110 tokens
    with pytest.raises(ConfigError, match="asked for 5000 tokens .* hold only 110") as e:
        recommend_seam(identity_model, target_layers=8, data_files=[str(data)], num_tokens=5000, heldout_fraction=None)
    assert e.value.where == "--tokens"


def test_data_without_text_column(identity_model, tmp_path, no_model_load):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"content": "t5 t6 t7"}\n')
    with pytest.raises(ConfigError, match=r"--text-column: 'text' is not a column of .*rows.jsonl"):
        recommend_seam(identity_model, target_layers=8, data_files=[str(data)], heldout_fraction=None)
    with pytest.raises(ConfigError, match="does not exist"):
        recommend_seam(identity_model, target_layers=8, data_files=[str(tmp_path / "missing.txt")])


def test_model_the_merge_refuses(identity_model, tmp_path, no_model_load):
    data = write_word_corpus(tmp_path / "words.txt")
    unknown = tmp_path / "gpt2ish"
    shutil.copytree(identity_model, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        recommend_seam(unknown, target_layers=8, data_files=[str(data)], heldout_fraction=None)
    pickled = tmp_path / "pickled"
    shutil.copytree(identity_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="(?i)pickle|\\.bin"):
        recommend_seam(pickled, target_layers=8, data_files=[str(data)], heldout_fraction=None)
    with pytest.raises(ConfigError, match="does not exist"):
        recommend_seam(tmp_path / "nowhere", target_layers=8, data_files=[str(data)])


def test_bad_top_k(identity_model, tmp_path, no_model_load):
    data = write_word_corpus(tmp_path / "words.txt")
    with pytest.raises(ConfigError, match="positive integer"):
        recommend_seam(identity_model, target_layers=8, top_k=0, data_files=[str(data)], heldout_fraction=None)


def test_cli_bad_input_exits_2_with_one_line(identity_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.analyze", str(identity_model), "--target-layers", "5"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: target_layers: 5 is not deeper")


def test_cli_refuses_an_empty_selection_split(identity_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.analyze", str(identity_model), "--target-layers", "8",
                           "--selection-fraction", "0"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --selection-fraction: 0.0")

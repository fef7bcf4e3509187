"""The release step: model card from the manifests, the release directory, the report CLI, the push.

The run directory is built by hand (no training): a tiny random Mistral with a model card as the
base, a real passthrough merge of it (4 -> 6 layers), cpt and sft directories holding copies of the
merged model with manifests like the real ones, and an eval directory written by ``write_results``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from pipeline.config import CPTConfig, DataConfig, REPO_ROOT, SFTConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.results import write_results
from pipeline.fsutil import atomic_write_json, atomic_write_text
from pipeline.manifest import StageInput, new_manifest, read_manifest, stage_dir
from pipeline.manifest import write_manifest as _write_manifest


def write_manifest(out_dir, *, inputs, **fields):
    """A manifest as a stage writes one (inputs given as their JSON dicts)."""
    return _write_manifest(out_dir, new_manifest(inputs=[StageInput.from_dict(i) for i in inputs], **fields))
from pipeline.merge import InputSlice, MergeConfig, OutputSlice, run_merge
from pipeline.merge.testing import make_tiny_model
from pipeline.release.card import build_model_card
from pipeline.release.package import build_release
from pipeline.release.record import load_run
from pipeline.release.push import push_release

BASE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\n---\n\n# tiny base\n"
RESULTS = {
    "base": {"heldout/loss": 3.77, "heldout/perplexity": 43.4838, "dus_mc/acc": 0.4, "dus_mc/acc_stderr": 0.0245},
    "merge": {"heldout/loss": 3.92, "heldout/perplexity": 50.4558, "dus_mc/acc": 0.3975, "dus_mc/acc_stderr": 0.0245},
    "cpt": {"heldout/loss": 3.70, "heldout/perplexity": 40.8157, "sft_heldout/loss": 5.1696,
            "dus_mc/acc": 0.4, "dus_mc/acc_stderr": 0.0245},
    "sft": {"heldout/loss": 4.29, "heldout/perplexity": 73.2460, "sft_heldout/loss": 4.5321,
            "dus_mc/acc": 0.41, "dus_mc/acc_stderr": 0.0246},
}
CHANCE = {"dus_mc/acc": 0.4172}


def _model_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json", "mergekit_config.yml", "logs", "*.bin"))


def _training_stage(run: Path, stage: str, prev: str, prev_key: str, cfg, data_file: Path, started: float) -> str:
    d = stage_dir(run, stage)
    _model_copy(stage_dir(run, prev), d)
    (d / "logs").mkdir()
    (d / "logs" / "log_history.json").write_text(json.dumps([{"step": 10, "loss": 4.0}]))
    (d / "training_args.bin").write_bytes(b"\x80\x04pickle")  # what Trainer leaves: must never be released
    key = f"key-{stage}"
    write_manifest(
        d, stage=stage, key=key, started_at=started,
        inputs=[{"role": "model", "stage": prev, "path": str(stage_dir(run, prev)), "sha256": prev_key},
                {"role": "data", "path": str(data_file), "sha256": "ab" * 32}],
        config={stage: asdict(cfg), "data": asdict(DataConfig(cpt_files=[str(data_file)], sft_files=[str(data_file)])),
                "distributed": {"zero_stage": 3, "num_processes": 2, "num_machines": 1}},
        metrics={"train_runtime": 163.1, "train_loss": 3.8363, "epoch": 0.62, "global_step": 150, "world_size": 2,
                 "num_parameters": 123456, "trainable_parameters": 4096 if stage == "sft" else 123456,
                 "tokens_seen": 614400, "precision": "bf16", "attn_implementation": "sdpa", "zero_stage": 3,
                 "resumed_from": None, "num_input_tokens_seen": 151368,
                 "verification": {"trained_fixed_batch_loss": 3.8775, "reloaded_fixed_batch_loss": 3.8776,
                                  "abs_diff": 1e-4, "rtol": 0.02}},
    )
    return key


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    base = root / "tiny-base"
    make_tiny_model("MistralForCausalLM", base)
    (base / "README.md").write_text(BASE_CARD)
    data_file = root / "corpus.txt"
    data_file.write_text("some text\n")
    run = root / "run"
    started = time.time()

    d = stage_dir(run, "base")
    d.mkdir(parents=True)
    write_manifest(d, stage="base", key="key-base", started_at=started, model_dir=str(base),
                   inputs=[{"role": "model", "path": str(base), "sha256": "cd" * 32}],
                   config={"model": {"name_or_path": str(base), "demo": None}}, metrics={})

    merge_cfg = MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(base), layer_range=[0, 3])]),
                                    OutputSlice(sources=[InputSlice(model=str(base), layer_range=[1, 4])])])
    metrics = run_merge(merge_cfg, stage_dir(run, "merge"), progress=False)
    write_manifest(stage_dir(run, "merge"), stage="merge", key="key-merge", started_at=started,
                   inputs=[{"role": "base", "stage": "base", "path": str(base), "sha256": "key-base"}],
                   config={"merge": asdict(merge_cfg)}, metrics=metrics)

    cpt_key = _training_stage(run, "cpt", "merge", "key-merge", CPTConfig(seq_len=256), data_file, started)
    sft_key = _training_stage(run, "sft", "cpt", cpt_key, SFTConfig(use_lora=True), data_file, started)

    d = stage_dir(run, "eval")
    d.mkdir()
    write_results(RESULTS, d, chance=CHANCE)
    for name in ("training.png", "tasks.png"):
        (d / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    keys = {"base": "key-base", "merge": "key-merge", "cpt": cpt_key, "sft": sft_key}
    write_manifest(d, stage="eval", key="key-eval", started_at=started, model_dir=None, config={}, metrics=RESULTS,
                   inputs=[{"role": "model", "stage": s, "path": "x", "sha256": k} for s, k in keys.items()])
    return run


@pytest.fixture(scope="module")
def release(run_dir) -> Path:
    return build_release(run_dir)


def _yaml_block(card: str) -> str:
    m = re.search(r"```yaml\n(.*?)\n```", card, re.S)
    assert m, "no yaml block in the card"
    return m.group(1)


def _clone(run_dir: Path, dst: Path) -> Path:
    """A copy of the run to modify (hard links: every write below replaces files, never edits them)."""
    shutil.copytree(run_dir, dst, copy_function=os.link, ignore=shutil.ignore_patterns("release"))
    return dst


# --------------------------------------------------------------------------------------- card


def test_card_front_matter_parses_with_tags_and_carried_license(run_dir, release):
    from huggingface_hub import ModelCard

    card = build_model_card(run_dir)
    data = ModelCard(card).data.to_dict()
    assert data["license"] == "apache-2.0"  # from the base model's README.md front matter
    assert data["language"] == ["en", "fr"]
    assert data["base_model"] == ["tiny-base"]  # a local directory: its name
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"mergekit", "merge", "depth-upscaling", "sft", "lora"} <= set(data["tags"])
    assert "arxiv.org/abs/2312.15166" in card
    assert ModelCard.load(release / "README.md").data.to_dict() == data
    assert (release / "README.md").read_text() == card


def test_card_merge_yaml_is_the_merge_config_with_local_paths_named(run_dir, release):
    card = build_model_card(run_dir)
    used = (stage_dir(run_dir, "merge") / "mergekit_config.yml").read_text()
    base_dir = str(run_dir.parent / "tiny-base")
    assert base_dir in used  # the run's own record keeps the real path ...
    published = used.replace(base_dir, "tiny-base")  # ... what is published names the directory
    assert _yaml_block(card) == published.rstrip("\n")
    assert (release / "mergekit_config.yml").read_text() == published
    for text in (card, (release / "mergekit_config.yml").read_text()):
        assert str(run_dir.parent) not in text and "/tmp" not in text
    assert [s["sources"][0]["layer_range"] for s in yaml.safe_load(_yaml_block(card))["slices"]] == [[0, 3], [1, 4]]
    assert "## Merge Details" in card and "passthrough merge method" in card
    assert "| 0–2 | tiny-base | 0–2 |" in card and "| 3–5 | tiny-base | 1–3 |" in card  # the layer map
    assert "4 → **6**" in card


def test_card_training_details_from_manifests(run_dir):
    card = build_model_card(run_dir)
    for text in ("### Continued pretraining (cpt)", "### Supervised fine-tuning (sft)", "`corpus.txt`",
                 "614,400", "DeepSpeed ZeRO-3", "bf16", "2 processes", "LoRA (r 16", "4,096 of 123,456"):
        assert text in card, text


def test_card_eval_table_has_the_real_numbers(run_dir):
    card = build_model_card(run_dir)
    results = json.loads((stage_dir(run_dir, "eval") / "results.json").read_text())
    for stage, metrics in results["stages"].items():
        assert f"{metrics['heldout/perplexity']:.2f}" in card
    table = [ln for ln in (stage_dir(run_dir, "eval") / "results.md").read_text().splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(RESULTS)
    for line in table:  # the table of 05_eval/results.md, row for row
        assert line in card.splitlines()
    assert "![" in card and "(training.png)" in card and "(tasks.png)" in card


def test_the_leaderboard_table_reaches_the_card_and_the_released_results(run_dir, tmp_path):
    """An eval=leaderboard run: the seed's table goes into the model card and into the release's
    results.json/.md, the same as in the eval stage's (the release used to drop the board's info)."""
    run = _clone(run_dir, tmp_path / "run")
    eval_dir = stage_dir(run, "eval")
    board = {s: {**m, "arc_challenge/acc_norm": 0.4, "arc_challenge/acc_norm_stderr": 0.2} for s, m in RESULTS.items()}
    info = {"tasks": {"arc_challenge": {"shots": 25, "scored": 5, "split_docs": 1172, "contaminated": 0}}, "limit": 5}
    for name in ("results.json", "results.md"):
        (eval_dir / name).unlink()  # hard links into the module's run: replace, never edit
    write_results(board, eval_dir, chance=CHANCE, leaderboard=info)
    out = build_release(run)
    card = (out / "README.md").read_text()
    assert "### Open LLM Leaderboard v1 (offline)" in card
    assert "| docs scored |  | 5 of 1,172 |" in card and "0.400 ± 0.200" in card
    released = json.loads((out / "results.json").read_text())
    assert released["leaderboard"] == info
    assert (out / "results.md").read_text() == (eval_dir / "results.md").read_text()


# ------------------------------------------------------------------------------------ release


def test_release_dir_loads_and_holds_no_bookkeeping_or_pickles(run_dir, release):
    from transformers import AutoModelForCausalLM

    files = {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()}
    assert {"README.md", "mergekit_config.yml", "results.json", "results.md", "training.png", "tasks.png",
            "config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files), files
    assert "manifest.json" not in files and not any(f.startswith("logs") for f in files)
    assert yaml.safe_load((release / "mergekit_config.yml").read_text())["slices"] == [
        {"sources": [{"model": "tiny-base", "layer_range": [0, 3]}]}, {"sources": [{"model": "tiny-base", "layer_range": [1, 4]}]}]
    assert json.loads((release / "results.json").read_text())["stages"] == json.loads(
        (stage_dir(run_dir, "eval") / "results.json").read_text())["stages"]
    weights = sorted(p.name for p in release.glob("*.safetensors"))
    assert weights and all(os.path.samefile(release / w, stage_dir(run_dir, "sft") / w) for w in weights)  # hard links
    model = AutoModelForCausalLM.from_pretrained(release)
    assert model.config.num_hidden_layers == 6


def test_release_only_merge_and_bad_out_dir(run_dir, tmp_path):
    run = _clone(run_dir, tmp_path / "run")
    for s in ("cpt", "sft", "eval"):
        shutil.rmtree(stage_dir(run, s))
    card = build_model_card(run)
    assert "not trained further" in card and "has no evaluation" in card and "sft" not in yaml.safe_load(
        card.split("---\n")[1])["tags"]
    out = build_release(run, tmp_path / "merge_release")
    assert (out / "config.json").is_file() and not (out / "manifest.json").exists()
    with pytest.raises(ConfigError, match="stage directory"):
        build_release(run, stage_dir(run, "merge"))


def test_stale_stage_is_refused(run_dir, tmp_path):
    run = _clone(run_dir, tmp_path / "run")
    m = read_manifest(stage_dir(run, "cpt")).to_dict()
    atomic_write_json(stage_dir(run, "cpt") / "manifest.json", {**m, "key": "cpt-re-run"})
    with pytest.raises(ConfigError) as e:
        load_run(run)
    assert "03_sft" in str(e.value) and "re-run" in str(e.value)


def test_license_from_run_config_and_none_without_base_card(run_dir, tmp_path):
    run = _clone(run_dir, tmp_path / "run")
    atomic_write_text(run / "config.yaml", "release:\n  license: mit\n  repo_id: me/tiny-dus\n")
    card = build_model_card(run)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "mit" and meta["language"] == ["en", "fr"]
    assert "# tiny-dus" in card.splitlines()  # the title: the repo's name
    assert 'model_id = "me/tiny-dus"' in card

    nocard = tmp_path / "nocard_base"
    nocard.mkdir()
    base = read_manifest(stage_dir(run, "base")).to_dict()
    atomic_write_json(stage_dir(run, "base") / "manifest.json", {**base, "model_dir": str(nocard)})
    (run / "config.yaml").unlink()
    card = build_model_card(run)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "license" not in meta and "language" not in meta
    assert "none stated" in card and "release.license" in card


# ------------------------------------------------------------------------------------- report


def test_report_cli_regenerates_card_and_results(run_dir, tmp_path):
    run = _clone(run_dir, tmp_path / "run")
    out = build_release(run)
    before = {n: (out / n).read_bytes() for n in ("README.md", "results.md", "results.json", "mergekit_config.yml")}
    for n in before:
        (out / n).unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(run)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    for n, content in before.items():
        assert (out / n).read_bytes() == content, n
    assert (out / "results.md").read_text() == (stage_dir(run, "eval") / "results.md").read_text()

    bad = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path / "nope")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr


# --------------------------------------------------------------------------------------- push


def test_dry_run_push_lists_files_without_a_token(release, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    files = push_release(release, repo_id="me/tiny-dus", private=True, dry_run=True)
    assert {"README.md", "config.json", "mergekit_config.yml"} <= set(files)
    assert any(f.endswith(".safetensors") for f in files) and "manifest.json" not in files
    out = capsys.readouterr().out
    assert "me/tiny-dus" in out and "README.md" in out and re.search(r"\d+(\.\d)? (B|kB|MB)", out)


def test_push_errors(run_dir, release, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_used")
    with pytest.raises(ConfigError) as e:
        push_release(release, repo_id=None, private=True, dry_run=True)
    assert e.value.where == "release.repo_id"
    with pytest.raises(ConfigError) as e:  # conftest sets HF_HUB_OFFLINE=1
        push_release(release, repo_id="me/tiny-dus", private=True, dry_run=False)
    assert "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ConfigError, match="must not"):
        push_release(stage_dir(run_dir, "sft"), repo_id="me/tiny-dus", private=True, dry_run=True)
    with pytest.raises(ConfigError) as e:
        push_release(release, repo_id="me/tiny-dus", private=True, dry_run=True, token_env="hf_pasted_token")
    assert e.value.where == "release.token_env" and "hf_pasted_token" not in str(e.value)


def test_push_passes_the_env_token_to_the_client_only(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    import pipeline.hub
    from pipeline.report import main as report_main

    secret = "hf_TESTSECRET_8c1f0a9d2b7e"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(pipeline.hub, "hub_offline", lambda: False)
    run = _clone(run_dir, tmp_path / "run")
    out = build_release(run)
    assert report_main([str(run)]) == 0
    push_release(out, repo_id="me/tiny-dus", private=True, dry_run=True)
    files = push_release(out, repo_id="me/tiny-dus", private=True, dry_run=False)
    assert calls[0] == ("init", secret)
    assert calls[1][0] == "create_repo" and calls[1][2]["private"] is True and calls[1][2]["exist_ok"] is True
    assert calls[2][1]["folder_path"] == str(out) and calls[2][1]["repo_id"] == "me/tiny-dus"
    assert "README.md" in files
    for p in [*run.rglob("*"), *tmp_path.rglob("*")]:
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError) as e:
        push_release(out, repo_id="me/tiny-dus", private=True, dry_run=False)
    assert e.value.where == "HF_TOKEN"


# ----------------------------------------------------------------------------- the quant ladder


def _add_quantize_stage(run: Path) -> dict:
    """A finished quantize stage made from the run's final (sft) model: two rung files and ladder.json
    (the figures are made up; the ladder itself is tested in tests/test_quantize.py)."""
    d = stage_dir(run, "quantize")
    d.mkdir()
    sft_key = read_manifest(stage_dir(run, "sft")).key
    rungs = []
    for label, mb, kld in (("Q4_K_M", 2.1, 0.06), ("Q8_0", 3.5, 0.005)):
        name = f"tiny-{label}.gguf"
        (d / name).write_bytes(b"GGUF" + bytes(int(mb * 1000)))
        rungs.append({"label": label, "type": label, "imatrix": False, "file": name, "file_mb": mb, "bpw": 4.9 if mb < 3 else 8.5,
                      "score": {"perplexity": 50.0 + 100 * kld, "mean_kld": kld, "top1_agreement": 1 - kld}})
    ladder = {"model_name": "tiny", "complete": True, "rungs": rungs,
              "reference": {"type": "F32", "file": "tiny-F32.gguf", "file_mb": 13.0, "bpw": 32.0,
                            "score": {"perplexity": 50.0, "positions": 1024}}}
    (d / "ladder.json").write_text(json.dumps(ladder))
    (d / "ladder.png").write_bytes(b"\x89PNG\r\n\x1a\nladder")
    write_manifest(d, stage="quantize", key="key-quantize", started_at=time.time(), model_dir=None, config={},
                   metrics={}, inputs=[{"role": "model", "stage": "sft", "path": "x", "sha256": sft_key}])
    return ladder


def test_quant_ladder_goes_into_the_card_and_its_own_gguf_release(run_dir, tmp_path, monkeypatch, capsys):
    from pipeline.release.push import run_release

    run = _clone(run_dir, tmp_path / "run")
    _add_quantize_stage(run)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = run_release(run_dir=run, push_to_hub=True, repo_id="me/tiny-dus", private=True, dry_run=True,
                      token_env="HF_TOKEN")
    card = (out / "README.md").read_text()
    assert "## Quantized versions (GGUF)" in card and "me/tiny-dus-GGUF" in card
    assert "| `tiny-Q4_K_M.gguf` | Q4_K_M | 2.1 |" in card and (out / "ladder.png").is_file()
    assert not list(out.glob("*.gguf"))  # the model repo holds the safetensors model only
    gguf = run / "release-gguf"
    assert sorted(p.name for p in gguf.glob("*.gguf")) == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    gcard = (gguf / "README.md").read_text()
    assert "base_model: me/tiny-dus" in gcard and "gguf" in gcard and "llama-cli -m" in gcard
    printed = capsys.readouterr().out
    assert "me/tiny-dus-GGUF" in printed and "tiny-Q8_0.gguf" in printed  # the dry run lists both repos


def test_a_ladder_of_an_older_model_is_not_published(run_dir, tmp_path):
    run = _clone(run_dir, tmp_path / "run")
    _add_quantize_stage(run)
    m = read_manifest(stage_dir(run, "quantize")).to_dict()
    m["inputs"][0]["sha256"] = "another-sft"
    atomic_write_json(stage_dir(run, "quantize") / "manifest.json", m)
    out = build_release(run)
    assert "Quantized versions" not in (out / "README.md").read_text() and not (run / "release-gguf").exists()


def test_a_gguf_release_of_an_older_model_is_removed_and_never_pushed(run_dir, tmp_path, monkeypatch, capsys):
    """Issue 18 item 2: ladder, release (release-gguf/ written), then a stage re-run makes the ladder
    another model's: the next release removes release-gguf/ and pushes no <repo>-GGUF."""
    from pipeline.release.push import run_release

    run = _clone(run_dir, tmp_path / "run")
    _add_quantize_stage(run)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    kwargs = dict(push_to_hub=True, repo_id="me/tiny-dus", private=True, dry_run=True, token_env="HF_TOKEN")
    run_release(run_dir=run, **kwargs)
    assert (run / "release-gguf" / "tiny-Q8_0.gguf").is_file() and "me/tiny-dus-GGUF" in capsys.readouterr().out
    m = read_manifest(stage_dir(run, "quantize")).to_dict()
    m["inputs"][0]["sha256"] = "another-sft"  # sft re-run since the ladder was made
    atomic_write_json(stage_dir(run, "quantize") / "manifest.json", m)
    run_release(run_dir=run, **kwargs)
    printed = capsys.readouterr().out
    assert "me/tiny-dus-GGUF" not in printed and ".gguf" not in printed
    assert not (run / "release-gguf").exists()

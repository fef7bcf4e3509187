"""The whole pipeline through its real entry point (`python -m pipeline`), with tiny settings:
demo base built from scratch -> merge 8 -> 12 layers -> cpt and sft on 2 processes with DeepSpeed
ZeRO-3 over gloo -> eval. Then what a user does next: re-run (everything skipped), launch one
stage with `accelerate launch -m pipeline`, sweep."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.slow


def tiny_overrides(data_dir: Path, out: Path) -> list[str]:
    """Tiny settings for a run into ``out`` (its own cache dir, seeded with the demo base model)."""
    seed_demo_base(data_dir, out / "cache")
    return _tiny_overrides(data_dir, out)


def _tiny_overrides(data_dir: Path, out: Path) -> list[str]:
    return [
        f"paths.output_root={out}", f"paths.cache_dir={out}/cache", "run_name=tiny",
        f"data.cpt_files=[{data_dir}/corpus.txt]", f"data.sft_files=[{data_dir}/instructions.jsonl]",
        f"model.demo.corpus={data_dir}/corpus.txt", f"model.demo.tokenizer_files=[{data_dir}/instructions.jsonl]",
        "model.demo.vocab_size=512", "model.demo.hidden_size=64", "model.demo.intermediate_size=128",
        "model.demo.max_position_embeddings=256", "model.demo.seq_len=64", "model.demo.batch_size=8",
        "model.demo.train_steps=40",
        "cpt.seq_len=64", "cpt.per_device_train_batch_size=4", "cpt.max_steps=6", "cpt.save_steps=3",
        "cpt.logging_steps=2",
        "sft.max_length=128", "sft.per_device_train_batch_size=4", "sft.max_steps=4", "sft.save_steps=2",
        "sft.logging_steps=2",
        "eval.seq_len=64", "eval.use_harness=false",
    ]


_SEEDS: dict[Path, Path] = {}


def seed_demo_base(data_dir: Path, cache_dir: Path) -> None:
    """Hard-link the tiny demo base model into ``cache_dir``, built once per session by the real
    CLI (`stage=base`): each end-to-end run would otherwise spend ~45 s of CI pretraining the same
    model. The runs still go through the base stage, which finds it by its key like any cache hit."""
    from pipeline.fsutil import link_or_copy_tree

    if data_dir not in _SEEDS:
        seed = data_dir.parent / f"{data_dir.name}_demo_base_seed"
        if not (seed / "cache" / "demo_base").is_dir():
            run_cli([*_tiny_overrides(data_dir, seed), "stage=base"])
        _SEEDS[data_dir] = seed / "cache" / "demo_base"
    if not (cache_dir / "demo_base").exists():
        link_or_copy_tree(_SEEDS[data_dir], cache_dir / "demo_base")


# Secrets present in the environment of every run; no file a run writes may contain them.
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtestTOKEN0123456789", "WANDB_API_KEY": "wandbFAKEkey0123456789"}


def run_cli(args: list[str], *, launcher: list[str] | None = None, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **FAKE_SECRETS}
    cmd = (launcher or [sys.executable]) + ["-m", "pipeline", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("e2e")
    overrides = tiny_overrides(tiny_data_dir, out)
    proc = run_cli(overrides)
    return out / "tiny", overrides, proc


def manifest(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "manifest.json").read_text())


def test_every_stage_hands_off_through_manifests(demo_run):
    run_dir, _, proc = demo_run
    assert sorted(p.name for p in run_dir.iterdir() if p.name[:2].isdigit()) == [
        "00_base", "01_merge", "02_cpt", "03_sft", "05_eval"]
    assert not list(run_dir.glob(".*partial"))
    merge, cpt, sft = (manifest(run_dir, n) for n in ("01_merge", "02_cpt", "03_sft"))
    # Each stage's input is the previous stage's output, named by the previous manifest's key.
    assert cpt["inputs"][0]["stage"] == "merge" and cpt["inputs"][0]["sha256"] == merge["key"]
    assert sft["inputs"][0]["stage"] == "cpt" and sft["inputs"][0]["sha256"] == cpt["key"]
    for m in (merge, cpt, sft):
        assert m["versions"]["torch"] and m["wall_time_s"] > 0 and m["config"]
    assert "final model:" in proc.stdout and str(run_dir / "03_sft") in proc.stdout


def test_no_secret_reaches_any_file_or_log(demo_run):
    run_dir, _, proc = demo_run
    files = [p for p in run_dir.parent.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" for p in files)  # Hydra's own files are among those scanned
    for secret in FAKE_SECRETS.values():
        assert secret not in proc.stdout + proc.stderr
        for p in files:
            assert secret.encode() not in p.read_bytes(), p


def test_merged_model_has_the_new_depth(demo_run):
    from transformers import AutoConfig

    run_dir, _, _ = demo_run
    assert AutoConfig.from_pretrained(run_dir / "00_base" / ".." / manifest(run_dir, "00_base")["model_dir"]).num_hidden_layers == 8
    assert AutoConfig.from_pretrained(run_dir / "01_merge").num_hidden_layers == 12
    assert AutoConfig.from_pretrained(run_dir / "03_sft").num_hidden_layers == 12


@pytest.mark.parametrize("stage", ["02_cpt", "03_sft"])
def test_training_ran_on_two_distinct_ranks_with_sharded_data(demo_run, stage):
    run_dir, _, _ = demo_run
    records = [json.loads((run_dir / stage / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    assert records[0]["pid"] != records[1]["pid"]
    served = [set(r["served_indices"]) for r in records]
    assert served[0] and served[1] and not served[0] & served[1], "both ranks trained on the same examples"
    m = manifest(run_dir, stage)["metrics"]
    assert m["world_size"] == 2 and m["zero_stage"] == 3
    import csv

    rows = list(csv.DictReader(open(run_dir / stage / "logs" / "log_history.csv")))
    logged = [r for r in rows if r.get("loss")]
    assert logged and all(float(r["tokens_per_s_per_device"]) > 0 for r in logged)


@pytest.mark.parametrize("stage", ["02_cpt", "03_sft"])
def test_zero3_export_reloads_with_the_trained_loss(demo_run, stage):
    """The hand-off check happened (fresh process) and the directory loads with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.training.verify import fixed_batch_loss

    run_dir, _, _ = demo_run
    v = manifest(run_dir, stage)["metrics"]["verification"]
    assert v["abs_diff"] <= v["rtol"] * abs(v["trained_fixed_batch_loss"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / stage, dtype=torch.float32)
    batch = json.loads((run_dir / stage / "logs" / "fixed_batch.json").read_text())
    assert fixed_batch_loss(model, batch) == pytest.approx(v["trained_fixed_batch_loss"], rel=1e-4)
    assert not (run_dir / stage / "training_args.bin").exists()  # no pickles in the export
    assert model.config.use_cache is True


def test_eval_writes_table_and_plots(demo_run):
    run_dir, _, proc = demo_run
    results = json.loads((run_dir / "05_eval" / "results.json").read_text())
    assert set(results["stages"]) == {"base", "merge", "cpt", "sft"}
    for stage, metrics in results["stages"].items():
        assert metrics["heldout/perplexity"] > 1
    assert (run_dir / "05_eval" / "results.md").read_text().count("|") > 10
    for png in ("training.png", "tasks.png"):
        assert (run_dir / "05_eval" / png).stat().st_size > 5000
    assert "heldout" in proc.stdout  # the table is printed


def test_second_run_skips_every_stage(demo_run):
    run_dir, overrides, _ = demo_run
    before = {p: (run_dir / p / "manifest.json").stat().st_mtime_ns for p in ("01_merge", "02_cpt", "03_sft", "05_eval")}
    proc = run_cli(overrides)
    for stage in ("base", "merge", "cpt", "sft", "eval"):
        assert f"{stage}: up to date" in proc.stdout
    assert before == {p: (run_dir / p / "manifest.json").stat().st_mtime_ns for p in before}


def test_user_launched_accelerate_runs_one_stage_on_every_rank(demo_run, tmp_path):
    """`accelerate launch --config_file conf/accelerate/zero3_single_node.yaml -m pipeline stage=cpt`"""
    run_dir, overrides, _ = demo_run
    import shutil

    shutil.rmtree(run_dir / "02_cpt")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO_ROOT / "conf/accelerate/zero3_single_node.yaml"), "--num_processes", "2",
                "--main_process_port", "29533", "--mixed_precision", "no"]
    # LLaMA-Pro style: only the layers the merge added train (6..9 of [0,6)+[2,8)), under ZeRO-3.
    run_cli([*overrides, "stage=cpt", "cpt.max_steps=2", "cpt.trainable_from_merge=added"], launcher=launcher)
    records = [json.loads((run_dir / "02_cpt" / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    m = manifest(run_dir, "02_cpt")["metrics"]
    assert m["global_step"] == 2 and 0 < m["trainable_parameters"] < m["num_parameters"]
    from safetensors.torch import load_file

    merged = {k: v for f in (run_dir / "01_merge").glob("*.safetensors") for k, v in load_file(f).items()}
    trained = load_file(run_dir / "02_cpt" / "model.safetensors")
    frozen, added = "model.layers.0.mlp.down_proj.weight", "model.layers.7.mlp.down_proj.weight"
    assert (merged[frozen] == trained[frozen]).all() and not (merged[added] == trained[added]).all()


def test_multirun_runs_two_pipelines_and_reuses_the_merge(tmp_path, tiny_data_dir):
    """`python -m pipeline -m cpt.learning_rate=...`: two complete pipelines in separate run
    directories; the identical merge is computed once (training in-process to keep CI short: the
    2-process path is covered above)."""
    overrides = [o for o in tiny_overrides(tiny_data_dir, tmp_path) if not o.startswith("run_name")]
    # sft=lora here: the LoRA path end to end (adapter merged into the saved weights, verified).
    proc = run_cli(["-m", *overrides, "run_name=sweep", "distributed=inprocess", "cpt.max_steps=2",
                    "sft.max_steps=2", "sft=lora", "cpt.learning_rate=1e-3,2e-3"])
    jobs = [tmp_path / "sweep_multirun" / str(i) for i in (0, 1)]
    lrs = []
    for job in jobs:
        assert (job / "05_eval" / "results.json").is_file(), proc.stdout[-2000:]
        lrs.append(manifest(job, "02_cpt")["config"]["cpt"]["learning_rate"])
    assert sorted(lrs) == [1e-3, 2e-3]
    sft = manifest(jobs[0], "03_sft")
    assert sft["config"]["sft"]["use_lora"] and 0 < sft["metrics"]["trainable_parameters"] < sft["metrics"]["num_parameters"]
    assert not (jobs[0] / "03_sft" / "adapter").exists() and (jobs[0] / "03_sft" / "model.safetensors").is_file()
    v = sft["metrics"]["verification"]
    assert v["abs_diff"] <= v["rtol"] * abs(v["trained_fixed_batch_loss"])
    merges = [manifest(job, "01_merge")["metrics"] for job in jobs]
    assert merges[0]["reused_from_cache"] is None and merges[1]["reused_from_cache"]
    shards = [next((job / "01_merge").glob("*.safetensors")) for job in jobs]
    assert shards[0].stat().st_ino == shards[1].stat().st_ino  # one copy on disk, linked into both runs
    assert proc.stdout.count("reusing identical merge") == 1


def steps_reached(output: str, total: int) -> int:
    """The last training step a run's output reports, from tqdm bars (``| 3/60 [``) or the file
    progress lines a run writes when its output is not a terminal (``step 3/60 (5%)``)."""
    found = re.findall(rf"(?:\| *|step )(\d+)/{total}\b", output)
    return max((int(m) for m in found), default=0)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, tiny_data_dir):
    """What SLURM does before preemption: SIGTERM to the job. Both ranks save a checkpoint at the
    same step and stop; nothing is exported; the same command again resumes and finishes."""
    import re
    import signal
    import threading
    import time

    args = [*tiny_overrides(tiny_data_dir, tmp_path), "cpt.max_steps=60", "cpt.save_steps=1000",
            "sft.enabled=false", "eval.enabled=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if steps_reached("".join(seen), 60) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out = "".join(seen)
    assert proc.returncode != 0, out[-3000:]
    stopped = re.search(r"SIGTERM: checkpoint saved at step (\d+)", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    run_dir = tmp_path / "tiny"
    assert not (run_dir / "02_cpt").exists()
    checkpoints = list((run_dir / "checkpoints" / "cpt").glob(f"*/checkpoint-{step}"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()

    again = run_cli(args)
    assert f"resuming from {checkpoints[0]}" in again.stdout
    m = manifest(run_dir, "02_cpt")["metrics"]
    assert m["global_step"] == 60 and m["resumed_from"] == str(checkpoints[0])


def test_release_directory_has_a_model_card_and_loads(demo_run):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = demo_run
    release = run_dir / "release"
    card = ModelCard.load(release / "README.md")
    assert {"mergekit", "merge", "depth-upscaling"} <= set(card.data.to_dict()["tags"])
    results = json.loads((run_dir / "05_eval" / "results.json").read_text())
    assert f"{results['stages']['cpt']['heldout/perplexity']:.2f}" in card.text
    assert (release / "mergekit_config.yml").is_file() and not (release / "manifest.json").exists()
    assert AutoModelForCausalLM.from_pretrained(release).config.num_hidden_layers == 12

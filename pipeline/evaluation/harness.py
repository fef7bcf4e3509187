"""lm-evaluation-harness glue: offline availability of tasks, the local tasks (``dus_mc``,
``dus_corpus_ppl``) filled with this run's data, and flat ``task/metric`` results.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pipeline.errors import ConfigError
from pipeline.evaluation.metrics import (
    AVERAGE_KEY,
    DEFAULT_MC_FILE,
    LOCAL_TASKS,
    LOCAL_TASKS_DIR,
)
from pipeline.fsutil import atomic_write_text
from pipeline.hub import datasets_offline, env_true


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            "eval.use_harness", "lm-evaluation-harness is not installed",
            "pip install 'dus-pipeline[eval]' (lm-eval 0.4.13), or set eval.use_harness=false",
        ) from None
    import lm_eval

    return lm_eval


def _datasets_cache() -> Path:
    """HF_DATASETS_CACHE as ``datasets`` resolves it (read now, so tests and callers can point it)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "datasets"


_PACKAGED_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "webdataset", "xml"}


def _dataset_available(path: str, name: str | None, dataset_kwargs: dict | None) -> bool:
    """Whether ``datasets.load_dataset(path, name, ...)`` can work offline.

    Offline, datasets 5.x does not read the hub cache: it only reuses a dataset prepared before in
    the datasets cache, ``<HF_DATASETS_CACHE>/<owner>___<name>/<config>/<version>/<hash>/``
    (``datasets.packaged_modules.cache``), which is what this looks for. Local builders (json,
    csv, ...) need their data files to exist.
    """
    if path in _PACKAGED_BUILDERS:
        files = (dataset_kwargs or {}).get("data_files")
        names = [files] if isinstance(files, str) else (
            [f for v in files.values() for f in ([v] if isinstance(v, str) else v)] if isinstance(files, dict)
            else list(files or []))
        return all("://" in f or Path(f).exists() for f in names)
    if Path(path).expanduser().exists():
        return True
    from datasets.naming import camelcase_to_snakecase

    *owner, repo = path.split("/")
    root = _datasets_cache() / "___".join([*owner, camelcase_to_snakecase(repo)])
    return any(p.is_dir() for p in root.glob(f"{name or '*'}/*/*"))


def _leaf_datasets(name_or_cfg, index, seen: set) -> list[tuple[str, str | None, dict | None]]:
    """(dataset_path, dataset_name, dataset_kwargs) of every leaf task under a task/group/tag,
    from lm-eval's task index (YAML only: nothing is downloaded or built)."""
    from lm_eval.tasks._index import Kind

    if isinstance(name_or_cfg, dict):
        ref = name_or_cfg.get("task") if "group" not in name_or_cfg else None
        if isinstance(ref, str) and ref in index:
            return _leaf_datasets(ref, index, seen)
        if "group" in name_or_cfg:
            if name_or_cfg["group"] in index:
                return _leaf_datasets(name_or_cfg["group"], index, seen)
            members = name_or_cfg.get("task") or []
            return [d for m in members for d in _leaf_datasets(m, index, seen)]
        cfg = name_or_cfg
    else:
        if name_or_cfg in seen:
            return []
        seen.add(name_or_cfg)
        entry = index.get(name_or_cfg)
        if entry is None:
            return []
        if entry.kind == Kind.TAG:
            return [d for t in sorted(entry.tags) for d in _leaf_datasets(t, index, seen)]
        cfg = entry.cfg or {}
        if entry.kind == Kind.GROUP:
            members = cfg.get("task") or []
            return [d for m in (members if isinstance(members, list) else [members]) for d in _leaf_datasets(m, index, seen)]
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or cfg.get("custom_dataset"):
        return []  # Python-defined tasks: can't tell without running them
    return [(path, cfg.get("dataset_name"), cfg.get("dataset_kwargs"))]


def check_tasks_available(
    tasks: Sequence[str], *, task_manager=None, include_path: str | Sequence[str] | None = None
) -> None:
    """Fail before any model is loaded when the harness tasks cannot run: call it in preflight.

    Raises ``ConfigError`` when lm-eval is not installed, when a task name is unknown, and, offline
    (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set), when the datasets (and configs) of a task are not
    prepared in the datasets cache (``_dataset_available``): it walks lm-eval's task index (groups
    such as ``mmlu`` down to their subtasks, reading YAML only) and names the tasks and datasets
    missing, and how to fix it. Online, lm-eval downloads what it needs. The local tasks
    (``dus_mc``, ``dus_corpus_ppl``) always pass here (``run_lm_eval`` checks their files); with
    only those, nothing is indexed (indexing lm-eval's built-in tasks takes a few seconds).
    """
    _require_lm_eval()
    public = [t for t in tasks if t not in LOCAL_TASKS]
    if not public:
        return
    if task_manager is None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=include_path)
    index = task_manager.task_index
    unknown = [t for t in public if t not in index]
    if unknown:
        raise ConfigError(
            "eval.harness_tasks", f"unknown lm-eval task(s): {', '.join(unknown)}",
            "check the names (`lm-eval ls tasks`) or add their YAML directory as eval.harness_include_path",
        )
    if not datasets_offline():
        return
    missing: dict[str, list[str]] = {}
    for task in public:
        for path, _name, kwargs in _leaf_datasets(task, index, set()):
            if not _dataset_available(path, _name, kwargs):
                missing.setdefault(task, [])
                if path not in missing[task]:
                    missing[task].append(path)
    if missing:
        flags = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if env_true(n)]
        what = "; ".join(f"{t} ({', '.join(p)})" for t, p in missing.items())
        raise ConfigError(
            "eval.harness_tasks",
            f"running offline ({', '.join(f'{n}=1' for n in flags)}) and the datasets of these lm-eval tasks are "
            f"not in the datasets cache {_datasets_cache()}: {what}",
            "run the evaluation once with network access (unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE; same "
            "HF_HOME / HF_DATASETS_CACHE) so lm-eval downloads and prepares them, or copy a datasets cache where "
            "that has been done; or evaluate on the local tasks only (eval=default)",
        )


def write_text_jsonl(texts: Iterable[str], path: Path | str) -> Path:
    """``{"text": ...}`` per line: the records file of the ``dus_corpus_ppl`` task."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def materialize_local_tasks(dest: Path, tasks: Sequence[str], data_files: Mapping[str, str]) -> Path:
    """Copy the requested local task YAMLs into ``dest`` with their data file made absolute.

    ``dus_mc`` defaults to the shipped ``data/demo/mc_eval.jsonl``; ``dus_corpus_ppl`` has no
    default (the eval stage writes the held-out records, see ``write_text_jsonl``). Datasets built
    from these files are cached under ``dest`` (thrown away with it), not in the user's cache.
    """
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        data_file = data_files.get(task) or (str(DEFAULT_MC_FILE) if task == "dus_mc" else None)
        if data_file is None:
            raise ConfigError(
                "eval.harness_tasks", f"task {task} needs its data file",
                f"pass data_files={{'{task}': <jsonl>}} (the eval stage writes the held-out records with write_text_jsonl)",
            )
        data_path = Path(data_file).expanduser().resolve()
        if not data_path.is_file():
            raise ConfigError("eval.harness_tasks", f"data file of task {task} does not exist: {data_path}")
        cfg = yaml.safe_load((LOCAL_TASKS_DIR / f"{task}.yaml").read_text())
        cfg["dataset_kwargs"] = {
            **(cfg.get("dataset_kwargs") or {}),
            "data_files": {cfg.get("test_split", "test"): str(data_path)},
            "cache_dir": str(dest / ".hf_datasets_cache"),
        }
        (dest / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _task_manager(tasks: Sequence[str], include: list[str]):
    """A TaskManager over our include dirs only when that covers the tasks (1 s, instead of ~6 s
    to index lm-eval's ~200 built-in task directories)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include, include_defaults=False)
    if all(t in tm.task_index for t in tasks):
        return tm
    tm = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        raise ConfigError(
            "eval.harness_tasks", f"unknown lm-eval task(s): {', '.join(unknown)}",
            "check the names (`lm-eval ls tasks`) or add their YAML directory as eval.harness_include_path",
        )
    return tm


def flatten_lm_eval_results(results: Mapping, tasks: Sequence[str]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for the requested tasks (groups: their aggregate row).

    lm-eval's ``"acc,none"`` becomes ``acc``; a metric under a named filter keeps it
    (``gsm8k/exact_match,strict-match``). Non-numeric entries ("N/A" stderr, aliases) are dropped.
    A requested tag (no row of its own) contributes its member tasks' rows.
    """
    rows: dict[str, Mapping] = {**(results.get("groups") or {}), **(results.get("results") or {})}
    wanted = [t for t in tasks if t in rows]
    if len(wanted) < len(tasks):  # a tag: take every leaf row
        wanted += [t for t in rows if t not in wanted and t not in tasks]
    flat: dict[str, float] = {}
    for task in wanted:
        for key, value in rows[task].items():
            if key in ("sample_len", "name", "alias") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric if filt in ('', 'none') else key}"] = float(value)
    return flat


def average_metrics(metrics: Mapping[str, float], spec: Mapping[str, str]) -> float | None:
    """Mean of ``metrics[f"{task}/{metric}"]`` over ``spec`` (task -> metric), None if any is missing."""
    values = [metrics.get(f"{t}/{m}") for t, m in spec.items()]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def run_lm_eval(
    model_dir: str,
    *,
    tasks: Sequence[str],
    include_path: str | Sequence[str] | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    data_files: Mapping[str, str] | None = None,
    average: Mapping[str, str] | None = None,
    dtype: str = "auto",
    model_args: Mapping[str, Any] | None = None,
    bootstrap_iters: int = 1000,
) -> dict[str, float]:
    """Run lm-evaluation-harness on a local model directory; flat ``{"<task>/<metric>": value}``.

    - ``tasks``: lm-eval task/group names. ``dus_mc`` and ``dus_corpus_ppl`` come from
      ``pipeline/evaluation/lm_eval_tasks`` (always included, data files from ``data_files``, see
      ``materialize_local_tasks``); ``include_path`` adds directories of your own task YAMLs.
    - ``num_fewshot``: one int for all tasks, or per task (``{"arc_challenge": 25, ...}``; tasks not
      listed keep their YAML's default). Tasks are run in one ``simple_evaluate`` call per
      few-shot count, on one loaded model.
    - ``batch_size``: an int, or ``"auto"`` / ``"auto:N"`` (lm-eval finds the largest batch that fits
      on the GPU, re-checking N times); ``device``: None = cuda if available, else cpu.
    - ``average``: task -> metric (e.g. the Open LLM Leaderboard v1 set); their mean is added as
      ``harness/average`` when all are present.
    - ``limit``: examples per task (a fraction when < 1); for smoke tests, not for reported numbers.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) it first checks the tasks' datasets are cached
    and fails with a ``ConfigError`` before loading the model (``check_tasks_available``).

    Several GPUs: lm-eval's HF model runs data parallel when the process is started by
    ``accelerate launch`` (each rank scores a shard; only rank 0 gets results, the others return
    {}), e.g. ``accelerate launch -m lm_eval --model hf --model_args pretrained=<stage dir>
    --tasks dus_mc --include_path pipeline/evaluation/lm_eval_tasks``, or this function under ``accelerate
    launch``. A model too large for one GPU: ``model_args={"parallelize": True}`` (one process,
    layers spread over the visible GPUs).
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ConfigError("eval.harness_tasks", "no tasks given", "list lm-eval task names, e.g. [dus_mc]")
    for field_name, per_task in (("eval.harness_num_fewshot", num_fewshot), ("eval.harness_average", average)):
        stray = sorted(set(per_task) - set(tasks)) if isinstance(per_task, Mapping) else []
        if stray:
            raise ConfigError(field_name, f"names tasks that are not run: {', '.join(stray)}",
                              f"list them in eval.harness_tasks ({', '.join(tasks)}) or remove them")
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="dus-lm-eval-") as tmp:
        local = materialize_local_tasks(Path(tmp) / "tasks", [t for t in tasks if t in LOCAL_TASKS], data_files or {})
        task_manager = _task_manager(tasks, [str(local), *map(str, extra)])
        check_tasks_available(tasks, task_manager=task_manager)

        runs: dict[int | None, list[str]] = defaultdict(list)
        for task in tasks:
            shots = num_fewshot.get(task) if isinstance(num_fewshot, Mapping) else num_fewshot
            runs[shots].append(task)
        lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device, dtype=dtype, **dict(model_args or {}))
        metrics: dict[str, float] = {}
        try:
            for shots, names in runs.items():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=task_manager,
                    bootstrap_iters=bootstrap_iters, log_samples=False,
                )
                if out is None:  # not rank 0 under a data-parallel launch
                    return {}
                metrics.update(flatten_lm_eval_results(out, names))
        finally:
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if average:
        avg = average_metrics(metrics, average)
        if avg is not None:
            metrics[AVERAGE_KEY] = avg
    return metrics


def mc_chance_accuracy(path: Path | str = DEFAULT_MC_FILE) -> float:
    """Expected accuracy of uniform guessing on a ``{"choices": [...]}`` jsonl file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sum(1 / len(r["choices"]) for r in rows) / len(rows)

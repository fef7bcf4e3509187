"""Evaluation of every stage's model, so one table shows what each stage did.

SOLAR's depth up-scaling story in numbers: the merged (passthrough) model scores a worse held-out
perplexity than the base, continued pretraining (cpt) brings it back, instruction tuning (sft)
lowers the loss on held-out assistant replies. Every function here is plain, with explicit keyword
arguments; the eval stage calls them once per stage model:

- ``heldout_perplexity``: per-token perplexity of the held-out corpus records (our own loop).
- ``assistant_token_loss``: mean loss on the assistant tokens of held-out conversations.
- ``run_lm_eval``: lm-evaluation-harness (``pip install 'dus-pipeline[eval]'``) on local tasks
  (``pipeline/lm_eval_tasks``: ``dus_mc``, ``dus_corpus_ppl``) or public ones (``eval=leaderboard``).
- ``write_results``, ``plot_training``, ``plot_tasks``: ``results.json``, ``results.md``, PNGs.

Metric keys are flat, ``"<task>/<metric>"``: ``heldout/perplexity``, ``sft_heldout/loss``,
``dus_mc/acc``, ``dus_mc/acc_stderr``, ``dus_corpus_ppl/word_perplexity``, ``harness/average``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pipeline.config import REPO_ROOT, STAGES
from pipeline.data import tokenize_records
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_json, atomic_write_text

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# Tasks defined in LOCAL_TASKS_DIR whose data file is filled in at run time.
LOCAL_TASKS = ("dus_mc", "dus_corpus_ppl")
DEFAULT_MC_FILE = REPO_ROOT / "data" / "demo" / "mc_eval.jsonl"

HELDOUT = "heldout"  # held-out corpus records, per-token perplexity
SFT_HELDOUT = "sft_heldout"  # held-out conversations, assistant tokens only
AVERAGE_KEY = "harness/average"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"

# {% generation %} / {%- generation -%} ... : what return_assistant_tokens_mask needs.
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# --------------------------------------------------------------------------- losses


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _summary(nll_sum: float, tokens: int) -> dict[str, float]:
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": tokens}


def _token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """NLL of tokens 1..L-1 given their prefix, per position: shape (batch, L-1), float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def heldout_perplexity(
    model, tokenizer, texts: list[str], *, seq_len: int, batch_size: int, max_tokens: int = 0
) -> dict:
    """Per-token perplexity of held-out text records: ``{"loss", "perplexity", "tokens"}``.

    Records are tokenized as cpt trains on them (``pipeline.data.tokenize_records``:
    ``[bos] + text + [eos]``), concatenated in the given order into one stream, and the stream
    (cut to its first ``max_tokens`` tokens when > 0) is cut into **non-overlapping** windows of
    ``seq_len`` tokens, the last one shorter. Each window is scored on its own: its first token is
    context only, every other token is predicted from the tokens before it in the same window, so
    tokens early in a window see little context and the number is somewhat higher than a
    sliding-window perplexity (cheaper, and the same for every stage). A record's leading BOS is
    never a target (it is formatting, not text); EOS is. ``loss`` is the mean NLL in nats over the
    ``tokens`` predicted tokens, ``perplexity = exp(loss)``. Deterministic: no sampling, fixed order.
    """
    if seq_len < 2:
        raise ConfigError("eval.seq_len", f"must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ConfigError("eval.batch_size", f"must be >= 1, got {batch_size}")
    if not texts:
        raise ConfigError("eval", "no held-out text records to score", "set data.heldout_fraction > 0")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ConfigError("eval.seq_len", f"{seq_len} is longer than the model's {max_positions} positions",
                          f"set eval.seq_len <= {max_positions}")
    stream: list[int] = []
    is_target: list[bool] = []
    bos = tokenizer.bos_token_id
    for doc in tokenize_records(tokenizer, list(texts)):
        stream.extend(doc)
        is_target.extend(not (i == 0 and tok == bos) for i, tok in enumerate(doc))
    if max_tokens > 0:
        stream, is_target = stream[:max_tokens], is_target[:max_tokens]
    windows = [(lo, min(lo + seq_len, len(stream))) for lo in range(0, len(stream), seq_len)]
    windows = [(lo, hi) for lo, hi in windows if hi - lo >= 2]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            # Full windows in batches, then the shorter tail window alone: no padding anywhere.
            by_len: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for lo, hi in windows:
                by_len[hi - lo].append((lo, hi))
            for length in sorted(by_len, reverse=True):
                group = by_len[length]
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    ids = torch.tensor([stream[lo:hi] for lo, hi in chunk], device=device)
                    mask = torch.tensor([is_target[lo + 1 : hi] for lo, hi in chunk], device=device)
                    nll = _token_nll(model, ids)
                    nll_sum += float(nll[mask].double().sum())
                    tokens += int(mask.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("eval", "the held-out records hold no token to predict", "check data.heldout_fraction and the data")
    return _summary(nll_sum, tokens)


def has_generation_markers(chat_template: Any) -> bool:
    if isinstance(chat_template, dict):  # named templates
        chat_template = chat_template.get("default") or next(iter(chat_template.values()), None)
    return isinstance(chat_template, str) and bool(_GENERATION_MARKER.search(chat_template))


def assistant_token_loss(
    model, tokenizer, conversations: list[list[dict]], *, max_length: int, batch_size: int, max_examples: int = 0
) -> dict:
    """Mean NLL over the assistant tokens of conversations: ``{"loss", "perplexity", "tokens", ...}``.

    Each conversation goes through the tokenizer's chat template with
    ``return_assistant_tokens_mask=True`` and is cut to its first ``max_length`` tokens (as sft
    truncates); only tokens inside the template's ``{% generation %}`` blocks count, predicted from
    everything before them. Loss is averaged over tokens (long replies weigh more), like TRL's
    ``assistant_only_loss``. The first ``max_examples`` conversations are used when > 0;
    ``examples`` counts those scored, ``skipped`` those with no assistant token left after
    truncation. Score every stage with the same tokenizer so the numbers compare.
    """
    template = tokenizer.chat_template
    if not has_generation_markers(template):
        raise ConfigError(
            "tokenizer.chat_template",
            "has no {% generation %} ... {% endgeneration %} markers" if template else "is not set",
            "the assistant-token loss needs a chat template that wraps each assistant reply in "
            "{% generation %}...{% endgeneration %} (as pipeline/demo.py's CHAT_TEMPLATE does); "
            "set one on the tokenizer, or leave eval.max_sft_heldout_examples / sft data out",
        )
    if max_length < 2:
        raise ConfigError("sft.max_length", f"must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ConfigError("eval.batch_size", f"must be >= 1, got {batch_size}")
    convs = conversations[:max_examples] if max_examples > 0 else conversations
    examples: list[tuple[list[int], list[int]]] = []
    skipped = 0
    for conv in convs:
        enc = tokenizer.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        if not any(mask[1:]):
            skipped += 1
            continue
        examples.append((ids, mask))
    if not examples:
        raise ConfigError(
            "eval", f"none of the {len(convs)} held-out conversations has an assistant token within {max_length} tokens",
            "check the conversations and sft.max_length",
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = _model_device(model)
    # Longest first: similar lengths share a batch (less padding); the order does not change the sum.
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start : start + batch_size]]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                target = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (seq, amask) in enumerate(chunk):  # right padding: positions stay 0..n-1
                    ids[row, : len(seq)] = torch.tensor(seq)
                    attn[row, : len(seq)] = 1
                    target[row, : len(seq)] = torch.tensor(amask, dtype=torch.bool)
                nll = _token_nll(model, ids.to(device), attn.to(device))
                sel = target[:, 1:].to(device)
                nll_sum += float(nll[sel].double().sum())
                tokens += int(sel.sum())
    finally:
        model.train(was_training)
    return {**_summary(nll_sum, tokens), "examples": len(examples), "skipped": skipped}


def evaluate_model(
    model_dir: str,
    *,
    heldout_texts: Sequence[str] | None,
    heldout_conversations: Sequence[list[dict]] | None,
    seq_len: int,
    batch_size: int,
    max_heldout_tokens: int = 0,
    max_length: int = 1024,
    max_sft_examples: int = 0,
    chat_tokenizer_dir: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Load one stage's model and compute its flat ``heldout/*`` and ``sft_heldout/*`` metrics.

    ``chat_tokenizer_dir``: the tokenizer whose chat template formats the conversations (pass the
    sft stage's, so every stage is scored on the same token sequences); None = the model's own.
    fp32 on CPU, bf16 on a GPU that supports it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    metrics: dict[str, float] = {}
    if heldout_texts:
        out = heldout_perplexity(model, tokenizer, list(heldout_texts), seq_len=seq_len, batch_size=batch_size,
                                 max_tokens=max_heldout_tokens)
        metrics.update({f"{HELDOUT}/{k}": v for k, v in out.items()})
    if heldout_conversations:
        chat_tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir) if chat_tokenizer_dir else tokenizer
        out = assistant_token_loss(model, chat_tok, list(heldout_conversations), max_length=max_length,
                                   batch_size=batch_size, max_examples=max_sft_examples)
        metrics.update({f"{SFT_HELDOUT}/{k}": v for k, v in out.items()})
    del model
    return metrics


# --------------------------------------------------------------------------- lm-evaluation-harness


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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (read now, not at import)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


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
    if not is_offline():
        return
    missing: dict[str, list[str]] = {}
    for task in public:
        for path, _name, kwargs in _leaf_datasets(task, index, set()):
            if not _dataset_available(path, _name, kwargs):
                missing.setdefault(task, [])
                if path not in missing[task]:
                    missing[task].append(path)
    if missing:
        flags = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_true(n)]
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
      ``pipeline/lm_eval_tasks`` (always included, data files from ``data_files``, see
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
    --tasks dus_mc --include_path pipeline/lm_eval_tasks``, or this function under ``accelerate
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


# --------------------------------------------------------------------------- results


def _stage_order(stages: Iterable[str]) -> list[str]:
    stages = list(stages)
    known = [s for s in STAGES if s in stages]
    return known + [s for s in stages if s not in known]


_COLUMN_LABELS = {
    f"{HELDOUT}/perplexity": "held-out ppl",
    f"{SFT_HELDOUT}/loss": "assistant-token loss",
    AVERAGE_KEY: "harness average",
}
# Shown elsewhere (stderr next to its metric) or redundant (loss = ln ppl).
_NOT_COLUMNS = {f"{HELDOUT}/loss", f"{SFT_HELDOUT}/perplexity"}
_COUNT_SUFFIXES = ("/tokens", "/examples", "/skipped")


def metric_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The metrics worth a column or a panel: held-out ppl, assistant loss, then harness metrics."""
    seen: list[str] = []
    for stage in _stage_order(results):
        for key in results[stage]:
            if key in seen or key in _NOT_COLUMNS or key.endswith(_COUNT_SUFFIXES) or key.endswith("_stderr"):
                continue
            seen.append(key)
    first = [k for k in _COLUMN_LABELS if k in seen and k != AVERAGE_KEY]
    last = [AVERAGE_KEY] if AVERAGE_KEY in seen else []
    return first + [k for k in seen if k not in first and k not in last] + last


def _stderr_key(key: str) -> str:
    task, _, metric = key.partition("/")
    name, comma, filt = metric.partition(",")
    return f"{task}/{name}_stderr{comma}{filt}"


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    if "perplexity" in key:
        return f"{value:,.2f}" if value < 1e6 else f"{value:.3g}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"


def summarize(results: Mapping[str, Mapping[str, float]], *, chance: Mapping[str, float] | None = None) -> list[str]:
    """Sentences on what the numbers show, computed from them."""
    order = _stage_order(results)
    lines: list[str] = []

    def series(key: str) -> dict[str, float]:
        return {s: results[s][key] for s in order if results[s].get(key) is not None}

    ppl_key = f"{HELDOUT}/perplexity"
    ppl = series(ppl_key)
    if len(ppl) >= 2:
        lines.append("Held-out perplexity by stage: " + " → ".join(f"{s} {_fmt(ppl_key, v)}" for s, v in ppl.items()) + ".")
    if "base" in ppl and "merge" in ppl:
        b, m = ppl["base"], ppl["merge"]
        verb = "raised" if m > b else "lowered" if m < b else "left unchanged"
        text = f"merge {verb} held-out perplexity from {_fmt(ppl_key, b)} (base) to {_fmt(ppl_key, m)}"
        if "cpt" in ppl:
            c = ppl["cpt"]
            rel = "below" if c < b else "above" if c > b else "equal to"
            change = f"{abs(1 - c / m) * 100:.0f}% {'below' if c < m else 'above'} merge"
            text += f"; cpt brought it to {_fmt(ppl_key, c)} ({change}, {rel} the base's {_fmt(ppl_key, b)})"
        lines.append(text + ".")
    loss_key = f"{SFT_HELDOUT}/loss"
    loss = series(loss_key)
    if "sft" in loss:
        before = [s for s in loss if order.index(s) < order.index("sft")]
        if before:
            prev = before[-1]
            verb = "lowered" if loss["sft"] < loss[prev] else "raised" if loss["sft"] > loss[prev] else "left unchanged"
            lines.append(f"sft {verb} the assistant-token loss on held-out conversations from "
                         f"{loss[prev]:.4f} ({prev}) to {loss['sft']:.4f}.")
    for key, level in (chance or {}).items():
        vals = series(key)
        if not vals:
            continue
        best = max(vals, key=vals.get)
        se = results[best].get(_stderr_key(key))
        above = se is not None and vals[best] - 2 * se > level
        err = f" ± {se:.3f}" if se is not None else ""
        lines.append(
            f"{key}: best stage {best} at {vals[best]:.3f}{err} vs chance {level:.3f} "
            f"({'more than 2 standard errors above chance' if above else 'not distinguishable from chance'})."
        )
    avg = series(AVERAGE_KEY)
    if avg:
        lines.append("Harness average by stage: " + " → ".join(f"{s} {v:.3f}" for s, v in avg.items()) + ".")
    return lines


def results_markdown(results: Mapping[str, Mapping[str, float]], *, chance: Mapping[str, float] | None = None) -> str:
    columns = metric_columns(results)
    header = ["stage"] + [_COLUMN_LABELS.get(c, c) for c in columns]
    lines = ["# Evaluation", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage in _stage_order(results):
        row = [stage]
        for col in columns:
            value = results[stage].get(col)
            cell = _fmt(col, value)
            se = results[stage].get(_stderr_key(col))
            if value is not None and se is not None:
                cell += f" ± {_fmt(col, se)}"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    notes = summarize(results, chance=chance)
    if notes:
        lines += [*notes, ""]
    lines.append(
        "held-out ppl: per-token perplexity of the held-out corpus records (non-overlapping windows of "
        "eval.seq_len tokens); assistant-token loss: mean NLL (nats) on assistant tokens of held-out "
        "conversations; `task/metric`: lm-evaluation-harness (± standard error)."
        + "".join(f" Chance for {k}: {v:.3f}." for k, v in (chance or {}).items())
    )
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Mapping[str, float]], out_dir: Path | str, *, chance: Mapping[str, float] | None = None
) -> None:
    """``results.json`` (``{"stages": {stage: metrics}, "chance": ..., "summary": [...]}``) and
    ``results.md`` (one row per stage, one column per metric, plus what the numbers show).

    ``chance``: metric key -> chance level (e.g. ``{"dus_mc/acc": mc_chance_accuracy()}``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = {s: dict(results[s]) for s in _stage_order(results)}
    atomic_write_json(out_dir / RESULTS_JSON, {
        "stages": ordered, "chance": dict(chance or {}), "summary": summarize(ordered, chance=chance),
    })
    atomic_write_text(out_dir / RESULTS_MD, results_markdown(ordered, chance=chance))


# --------------------------------------------------------------------------- plots


def read_log_history(stage_dir: Path | str) -> list[dict]:
    """A training stage's HF ``log_history``: ``logs/log_history.json`` (written by cpt/sft), else
    ``trainer_state.json`` here or in its latest ``checkpoint-*``; [] if none."""
    stage_dir = Path(stage_dir)
    candidates = [stage_dir / "logs" / "log_history.json", stage_dir / "trainer_state.json"]
    checkpoints = sorted(stage_dir.glob("**/checkpoint-*/trainer_state.json"),
                         key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]) if p.parent.name.rsplit("-", 1)[-1].isdigit() else -1)
    for path in candidates + checkpoints[::-1]:
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("log_history", []) if isinstance(data, dict) else data
    return []


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


_STAGE_COLORS = {"base": "#555555", "merge": "#d62728", "cpt": "#1f77b4", "sft": "#2ca02c"}


def _perplexity_ticks(lo_nats: float, hi_nats: float, most: int = 9) -> list[float]:
    """Round perplexity values (1, 2, 5 x 10^k; 1, 2, 3, 5 when the range is narrow) between
    exp(lo) and exp(hi), for the perplexity axis of a plot drawn in nats."""
    lo, hi = math.exp(max(lo_nats, -50)), math.exp(min(hi_nats, 700))
    for mantissas in ((1, 1.5, 2, 3, 4, 5, 7), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10**k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10**k <= hi]
        if len(ticks) <= most:
            return ticks
    return ticks[:: math.ceil(len(ticks) / most)]


def plot_training(stage_logs: Mapping[str, list[dict]], eval_ppl: Mapping[str, float], path: Path | str) -> Path:
    """Training loss of the training stages on one step axis (cpt steps, then sft steps), and each
    stage's held-out perplexity as a marker at the step where that stage's model was taken (base and
    merge at step 0). Both share the left axis in nats (eval points at ln(ppl)); the right axis
    reads the same scale as perplexity = exp(loss). sft's training loss is on assistant tokens, the
    markers are on held-out corpus text."""
    import numpy as np

    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    offset, stage_end = 0, {}
    for stage in _stage_order(stage_logs):
        points = sorted((e["step"], e["loss"]) for e in stage_logs[stage] if "loss" in e and "step" in e)
        if not points:
            continue
        xs = [offset + s for s, _ in points]
        ax.plot(xs, [l for _, l in points], color=_STAGE_COLORS.get(stage), lw=1.6, label=f"{stage} training loss")
        if offset:
            ax.axvline(offset, color="#999999", ls=":", lw=1)
        ax.text(offset, 1.01, f" {stage} ", transform=ax.get_xaxis_transform(), ha="left", va="bottom", fontsize=9)
        stage_end[stage] = offset + points[-1][0]
        offset = stage_end[stage]

    at_step = {"base": 0, "merge": 0}
    for stage in _stage_order(eval_ppl):
        if stage not in at_step:
            at_step[stage] = stage_end.get(stage, offset)
    pts = [(s, at_step[s], math.log(v)) for s, v in ((s, eval_ppl[s]) for s in _stage_order(eval_ppl))
           if v is not None and 0 < v < float("inf")]
    if pts:
        path_pts = [(x, y) for s, x, y in pts if s != "base"]
        if len(path_pts) > 1:
            ax.plot(*zip(*path_pts), color="#444444", ls="--", lw=1, zorder=2)
        for i, (stage, x, y) in enumerate(pts):
            ax.scatter([x], [y], s=70, marker="D", color=_STAGE_COLORS.get(stage, f"C{i}"), edgecolor="black",
                       zorder=3, label=f"{stage} held-out ppl")
            ax.annotate(f"{stage}: {math.exp(y):,.1f}", (x, y), textcoords="offset points",
                        xytext=(8, -14) if stage == "base" else (8, 6), fontsize=9)
    ax.set_xlabel("optimizer step (cpt steps, then sft steps)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xlim(left=-0.03 * max(offset, 1), right=max(offset, 1) * 1.12)
    ax.margins(y=0.12)
    sec = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.clip(p, 1e-300, None))))
    sec.set_yticks(_perplexity_ticks(*ax.get_ylim()))
    sec.set_ylabel("perplexity = exp(loss)")
    fig.supxlabel("markers: held-out corpus perplexity of each stage's model (base and merge at step 0); "
                  "cpt trains on corpus tokens, sft on assistant tokens only", fontsize=8, color="#444444")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Training loss across stages and held-out perplexity per stage", pad=18)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_tasks(
    results: Mapping[str, Mapping[str, float]], path: Path | str, *, chance: Mapping[str, float] | None = None
) -> Path:
    """One panel per metric (held-out ppl, assistant loss, each harness metric), one bar per stage,
    with ±1 standard error where lm-eval gives one and a dashed line at chance where known."""
    columns = metric_columns(results)
    stages = _stage_order(results)
    ncols = min(3, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig = _new_figure(4.0 * ncols, 3.1 * nrows)
    if not columns:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no metrics to plot", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shown = [s for s in stages if results[s].get(key) is not None and math.isfinite(results[s][key])]
        values = [results[s][key] for s in shown]
        errs = [results[s].get(_stderr_key(key)) or 0.0 for s in shown]
        bars = ax.bar(shown, values, yerr=errs if any(errs) else None, capsize=3,
                      color=[_STAGE_COLORS.get(s, f"C{j}") for j, s in enumerate(shown)])
        ax.bar_label(bars, labels=[_fmt(key, v) for v in values], fontsize=8, padding=2)
        if chance and key in chance:
            ax.axhline(chance[key], color="black", ls="--", lw=1, label=f"chance {chance[key]:.3f}")
            ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
        if values:
            ax.set_ylim(0, max(v + e for v, e in zip(values, errs)) * (1.35 if chance and key in chance else 1.18))
        ax.set_title(_COLUMN_LABELS.get(key, key), fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

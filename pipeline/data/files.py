"""Where data rows come from: local files (.txt, .jsonl, .json, .parquet) and hub datasets
(``org/name[:split]``, streamed), and the checks a stage runs on them before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from pipeline.errors import ConfigError
from pipeline.hub import datasets_offline


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_hub_dataset_name(name: str) -> bool:
    """``org/name`` (optionally ``org/name:split``) that is not a local path."""
    base = name.split(":", 1)[0]
    return (not Path(name).exists() and base.count("/") == 1 and not base.startswith((".", "/", "~"))
            and Path(base).suffix not in TEXT_SUFFIXES)


def require_hub_access(name: str, *, field: str) -> None:
    if datasets_offline():
        raise ConfigError(field, f"hub dataset '{name}' cannot be fetched offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)",
                          "run with network access, or download it and point at local .jsonl/.parquet files")


def check_data_file(path: str, *, field: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, f"data file {path} does not exist", "fix the path or create the file")
    if p.suffix not in TEXT_SUFFIXES:
        raise ConfigError(field, f"{path}: unsupported file type '{p.suffix}'", f"use one of {', '.join(TEXT_SUFFIXES)}")
    return p


def read_rows(path: Path, *, field: str) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        # Batch by batch, so a caller that needs only the first rows reads only those.
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
        return
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ConfigError(field, f"{path}: a .json data file must hold a list of objects")
        yield from rows
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(field, f"{path}:{lineno} is not valid JSON ({e.msg})") from None


def iter_hub_rows(name: str, *, field: str) -> Iterator[dict]:
    """Rows of a hub dataset ``org/name[:split]``, streamed (never materialised)."""
    repo, _, split = name.partition(":")
    require_hub_access(repo, field=field)
    import datasets

    try:
        yield from datasets.load_dataset(repo, split=split or "train", streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the name and cause
        raise ConfigError(field, f"hub dataset '{repo}' could not be streamed ({type(e).__name__}: {e})",
                          "check the name and split, or use local files") from None


def check_data_files(files: list[str], *, field: str, column: str, column_field: str, txt_ok: bool, what: str) -> None:
    """Each file exists (or is a reachable hub dataset), is not empty, and has ``column``."""
    if not files:
        raise ConfigError(field, "is empty", f"list the {what}")
    for name in files:
        if is_hub_dataset_name(name):
            require_hub_access(name, field=field)
            continue
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            if not txt_ok:
                raise ConfigError(field, f"{name} is a .txt file", f"give .jsonl/.json/.parquet rows with a '{column}' column")
            if path.stat().st_size == 0:
                raise ConfigError(field, f"{name} is empty")
            continue
        row = next(read_rows(path, field=field), None)
        if row is None:
            raise ConfigError(field, f"{name} has no rows")
        if column not in row:
            raise ConfigError(column_field, f"'{column}' is not a column of {name} (columns: {sorted(row)})",
                              f"set {column_field} to the right column, or convert the data")

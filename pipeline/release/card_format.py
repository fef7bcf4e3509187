"""How a model card writes numbers, durations and two-column tables ("–" for a value not recorded)."""

from __future__ import annotations

from typing import Any, Sequence


def format_count(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "–"


def format_short_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def format_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table_lines(rows: Sequence[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in rows if v not in (None, ""))]

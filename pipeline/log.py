"""The pipeline's one progress line format: ``[dus] <where>: <message>``, flushed at once so it
interleaves correctly with the Trainer's and the launcher's output."""

from __future__ import annotations


def log(msg: str, *, where: str | None = None) -> None:
    print(f"[dus] {where}: {msg}" if where else f"[dus] {msg}", flush=True)

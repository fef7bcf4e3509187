"""Issue 18 items 2, 3, 16: stage keys on content, the stage chain of this run, no stale GGUF release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.manifest import StageInput, stage_key


def test_stage_key_follows_data_content_not_its_absolute_path(tmp_path):
    """Item 16: the same data under another checkout path keeps the key; other content changes it."""
    a, b = tmp_path / "checkout_a" / "data", tmp_path / "checkout_b" / "data"
    a.mkdir(parents=True)
    (a / "corpus.txt").write_text("the same words\n\n\nin both checkouts\n")
    shutil.copytree(a, b)
    inputs = [StageInput(role="model", stage="merge", path="x", sha256="k")]

    def key(d: Path) -> str:
        return stage_key("cpt", {"data": {"cpt_files": [str(d / "corpus.txt")]}, "eval": {"mc": str(d)}}, inputs)

    assert key(a) == key(b)
    (b / "corpus.txt").write_text("other words\n")
    assert key(a) != key(b)
    # A hub id or a path that does not exist is kept as written.
    assert stage_key("base", {"model": "org/name"}, []) != stage_key("base", {"model": "org/other"}, [])

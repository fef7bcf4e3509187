"""scripts/gpu_check.sh: argument handling and its CPU path (a dry run: nothing is trained)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    for args, words in ((["--bogus"], "unknown argument '--bogus'"), (["--limit", "0"], "--limit must be a positive"),
                        (["--limit", "ten"], "got 'ten'"), (["--out"], "--out needs a directory")):
        r = _run(*args, "--out", str(tmp_path / "o")) if args != ["--out"] else _run(*args)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert not (tmp_path / "o").exists()
    r = subprocess.run(["bash", str(SCRIPT), "--python", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "not an executable interpreter" in r.stderr


def test_help():
    r = _run("--help")
    assert r.returncode == 0 and "--limit N" in r.stdout and "SmolLM2" in r.stdout


def test_dry_run_lists_what_it_would_run_and_skip(tmp_path):
    import torch

    r = _run("--dry-run", "--out", str(tmp_path / "o"), "--limit", "5")
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing was run" in r.stdout
    assert "experiment=smollm2_dus" in r.stdout and "cpt.bf16=true" in r.stdout
    assert "attn_implementation=sdpa" in r.stdout or "flash_attention_2" in r.stdout
    assert not (tmp_path / "o" / "runs").exists()  # nothing trained
    if not torch.cuda.is_available():
        assert "no CUDA GPU: running only the CPU-safe part" in r.stdout
        assert "| leaderboard | skipped | no GPU |" in r.stdout
        assert "| smollm2_dus_train | skipped |" in r.stdout
        assert "| preflight | not run (dry run) |" in r.stdout

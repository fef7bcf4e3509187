"""Stage manifests: how stages hand their outputs to each other.

Each stage writes ``<run_dir>/<NN>_<stage>/manifest.json`` last, inside a directory that is renamed
into place only when complete. A later stage finds its input by reading the previous stage's
manifest, never through a path typed by hand. The manifest's ``key`` (hash of the stage's config
and its inputs' content hashes) lets a re-run skip a stage whose result is still valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.config import STAGES, REPO_ROOT
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_json, hash_text

MANIFEST_NAME = "manifest.json"
_VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "hydra-core",
    "safetensors", "tokenizers",
)


def stage_dir(run_dir: Path | str, stage: str) -> Path:
    return Path(run_dir) / f"{STAGES.index(stage):02d}_{stage}"


def stage_key(stage: str, config: dict, inputs: list[dict]) -> str:
    """Identity of a stage's result: its config and the content of its inputs."""
    payload = {"stage": stage, "config": config, "inputs": sorted(i["sha256"] for i in inputs)}
    return hash_text(json.dumps(payload, sort_keys=True, default=str))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(
    out_dir: Path,
    *,
    stage: str,
    key: str,
    inputs: list[dict],
    config: dict,
    metrics: dict[str, Any],
    started_at: float,
    model_dir: str | None = ".",
    extra: dict | None = None,
) -> dict:
    """Write the manifest into ``out_dir`` (the not-yet-renamed stage directory)."""
    manifest = {
        "stage": stage,
        "status": "complete",
        "key": key,
        # Where the Hugging Face model directory of this stage is: "." = this directory.
        "model_dir": model_dir,
        "inputs": inputs,
        "config": config,
        "metrics": metrics,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "wall_time_s": round(time.time() - started_at, 2),
        **(extra or {}),
    }
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: Path | str) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("status") == "complete" else None


def require_stage(run_dir: Path | str, stage: str, *, needed_by: str) -> dict:
    """The manifest of a finished stage, or a clear error saying how to produce it."""
    d = stage_dir(run_dir, stage)
    manifest = read_manifest(d)
    if manifest is None:
        raise ConfigError(
            f"{d}",
            f"stage '{needed_by}' needs the output of stage '{stage}', which has not completed in this run directory",
            f"run `python -m pipeline stage={stage}` (or stage=all) with the same run directory first",
        )
    return manifest


def resolve_model_dir(run_dir: Path | str, stage: str, manifest: dict) -> str:
    """The model directory a stage produced, as a path or hub id loadable by from_pretrained."""
    model_dir = manifest["model_dir"]
    if model_dir == ".":
        return str(stage_dir(run_dir, stage))
    return model_dir


def latest_model_stage(run_dir: Path | str, before: str) -> tuple[str, dict]:
    """The most recent completed stage before ``before`` that produced a model (for handing on)."""
    for stage in reversed(STAGES[: STAGES.index(before)]):
        manifest = read_manifest(stage_dir(run_dir, stage))
        if manifest is not None and manifest.get("model_dir"):
            return stage, manifest
    raise ConfigError(
        str(run_dir), f"no completed stage before '{before}' produced a model",
        "run the earlier stages first (stage=all)",
    )

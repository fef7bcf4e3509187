"""Stage manifests: how stages hand their outputs to each other.

Each stage writes ``<run_dir>/<NN>_<stage>/manifest.json`` last, inside a directory that is renamed
into place only when complete. A later stage finds its input by reading the previous stage's
manifest, never through a path typed by hand. The manifest's ``key`` (hash of the stage's config
and its inputs' content hashes) lets a re-run skip a stage whose result is still valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.config import REPO_ROOT, STAGES, TRAINING_STAGES, CPTConfig, DPOConfig, SFTConfig
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_json, hash_path, hash_text

MANIFEST_NAME = "manifest.json"
_VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "hydra-core",
    "safetensors", "tokenizers",
)


def stage_dir(run_dir: Path | str, stage: str) -> Path:
    return Path(run_dir) / f"{STAGES.index(stage):02d}_{stage}"


def stage_key(stage: str, config: dict, inputs: list[StageInput]) -> str:
    """Identity of a stage's result: its config and the content of its inputs. A config value that
    names a local file or directory enters by its content (``content_keyed``), so the same run from
    another checkout or with its data moved keeps its keys."""
    payload = {"stage": stage, "config": content_keyed(config), "inputs": sorted(i.sha256 for i in inputs)}
    return hash_text(json.dumps(payload, sort_keys=True, default=str))


def content_keyed(value: Any) -> Any:
    """``value`` (a config as dicts/lists) with each string that is a path of an existing local file
    or directory (absolute, or containing a separator) replaced by its content hash. Hashes of large
    files are cached by (path, size, mtime) in ``fsutil.hash_path``."""
    if isinstance(value, dict):
        return {k: content_keyed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [content_keyed(v) for v in value]
    if isinstance(value, str) and ("/" in value or os.sep in value):
        path = Path(value).expanduser()
        if path.exists():
            return f"content:{hash_path(path)}"
    return value


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


@dataclass
class StageInput:
    """One input of a stage: a model or data file, identified by a content hash (``sha256``: a file
    or directory hash, a hub id's name@revision hash, or the producing stage's key)."""

    role: str
    path: str
    sha256: str
    stage: Optional[str] = None
    revision: Optional[str] = None
    has_revision: bool = field(default=False, repr=False)  # hub ids record their revision, even None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"role": self.role}
        if self.stage is not None:
            d["stage"] = self.stage
        d["path"] = self.path
        if self.has_revision or self.revision is not None:
            d["revision"] = self.revision
        d["sha256"] = self.sha256
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageInput":
        return cls(role=d["role"], path=d["path"], sha256=d["sha256"], stage=d.get("stage"),
                   revision=d.get("revision"), has_revision="revision" in d)


@dataclass
class Manifest:
    """``manifest.json`` of a finished stage: what it was made from and how, and what it measured."""

    stage: str
    key: str
    # Where the Hugging Face model directory of this stage is: "." = the stage directory itself, a path
    # or hub id = a model referenced, not copied (the base), None = no model (eval).
    model_dir: Optional[str]
    inputs: list[StageInput]
    config: dict
    metrics: dict
    versions: dict = field(default_factory=dict)
    git_commit: Optional[str] = None
    started_at: str = ""
    wall_time_s: float = 0.0
    status: str = "complete"

    def to_dict(self) -> dict:
        return {"stage": self.stage, "status": self.status, "key": self.key, "model_dir": self.model_dir,
                "inputs": [i.to_dict() for i in self.inputs], "config": self.config, "metrics": self.metrics,
                "versions": self.versions, "git_commit": self.git_commit, "started_at": self.started_at,
                "wall_time_s": self.wall_time_s}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(stage=d["stage"], key=d["key"], model_dir=d.get("model_dir"),
                   inputs=[StageInput.from_dict(i) for i in d.get("inputs", [])], config=d.get("config") or {},
                   metrics=d.get("metrics") or {}, versions=d.get("versions") or {}, git_commit=d.get("git_commit"),
                   started_at=d.get("started_at", ""), wall_time_s=d.get("wall_time_s", 0.0),
                   status=d.get("status", "complete"))


def new_manifest(*, stage: str, key: str, inputs: list[StageInput], config: dict, metrics: dict[str, Any],
                 started_at: float, model_dir: Optional[str] = ".") -> Manifest:
    return Manifest(stage=stage, key=key, model_dir=model_dir, inputs=list(inputs), config=config, metrics=metrics,
                    versions=package_versions(), git_commit=git_commit(),
                    started_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
                    wall_time_s=round(time.time() - started_at, 2))


def write_manifest(out_dir: Path, manifest: Manifest) -> Manifest:
    """Write the manifest into ``out_dir`` (the not-yet-renamed stage directory): the last file a stage writes."""
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest.to_dict())
    return manifest


def read_manifest(directory: Path | str) -> Optional[Manifest]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Manifest.from_dict(data) if data.get("status") == "complete" else None


def require_stage(run_dir: Path | str, stage: str, *, needed_by: str) -> Manifest:
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


def resolve_model_dir(run_dir: Path | str, stage: str, manifest: Manifest) -> str:
    """The model directory a stage produced, as a path or hub id loadable by from_pretrained."""
    model_dir = manifest.model_dir
    if model_dir == ".":
        return str(stage_dir(run_dir, stage))
    return model_dir


def model_chain(cfg: Any) -> tuple[str, ...]:
    """The model-producing stages of this run, in order: base, merge, and each training stage
    (cpt, sft, dpo) whose ``enabled`` is true. ``cfg`` is a ``PipelineConfig`` or the run's resolved
    config as a dict (``<run_dir>/config.yaml``). A stage turned off is not in the chain even when
    its directory is still on disk from an earlier run: nothing is handed on from it, evaluated or
    released."""
    def enabled(stage: str) -> bool:
        section = cfg.get(stage) if isinstance(cfg, dict) else getattr(cfg, stage, None)
        value = section.get("enabled") if isinstance(section, dict) else getattr(section, "enabled", None)
        if value is None:  # not said: the schema's default
            value = {"cpt": CPTConfig, "sft": SFTConfig, "dpo": DPOConfig}[stage].enabled
        return bool(value)

    return tuple(s for s in STAGES[: STAGES.index("eval")] if s not in TRAINING_STAGES or enabled(s))


def latest_model_stage(run_dir: Path | str, before: str, chain: Sequence[str]) -> tuple[str, Manifest]:
    """The most recent completed stage of ``chain`` (``model_chain``) before ``before`` that produced
    a model (for handing on)."""
    for stage in reversed(STAGES[: STAGES.index(before)]):
        if stage not in chain:
            continue
        manifest = read_manifest(stage_dir(run_dir, stage))
        if manifest is not None and manifest.model_dir:
            return stage, manifest
    raise ConfigError(
        str(run_dir), f"no completed stage of this run's chain ({', '.join(chain)}) before '{before}' produced a model",
        "run the earlier stages first (stage=all)",
    )

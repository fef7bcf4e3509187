"""The release directory: the final model's files (hard links), the model card, the merge config,
results and plots, written atomically; never pickles, manifests or logs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from pipeline.config import STAGES
from pipeline.errors import ConfigError
from pipeline.evaluation.results import write_results
from pipeline.fsutil import atomic_output_dir, atomic_write_text
from pipeline.log import log
from pipeline.manifest import stage_dir
from pipeline.release.card import render_card
from pipeline.release.card_metadata import published_merge_yaml
from pipeline.release.gguf_card import render_gguf_card
from pipeline.release.record import (
    CARD_NAME,
    EXCLUDE_DIRS,
    EXCLUDE_NAMES,
    GGUF_RELEASE_DIR_NAME,
    LADDER_FILES,
    MERGEKIT_CONFIG_NAME,
    PICKLE_SUFFIXES,
    RELEASE_DIR_NAME,
    RESULTS_FILES,
    RunRecord,
    load_run,
)


def _excluded(rel: Path) -> Optional[str]:
    """Why a file of the model stage is left out of the release (None: it goes in)."""
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if rel.parts[0] in EXCLUDE_DIRS or any(p.startswith("checkpoint-") for p in rel.parts[:-1]):
        return "pipeline logs / resume state"
    if rel.name.lower().endswith(PICKLE_SUFFIXES):
        return "pickle"
    if len(rel.parts) == 1 and rel.name in EXCLUDE_NAMES:
        return "pipeline bookkeeping" if rel.name not in (CARD_NAME, MERGEKIT_CONFIG_NAME) else "regenerated"
    return None


def link_model_files(src: Path, dst: Path) -> list[tuple[str, str]]:
    """Hard-link (else copy) ``src``'s model files into ``dst``; returns [(file, why left out)]."""
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, files in os.walk(src):
        dirnames.sort()
        for name in sorted(files):
            s = Path(dirpath) / name
            rel = s.relative_to(src)
            why = _excluded(rel)
            if why:
                skipped.append((str(rel), why))
                continue
            d = dst / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
    return skipped


def check_model_files(model_dir: Path) -> None:
    """config.json and safetensors weights (every shard the index names) are there."""
    if not (model_dir / "config.json").is_file():
        raise ConfigError(str(model_dir), "has no config.json: not a Hugging Face model directory")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise ConfigError(str(model_dir), f"the safetensors index names missing shard(s) {missing}")
    elif not any(model_dir.glob("*.safetensors")):
        raise ConfigError(str(model_dir), "has no safetensors weights (pickle weights are never released)",
                          "re-save the model with save_pretrained(safe_serialization=True)")


def _check_out_dir(run: RunRecord, out: Path, *, replacing: bool) -> None:
    """Refuse to write into the run itself or a stage, or (``replacing``) to replace a directory
    that is not a release (one without README.md or mergekit_config.yml)."""
    o = out.expanduser().resolve()
    run_dir = run.run_dir.resolve()
    protected = {run_dir, *(stage_dir(run_dir, s).resolve() for s in STAGES), run.model_dir().resolve()}
    if o in protected or o in run_dir.parents:
        raise ConfigError(str(out), "is the run directory, a stage directory or one of their parents",
                          f"write the release elsewhere (default: {run.run_dir / RELEASE_DIR_NAME})")
    if o.exists() and not o.is_dir():
        raise ConfigError(str(out), "is a file", "give a directory")
    looks_released = (o / CARD_NAME).is_file() or (o / MERGEKIT_CONFIG_NAME).is_file()
    if replacing and o.exists() and any(o.iterdir()) and not looks_released:
        raise ConfigError(str(out), "exists and is not a release directory (no README.md or mergekit_config.yml); "
                          "building the release would replace it", "remove it or choose another output directory")


def _copy_replace(src: Path, dst: Path) -> None:
    """Copy to a temporary name, then rename: never writes through a hard link."""
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_release_docs(run: RunRecord, out: Path, card: Optional[str] = None) -> list[Path]:
    """README.md, mergekit_config.yml, results.json/results.md (from the eval's results) and the
    plots, into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / CARD_NAME, out / MERGEKIT_CONFIG_NAME]
    atomic_write_text(out / CARD_NAME, card if card is not None else render_card(run))
    atomic_write_text(out / MERGEKIT_CONFIG_NAME, published_merge_yaml(run))
    if run.results:
        write_results(run.results["stages"], out, chance=run.results.get("chance") or {},
                      leaderboard=run.results.get("leaderboard"))
        written += [out / n for n in RESULTS_FILES]
    for name in run.plots:
        _copy_replace(run.eval_dir / name, out / name)
        written.append(out / name)
    if run.ladder and (run.quantize_dir / "ladder.png").is_file():
        _copy_replace(run.quantize_dir / "ladder.png", out / "ladder.png")
        written.append(out / "ladder.png")
    return written


def build_release(run_dir: Path | str, out_dir: Path | str | None = None, *, repo_id: Optional[str] = None) -> Path:
    """``<run_dir>/release/`` (or ``out_dir``): the final model + card + merge config + results + plots.

    Written atomically (complete or not at all; an older release there is replaced). Loads with
    ``AutoModelForCausalLM.from_pretrained``; holds no manifest, logs or pickle.
    """
    return build_release_dirs(run_dir, out_dir, repo_id=repo_id)[0]


def build_release_dirs(run_dir: Path | str, out_dir: Path | str | None = None, *,
                       repo_id: Optional[str] = None) -> tuple[Path, Optional[Path]]:
    """``build_release``, and (into the run directory only) ``<run_dir>/release-gguf/`` when the
    quant ladder was made from the released model. Returns (release dir, GGUF release dir this call
    wrote or None). A ``release-gguf/`` left by an earlier build is removed when this build has no
    ladder of its model: it would be taken for the current model's files."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / RELEASE_DIR_NAME
    _check_out_dir(run, out, replacing=True)
    src = run.model_dir()
    check_model_files(src)
    card = render_card(run, repo_id=repo_id)
    with atomic_output_dir(out, overwrite=True) as tmp:
        skipped = link_model_files(src, tmp)
        check_model_files(tmp)
        write_release_docs(run, tmp, card)
    gguf_out = None
    if out_dir is None:
        stale = run.run_dir / GGUF_RELEASE_DIR_NAME
        if run.ladder:
            gguf_out = build_gguf_release(run, stale, repo_id=repo_id)
        elif stale.exists():
            shutil.rmtree(stale)
            log(f"removed {stale}: its GGUF files are not of the released {run.final_stage} model "
                "(no quant ladder of this model; run the quantize stage to make one)", where="release")
    left_out = sorted({rel.split("/", 1)[0] + ("/" if "/" in rel else "") for rel, why in skipped if why != "regenerated"})
    if left_out:
        log(f"left out of the release: {', '.join(left_out)}", where="release")
    log(f"{out} (the {run.final_stage} model, model card, mergekit config"
        + (", results" if run.results else "") + ")", where="release")
    return out, gguf_out


def build_gguf_release(run: RunRecord, out: Path, *, repo_id: Optional[str] = None) -> Path:
    """``<run_dir>/release-gguf/``: every rung's GGUF file (hard links) with its own README.md (the
    ladder and how to run each file) and the ladder's table and plot; published as <repo_id>-GGUF."""
    files = [r["file"] for r in run.ladder["rungs"]]
    with atomic_output_dir(out, overwrite=True) as tmp:
        for name in files:
            try:
                os.link(run.quantize_dir / name, tmp / name)  # no extra disk for GBs of GGUF files
            except OSError:
                shutil.copy2(run.quantize_dir / name, tmp / name)
        for name in LADDER_FILES:
            if (run.quantize_dir / name).is_file():
                shutil.copyfile(run.quantize_dir / name, tmp / name)
        atomic_write_text(tmp / CARD_NAME, render_gguf_card(run, repo_id=repo_id))
    log(f"{out} ({len(files)} GGUF files, their card and ladder)", where="release")
    return out


def regenerate_card(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Rewrite the card, merge config, results and plots of a release from the run's manifests
    (the model files, if any, are left as they are). Returns the files written."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / RELEASE_DIR_NAME
    _check_out_dir(run, out, replacing=False)
    return write_release_docs(run, out)

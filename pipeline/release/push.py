"""Uploading a release directory to the Hugging Face Hub; the token is read from the environment at
upload time and goes to the hub client only. ``run_release``: the release stage's build, then push
(the model repository, and the GGUF one when this build wrote it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from pipeline import hub
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.release.gguf_card import gguf_repo_id
from pipeline.release.package import build_release_dirs, check_model_files
from pipeline.release.record import CARD_NAME, EXCLUDE_DIRS, PICKLE_SUFFIXES, format_size


def check_push_settings(*, repo_id: Optional[str], dry_run: bool, token_env: str = "HF_TOKEN") -> None:
    """The user errors of a push, found before anything is built or uploaded (also for preflight)."""
    if not repo_id:
        raise ConfigError("release.repo_id", "is not set but release.push_to_hub is true",
                          "set release.repo_id=<user or org>/<name> (or release.push_to_hub=false)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError("release.repo_id", f"{repo_id!r} is not a valid hub repo id ({e})",
                          "use <user or org>/<name>: letters, digits, '-', '_', '.'") from None
    if not token_env or token_env.startswith("hf_") or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token_env):
        # Never echo the value: it may be a token pasted in the wrong place.
        raise ConfigError("release.token_env", "must be the name of an environment variable (like HF_TOKEN), "
                          "not a token", "put the token in the environment and name the variable here")
    if dry_run:
        return
    if hub.hub_offline():
        raise ConfigError("release.push_to_hub", "HF_HUB_OFFLINE is set: nothing can be uploaded",
                          "unset HF_HUB_OFFLINE, or set release.dry_run=true to list what would be uploaded")
    if not os.environ.get(token_env):
        raise ConfigError(token_env, "is not set: the hub token is read from this environment variable only",
                          f"export {token_env} (a token with write access), or set release.dry_run=true")


def release_files(release_dir: Path | str) -> list[tuple[str, int]]:
    """[(path in the repo, size in bytes)] of what an upload sends, after checking the directory is a release."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise ConfigError(str(release_dir), "does not exist", "build it first (pipeline.release.build_release)")
    files = sorted(
        (str(p.relative_to(release_dir)), p.stat().st_size) for p in release_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(release_dir).parts)
    )
    names = {f for f, _ in files}
    bad = sorted(f for f in names if Path(f).name == "manifest.json" or f.lower().endswith(PICKLE_SUFFIXES)
                 or f.split("/", 1)[0] in EXCLUDE_DIRS)
    if bad:
        raise ConfigError(str(release_dir), f"holds files a release must not: {bad}",
                          "push a directory made by build_release, not a stage directory")
    if CARD_NAME not in names:
        raise ConfigError(str(release_dir), "has no README.md (model card)", "build it with build_release")
    if not any(f.endswith(".gguf") for f in names):  # a GGUF release holds .gguf files instead
        check_model_files(release_dir)
    return files


def push_release(release_dir: Path | str, *, repo_id: Optional[str], private: bool = True, dry_run: bool = False,
                 token_env: str = "HF_TOKEN", commit_message: Optional[str] = None) -> list[str]:
    """Upload ``release_dir`` to the hub model repo ``repo_id`` (created if missing; ``private``
    applies to a new repo). Returns the files (paths in the repo) uploaded, or that would be.

    ``dry_run``: print the repo id and the files with their sizes; no network, no token needed.
    The token comes from the environment variable ``token_env`` and goes to the hub client only.
    """
    check_push_settings(repo_id=repo_id, dry_run=dry_run, token_env=token_env)
    files = release_files(release_dir)
    total = sum(size for _, size in files)
    verb = "would upload" if dry_run else "uploading"
    log(f"{verb} {len(files)} files ({format_size(total)}) to https://huggingface.co/{repo_id} "
        f"({'private' if private else 'public'} if created)", where="release")
    for rel, size in files:
        print(f"  {rel}  {format_size(size)}", flush=True)
    if dry_run:
        if not os.environ.get(token_env):
            log(f"dry run: {token_env} is not set; a real push needs it", where="release")
        return [rel for rel, _ in files]

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=os.environ[token_env])
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=str(release_dir), repo_type="model",
                          commit_message=commit_message or f"Upload {Path(release_dir).name} (dus-pipeline)",
                          ignore_patterns=[".*", "*/.*"])
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ConfigError(token_env, f"the hub refused the token for {repo_id} (HTTP {status})",
                              "use a token with write access to that user or organisation") from None
        raise
    log(f"pushed to {url}", where="release")
    return [rel for rel, _ in files]


def run_release(*, run_dir: Path, push_to_hub: bool, repo_id: Optional[str], private: bool, dry_run: bool,
                token_env: str) -> Path:
    """Build ``<run_dir>/release``, then push it when ``push_to_hub``."""
    if push_to_hub:
        check_push_settings(repo_id=repo_id, dry_run=dry_run, token_env=token_env)
    out, gguf = build_release_dirs(Path(run_dir), repo_id=repo_id)
    if push_to_hub:
        push_release(out, repo_id=repo_id, private=private, dry_run=dry_run, token_env=token_env)
        if gguf is not None:  # the quant ladder this build wrote, as its own repository (the common GGUF layout)
            push_release(gguf, repo_id=gguf_repo_id(repo_id), private=private, dry_run=dry_run, token_env=token_env)
    return out

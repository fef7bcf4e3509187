"""The release: the final model as a directory ready for the Hugging Face Hub, and its upload.

- ``record.py``: the run as the release sees it (manifests, merge config, eval results);
- ``card.py``: the model card rendered from that record;
- ``package.py``: ``<run_dir>/release/`` (model files hard-linked, card, merge config, results, plots);
- ``push.py``: the upload (token from the environment, dry run lists the files);
- ``cli.py``: ``python -m pipeline.report RUN_DIR`` (regenerate the card without running anything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.release.card import gguf_repo_id
from pipeline.release.package import build_release_dirs
from pipeline.release.push import check_push_settings, push_release


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

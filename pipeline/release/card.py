"""The model card of a run, rendered from its record (manifests, merge config, eval results).

The release (``pipeline.release.package.build_release``) writes ``<run_dir>/release/``:

* the files of the last enabled model stage of the run's chain: weights (safetensors), config.json,
  generation_config.json, tokenizer and chat template;
* ``README.md``: the model card (``build_model_card``), in the form the hub uses for merges
  (mergekit's sections and ``base_model``/``tags`` metadata), plus how it was trained and evaluated;
* ``mergekit_config.yml`` (the merge as done), ``results.json``/``results.md`` and the eval plots.

Left out: the pipeline's bookkeeping (``manifest.json``, ``logs/``: they hold local paths and
per-rank records; everything useful from them is in the card), checkpoints, and pickle files
(``training_args.bin`` and any ``*.bin``/``*.pt``/``*.pth``/``*.pkl``): a release holds no code
that runs at load time.

Everything in the card comes from the run directory: the stage manifests,
``01_merge/mergekit_config.yml``, ``05_eval/results.json`` and the ``release`` section of the run's
``config.yaml`` (license/language/repo id overrides). Nothing is re-run, so ``python -m
pipeline.report RUN_DIR`` regenerates the same card at any time.

The parts: ``card_metadata.py`` (model names, front matter, license and language),
``card_sections.py`` (the body sections), ``gguf_card.py`` (the quantized versions and the GGUF
repository's card), ``card_format.py`` (numbers and tables).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipeline.release.card_metadata import TRAINED_STAGES, card_metadata
from pipeline.release.card_sections import (
    evaluation_section,
    intro_section,
    merge_section,
    provenance_section,
    training_section,
    usage_section,
)
from pipeline.release.gguf_card import quantized_section
from pipeline.release.record import RunRecord, load_run


def render_card(run: RunRecord, *, license: Optional[str] = None, language: Any = None,
                 repo_id: Optional[str] = None) -> str:
    from huggingface_hub import ModelCardData

    repo_id = repo_id or run.release_cfg.get("repo_id")
    meta, notes = card_metadata(run, license=license, language=language)
    title = repo_id.split("/")[-1] if repo_id else (run.run_name or run.run_dir.name)
    body: list[str] = [*intro_section(run, title), "", *merge_section(run), "", "## Training Details", ""]
    trained = [s for s in TRAINED_STAGES if s in run.manifests]
    if not trained:
        body += ["The merged model was not trained further.", ""]
    for stage in trained:
        body += [*training_section(run, stage), ""]
    body += [*evaluation_section(run), "", *quantized_section(run, repo_id), "", *usage_section(run, repo_id), "",
             "## License and Language", "", *(f"- {n}" for n in notes), "", *provenance_section(run)]
    front = ModelCardData(**meta).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"


def build_model_card(run_dir: Path | str, *, license: Optional[str] = None, language: Any = None,
                     repo_id: Optional[str] = None) -> str:
    """The model card (README.md text) of a run, from its manifests alone.

    ``license``/``language``/``repo_id`` override the run config's ``release.*`` values, which
    override what is carried from the base model's card (see ``card_metadata``).
    """
    return render_card(load_run(run_dir), license=license, language=language, repo_id=repo_id)

"""The release: the final model as a directory ready for the Hugging Face Hub, and its upload.

- ``record.py``: the run as the release sees it (manifests, merge config, eval results);
- ``card.py``: the model card rendered from that record, from its parts: ``card_metadata.py`` (model
  names, front matter, license and language), ``card_sections.py`` (the body sections),
  ``gguf_card.py`` (the quantized versions and the GGUF repository's card), ``card_format.py``;
- ``package.py``: ``<run_dir>/release/`` (model files hard-linked, card, merge config, results, plots);
- ``push.py``: the upload (token from the environment, dry run lists the files), and ``run_release``
  (build, then push), the release stage's entry point.

``python -m pipeline.report RUN_DIR`` regenerates the card without running anything.
"""

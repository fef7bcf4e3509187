"""What the model card says about where the model came from: the names of the merged models (a local
directory by its name, never its path), the merge config as published, and the front matter
(``base_model``, license, language, tags, datasets) with the sentences saying where license and
language came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline import hub
from pipeline.data import is_hub_dataset_name
from pipeline.release.record import BASE_TAGS, CARD_NAME, HUB_REPO, RunRecord


def is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


def is_hub_repo(ref: str) -> bool:
    return not is_local_ref(ref) and bool(HUB_REPO.match(ref))


def _base_name(base: dict) -> Optional[str]:
    model = (base.get("config") or {}).get("model") or {}
    return model.get("name_or_path") or base.get("model_dir")


def model_name(ref: Optional[str], base: dict) -> str:
    """A model reference as it should appear in the card: hub ids as they are (no @revision),
    local directories by their name; the base model's resolved directory by the base's name."""
    base_dir = base.get("model_dir")
    if ref is None or (base_dir and (ref == base_dir or same_path(ref, base_dir))):
        ref = _base_name(base) or "base model"
    ref = str(ref)
    if is_local_ref(ref):
        return Path(ref.rstrip("/")).expanduser().name
    return ref.split("@", 1)[0]


def same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def merged_models(run: RunRecord) -> list[tuple[str, str]]:
    """(reference as in mergekit_config.yml, name) of every model the merge used, in order."""
    spec = yaml.safe_load(run.merge_yaml) or {}
    refs: list[str] = []
    for s in spec.get("slices") or []:
        for src in s.get("sources") or []:
            refs.append(src.get("model"))
    for m in spec.get("models") or []:
        refs.append(m.get("model"))
    if spec.get("base_model"):
        refs.append(spec["base_model"])
    out: list[tuple[str, str]] = []
    for ref in refs:
        if ref is not None and ref not in [r for r, _ in out]:
            out.append((str(ref), model_name(str(ref), run.base)))
    return out


def gguf_source(base: dict) -> Optional[dict]:
    """The GGUF import record of a base read from a GGUF file (the base stage's ``gguf_source``
    metric: file name, quant type, dtype, license from its metadata), else None."""
    source = (base.get("metrics") or {}).get("gguf_source")
    return source if isinstance(source, dict) and source.get("source_file") else None


def gguf_weights_note(source: dict) -> str:
    quant = source.get("source_quant_type")
    return f"{quant + ', ' if quant else ''}dequantized to {source.get('dtype') or 'float32'}"


def published_merge_yaml(run: RunRecord) -> str:
    """The merge config as it is published: each local model directory replaced by the name the card
    gives it (a hub id stays as it is). A path on the machine that made the model means nothing to a
    reader, and may say more about that machine than its owner meant to publish. A base read from a
    GGUF file is named by its model, and a comment says the weights are that file's, dequantized."""
    text = run.merge_yaml
    for ref, name in merged_models(run):
        if is_local_ref(ref):
            text = text.replace(ref, name)
    source = gguf_source(run.base)
    if source:
        text = (f"# {model_name(None, run.base)}: weights from {source['source_file']} "
                f"({gguf_weights_note(source)}), not the original checkpoint's\n") + text
    return text


# Training stages the card describes, in pipeline order, with their section titles.
TRAINED_STAGES = {"cpt": "Continued pretraining (cpt)", "sft": "Supervised fine-tuning (sft)",
                  "dpo": "Preference alignment (dpo)"}


def _base_card_metadata(base: dict) -> tuple[dict, str]:
    """(front matter of the base model's README.md, where it came from); ({}, "") if none.

    A local base: its directory. A hub base: the HF cache, else (online only) a download of the
    README alone. Never fails the release: a card that cannot be read counts as absent.
    """
    ref = base.get("model_dir")
    if not ref:
        return {}, ""
    from huggingface_hub.repocard import metadata_load

    path: Optional[Path] = None
    if is_local_ref(ref):
        p = Path(ref).expanduser() / CARD_NAME
        path = p if p.is_file() else None
    elif is_hub_repo(ref.split("@", 1)[0]):
        repo, _, rev = ref.partition("@")
        rev = rev or next((i.get("revision") for i in base.get("inputs", []) if i.get("revision")), None)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, CARD_NAME, revision=rev)
            if isinstance(cached, str):
                path = Path(cached)
            elif not hub.hub_offline():
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(repo, CARD_NAME, revision=rev))
        except Exception:  # noqa: BLE001 - no card (or no network) only means no license to carry
            path = None
    if path is None:
        return {}, ""
    try:
        return dict(metadata_load(path) or {}), "the base model's card"
    except Exception:  # noqa: BLE001 - an unparsable base card counts as absent
        return {}, ""


def _base_config_license(base: dict) -> Optional[str]:
    ref = base.get("model_dir")
    if not ref or not is_local_ref(ref):
        return None
    try:
        import json

        value = json.loads((Path(ref).expanduser() / "config.json").read_text()).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def card_metadata(run: RunRecord, *, license: Optional[str] = None, language: Any = None) -> tuple[dict, list[str]]:
    """(front matter, sentences saying where license and language came from).

    license: ``license`` argument > ``release.license`` of the run config > the base model card's
    ``license`` (with ``license_name``/``license_link`` when it is ``other``) > a ``license`` in the
    base's config.json > omitted (never guessed; the card says to set ``release.license``).
    language: argument > ``release.language`` > the base card's ``language`` > ``en`` for the demo
    base (trained here on the English demo corpus) > omitted.
    """
    base_card, card_src = _base_card_metadata(run.base)
    base_name = model_name(None, run.base)
    notes: list[str] = []
    meta: dict[str, Any] = {"base_model": [name for _, name in merged_models(run)] or [base_name]}

    lic = license or run.release_cfg.get("license")
    source = gguf_source(run.base)
    if lic:
        meta["license"] = lic
        notes.append(f"License `{lic}`: set by `release.license`; check it is compatible with the base model's license.")
    elif source and source.get("license"):
        meta["license"] = str(source["license"]).strip().lower()
        notes.append(f"License `{meta['license']}`: from the metadata (`general.license`) of `{source['source_file']}`, "
                     f"the GGUF file the base model's weights were read from.")
    elif base_card.get("license"):
        meta["license"] = base_card["license"]
        for key in ("license_name", "license_link"):
            if base_card.get(key):
                meta[key] = base_card[key]
        notes.append(f"License `{meta['license']}`: carried from {card_src} ({base_name}); "
                     "a depth up-scaled model is a derivative of its base model's weights.")
    elif (cfg_lic := _base_config_license(run.base)):
        meta["license"] = cfg_lic
        notes.append(f"License `{cfg_lic}`: carried from the base model's config.json ({base_name}).")
    else:
        notes.append(f"License: none stated. The base model ({base_name}) has no card with a `license` field "
                     "here, so none is claimed; set `release.license` (the base model's license, and the "
                     "training data's terms) before publishing.")

    lang = language or run.release_cfg.get("language") or base_card.get("language")
    if lang:
        src = "set by `release.language`" if (language or run.release_cfg.get("language")) else f"from {card_src}"
    elif ((run.base.get("config") or {}).get("model") or {}).get("demo"):
        lang, src = ["en"], "the demo base model was trained here on an English corpus"
    else:
        src = ""
    if lang:
        meta["language"] = [lang] if isinstance(lang, str) else list(lang)
        notes.append(f"Language {', '.join(meta['language'])}: {src}.")

    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = list(BASE_TAGS)
    sft = run.manifests.get("sft")
    if sft:
        tags.append("sft")
        if ((sft.get("config") or {}).get("sft") or {}).get("use_lora"):
            tags.append("lora")
    if "dpo" in run.manifests:
        tags.append("dpo")
    meta["tags"] = tags
    datasets = []
    for stage in TRAINED_STAGES:
        for inp in (run.manifests.get(stage) or {}).get("inputs", []):
            if inp.get("role") == "data" and is_hub_dataset(inp.get("path", "")):
                name = inp["path"].split(":", 1)[0]
                if name not in datasets:
                    datasets.append(name)
    if datasets:
        meta["datasets"] = datasets
    return meta, notes


def is_hub_dataset(name: str) -> bool:
    return bool(name) and is_hub_dataset_name(name)

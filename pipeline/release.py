"""The release step: the final model as a directory ready for the Hugging Face Hub, and its upload.

``build_release(run_dir)`` writes ``<run_dir>/release/`` (atomically, hard links where possible):

* the files of the last model stage (sft, else cpt, else merge): weights (safetensors), config.json,
  generation_config.json, tokenizer and chat template;
* ``README.md``: the model card (``build_model_card``), in the form the hub uses for merges
  (mergekit's sections and ``base_model``/``tags`` metadata), plus how it was trained and evaluated;
* ``mergekit_config.yml`` (the merge as done), ``results.json``/``results.md`` and the eval plots.

Left out: the pipeline's bookkeeping (``manifest.json``, ``logs/``: they hold local paths and
per-rank records; everything useful from them is in the card), checkpoints, and pickle files
(``training_args.bin`` and any ``*.bin``/``*.pt``/``*.pth``/``*.pkl``): a release holds no code
that runs at load time.

Everything in the card comes from the run directory: the stage manifests,
``01_merge/mergekit_config.yml``, ``04_eval/results.json`` and the ``release`` section of the run's
``config.yaml`` (license/language/repo id overrides). Nothing is re-run, so ``python -m
pipeline.report RUN_DIR`` regenerates the same card at any time.

``push_release`` uploads the directory with ``HfApi.create_repo`` + ``upload_folder``. The token is
read from an environment variable (``HF_TOKEN``) at upload time and passed to the client only.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pipeline.config import STAGES
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_output_dir, atomic_write_text
from pipeline.manifest import read_manifest, resolve_model_dir, stage_dir

RELEASE_DIR_NAME = "release"
CARD_NAME = "README.md"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"
RESULTS_FILES = ("results.json", "results.md")
PLOTS = (
    ("training.png", "Training loss across cpt and sft, with each stage's held-out perplexity"),
    ("tasks.png", "Every metric by stage"),
)
PAPER_URL = "https://arxiv.org/abs/2312.15166"
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
MODEL_STAGES = ("merge", "cpt", "sft")  # stages whose directory is a model, in pipeline order
BASE_TAGS = ("mergekit", "merge", "depth-upscaling")

# Not copied into a release: pipeline bookkeeping, resume state, and pickles (code run at load time).
_EXCLUDE_NAMES = {"manifest.json", "merge_metrics.json", "build_metrics.json", "trainer_state.json",
                  "training_args.bin", CARD_NAME, MERGEKIT_CONFIG_NAME}
_EXCLUDE_DIRS = {"logs", "checkpoints", "runs", "__pycache__"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def log(msg: str) -> None:
    print(f"[dus] release: {msg}", flush=True)


# ------------------------------------------------------------------------------------- the run


@dataclass
class RunRecord:
    """What a finished run directory says about itself (read once, checked for consistency)."""

    run_dir: Path
    manifests: dict[str, dict]  # completed stages only
    final_stage: str  # the stage whose model is released
    merge_yaml: str  # 01_merge/mergekit_config.yml, verbatim
    results: Optional[dict]  # {"stages": {stage: metrics}, "chance": {...}} or None (no eval)
    plots: list[str] = field(default_factory=list)  # plot files present in 04_eval
    release_cfg: dict = field(default_factory=dict)  # the `release` section of <run_dir>/config.yaml
    run_name: str = ""  # run_name of <run_dir>/config.yaml, else the directory's name

    @property
    def base(self) -> dict:
        return self.manifests.get("base") or {}

    @property
    def eval_dir(self) -> Path:
        return stage_dir(self.run_dir, "eval")

    def model_dir(self) -> Path:
        return Path(resolve_model_dir(self.run_dir, self.final_stage, self.manifests[self.final_stage]))


def load_run(run_dir: Path | str) -> RunRecord:
    """Read the manifests of ``run_dir`` and check they describe one chain of results.

    ConfigError when there is no merge, or when a later stage (or the eval) was made from an
    earlier stage's result that has since been replaced (a partial re-run): the card would
    describe a model that is not the one released.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(str(run_dir), "is not a directory", "give the run directory (e.g. outputs/demo)")
    manifests = {s: m for s in STAGES if (m := read_manifest(stage_dir(run_dir, s))) is not None}
    if "merge" not in manifests:
        raise ConfigError(str(stage_dir(run_dir, "merge")), "no completed merge stage in this run directory: nothing to release",
                          "run the pipeline first (`python -m pipeline`, stage=all)")
    for stage in (*MODEL_STAGES, "eval"):
        m = manifests.get(stage)
        for inp in (m or {}).get("inputs", []):
            prev = inp.get("stage")
            if prev is None or (prev not in MODEL_STAGES and prev != "base"):
                continue
            pm = manifests.get(prev)
            if pm is None or pm.get("key") != inp.get("sha256"):
                now = "is gone" if pm is None else "has been re-run since"
                raise ConfigError(
                    str(stage_dir(run_dir, stage)),
                    f"was made from a {prev} result that {now} ({stage_dir(run_dir, prev).name}/): "
                    f"it does not belong to the models in this run directory",
                    f"re-run `python -m pipeline stage={stage}` with this run directory, "
                    f"or delete {stage_dir(run_dir, stage).name}/ if {stage} is no longer part of the run",
                )
    final_stage = [s for s in MODEL_STAGES if s in manifests][-1]
    yml = stage_dir(run_dir, "merge") / MERGEKIT_CONFIG_NAME
    if not yml.is_file():
        raise ConfigError(str(yml), "is missing: the merge stage writes it", "re-run `python -m pipeline stage=merge`")
    results, plots = None, []
    if "eval" in manifests:
        eval_dir = stage_dir(run_dir, "eval")
        results = _read_results(eval_dir, manifests["eval"])
        plots = [name for name, _ in PLOTS if (eval_dir / name).is_file()]
    cfg = _run_config(run_dir)
    release_cfg = cfg.get("release") if isinstance(cfg.get("release"), dict) else {}
    return RunRecord(run_dir=run_dir, manifests=manifests, final_stage=final_stage, merge_yaml=yml.read_text(),
                     results=results, plots=plots, release_cfg=release_cfg,
                     run_name=str(cfg.get("run_name") or run_dir.name))


def _read_results(eval_dir: Path, manifest: dict) -> dict:
    """results.json of the eval stage; its manifest's metrics (no chance levels) when that is gone."""
    import json

    path = eval_dir / "results.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("stages"), dict):
            return {"stages": data["stages"], "chance": data.get("chance") or {}}
    return {"stages": dict(manifest.get("metrics") or {}), "chance": {}}


def _run_config(run_dir: Path) -> dict:
    """The run's resolved config (``<run_dir>/config.yaml``, written by the driver); {} if none."""
    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


# ------------------------------------------------------------------------------------ the card


def _is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


def _is_hub_repo(ref: str) -> bool:
    return not _is_local_ref(ref) and bool(_HUB_REPO.match(ref))


def _base_name(base: dict) -> Optional[str]:
    model = (base.get("config") or {}).get("model") or {}
    return model.get("name_or_path") or base.get("model_dir")


def _model_name(ref: Optional[str], base: dict) -> str:
    """A model reference as it should appear in the card: hub ids as they are (no @revision),
    local directories by their name; the base model's resolved directory by the base's name."""
    base_dir = base.get("model_dir")
    if ref is None or (base_dir and (ref == base_dir or _same_path(ref, base_dir))):
        ref = _base_name(base) or "base model"
    ref = str(ref)
    if _is_local_ref(ref):
        return Path(ref.rstrip("/")).expanduser().name
    return ref.split("@", 1)[0]


def _same_path(a: str, b: str) -> bool:
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
            out.append((str(ref), _model_name(str(ref), run.base)))
    return out


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
    if _is_local_ref(ref):
        p = Path(ref).expanduser() / CARD_NAME
        path = p if p.is_file() else None
    elif _is_hub_repo(ref.split("@", 1)[0]):
        repo, _, rev = ref.partition("@")
        rev = rev or next((i.get("revision") for i in base.get("inputs", []) if i.get("revision")), None)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, CARD_NAME, revision=rev)
            if isinstance(cached, str):
                path = Path(cached)
            elif not _hub_offline():
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
    if not ref or not _is_local_ref(ref):
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
    base_name = _model_name(None, run.base)
    notes: list[str] = []
    meta: dict[str, Any] = {"base_model": [name for _, name in merged_models(run)] or [base_name]}

    lic = license or run.release_cfg.get("license")
    if lic:
        meta["license"] = lic
        notes.append(f"License `{lic}`: set by `release.license`; check it is compatible with the base model's license.")
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
    meta["tags"] = tags
    datasets = []
    for stage in ("cpt", "sft"):
        for inp in (run.manifests.get(stage) or {}).get("inputs", []):
            if inp.get("role") == "data" and _is_hub_dataset(inp.get("path", "")):
                name = inp["path"].split(":", 1)[0]
                if name not in datasets:
                    datasets.append(name)
    if datasets:
        meta["datasets"] = datasets
    return meta, notes


def _is_hub_dataset(name: str) -> bool:
    from pipeline.data import is_hub_dataset_name

    return bool(name) and is_hub_dataset_name(name)


def _int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "–"


def _human(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in rows if v not in (None, ""))]


def _layer_runs(layer_map: list, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """[(output layers, source model, source layers)] with consecutive layers grouped."""
    runs: list[list] = []
    for out_i, (model, layer) in enumerate(layer_map):
        if runs and runs[-1][2] == model and runs[-1][4] == layer - 1 and runs[-1][1] == out_i - 1:
            runs[-1][1], runs[-1][4] = out_i, layer
        else:
            runs.append([out_i, out_i, model, layer, layer])
    span = lambda a, b: f"{a}" if a == b else f"{a}–{b}"  # noqa: E731
    return [(span(a, b), names.get(m, _model_name(m, {})), span(c, d)) for a, b, m, c, d in runs]


def _merge_section(run: RunRecord) -> list[str]:
    m = run.manifests["merge"]
    metrics = m.get("metrics") or {}
    models = merged_models(run)
    names = dict(models)
    base_name = _model_name(None, run.base)
    names.setdefault(run.base.get("model_dir") or "", base_name)
    method = metrics.get("merge_method") or (yaml.safe_load(run.merge_yaml) or {}).get("merge_method", "passthrough")
    lines = [
        "## Merge Details",
        "",
        f"This is a merge of pre-trained language models, made with dus-pipeline's passthrough merge, which "
        f"writes its configuration in [mergekit]({MERGEKIT_URL})'s format (`mergekit_config.yml`, below and in "
        f"this repository).",
        "",
        "### Merge Method",
        "",
        f"This model was merged using the {method} merge method: slices of the source models' layer stacks "
        "are stacked in order, and no weights are averaged.",
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
    ]
    for ref, name in models:
        link = f"[{name}](https://huggingface.co/{name})" if _is_hub_repo(name) else name
        where = f" (the local directory `{ref}` in the configuration below)" if _is_local_ref(ref) else ""
        lines.append(f"* {link}{where}")
    lines += ["", "### Resulting Model", ""]
    layers_in = metrics.get("num_layers_in") or {}
    depth_in = ", ".join(f"{names.get(r, _model_name(r, run.base))}: {n}" for r, n in layers_in.items())
    final = run.manifests[run.final_stage].get("metrics") or {}
    rows = [
        ("layers", f"{depth_in or '?'} → **{metrics.get('num_hidden_layers', '?')}**"),
        ("parameters", f"{_int(metrics.get('num_parameters'))} ({_human(metrics.get('num_parameters'))})"
         if metrics.get("num_parameters") else ""),
        ("dtype of the merge", str(metrics.get("dtype") or "")),
        ("layers inserted (zero-initialised copies)", ", ".join(map(str, metrics.get("new_layers") or []))),
        ("parameters of the released model", _int(final.get("num_parameters"))
         if run.final_stage != "merge" and final.get("num_parameters") not in (None, metrics.get("num_parameters")) else ""),
    ]
    lines += _table(rows)
    if metrics.get("layer_map"):
        lines += ["", "Layer map (output layer ← source layer):", "",
                  "| output layers | source model | source layers |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in _layer_runs(metrics["layer_map"], names)]
    for w in metrics.get("warnings") or []:
        lines += ["", f"> Merge warning: {w}"]
    lines += [
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        run.merge_yaml.rstrip("\n"),
        "```",
    ]
    return lines


def _data_cell(inputs: list[dict]) -> str:
    parts = []
    for inp in inputs:
        if inp.get("role") != "data":
            continue
        path = str(inp.get("path", ""))
        if _is_hub_dataset(path):
            name = path.split(":", 1)[0]
            parts.append(f"[{path}](https://huggingface.co/datasets/{name})")
        else:
            parts.append(f"`{Path(path).name}` (sha256 `{str(inp.get('sha256', ''))[:12]}`)")
    return ", ".join(parts)


def _warmup(v: Any) -> str:
    if not v:
        return "no warmup"
    return f"warmup {v:.0%} of the steps" if 0 < v < 1 else f"warmup {int(v)} steps"


def _training_section(run: RunRecord, stage: str) -> list[str]:
    m = run.manifests[stage]
    cfg = m.get("config") or {}
    tc, data, dist = cfg.get(stage) or {}, cfg.get("data") or {}, cfg.get("distributed") or {}
    mt = m.get("metrics") or {}
    world = mt.get("world_size") or dist.get("num_processes") or 1
    per_dev, accum = tc.get("per_device_train_batch_size"), tc.get("gradient_accumulation_steps") or 1
    seq = tc.get("seq_len") if stage == "cpt" else tc.get("max_length")
    batch = ""
    if per_dev:
        seqs = per_dev * accum * world
        batch = f"{per_dev} per device × {accum} accumulation × {world} processes = {seqs} sequences"
        if stage == "cpt" and seq:
            batch += f" ({_int(seqs * seq)} tokens) per optimizer step"
        else:
            batch += " per optimizer step"
    title = "Continued pretraining (cpt)" if stage == "cpt" else "Supervised fine-tuning (sft)"
    tokens = _int(mt.get("tokens_seen"))
    if stage == "sft" and mt.get("num_input_tokens_seen"):
        tokens += f" (batch × max length × steps; {_int(mt['num_input_tokens_seen'])} of them non-padding)"
    heldout = data.get("heldout_fraction")
    if stage == "cpt" and mt.get("data_blocks"):
        records = f"{_int(mt['data_blocks'])} packed blocks of {seq} tokens"
        if heldout:
            records += f"; {heldout:.0%} of the corpus records held out for evaluation (chosen by content hash)"
    elif stage == "sft" and mt.get("data_train_examples") is not None:
        records = f"{_int(mt['data_train_examples'])} conversations"
        if mt.get("data_heldout_examples") is not None:
            records += (f"; {_int(mt['data_heldout_examples'])} more held out for evaluation"
                        + (f" ({heldout:.0%}, chosen by content hash)" if heldout else ""))
    else:
        records = ""
    trainable, total = mt.get("trainable_parameters"), mt.get("num_parameters")
    train_cell = ""
    if trainable and total:
        train_cell = (f"{_int(trainable)} of {_int(total)} (all)" if trainable == total
                      else f"{_int(trainable)} of {_int(total)} ({trainable / total:.2%})")
        sel = [f"layers {tc['trainable_layers']}" if tc.get("trainable_layers") else "",
               f"patterns {tc['trainable_patterns']}" if tc.get("trainable_patterns") else "",
               f"the layers the merge {tc['trainable_from_merge']}" if tc.get("trainable_from_merge") else ""]
        if any(sel):
            train_cell += ": " + ", ".join(s for s in sel if s)
    method = ""
    if stage == "sft":
        method = (f"LoRA (r {tc.get('lora_r')}, alpha {tc.get('lora_alpha')}, dropout {tc.get('lora_dropout')}, "
                  f"on {tc.get('lora_target_modules')}), merged into the released weights"
                  if tc.get("use_lora") else "full fine-tuning")
        method += "; loss on assistant tokens only" if tc.get("assistant_only_loss") else "; loss on all tokens"
        method += "; packed" if tc.get("packing") else ""
    zero = mt.get("zero_stage", dist.get("zero_stage"))
    hardware = (f"{world} process{'es' if world != 1 else ''} on {dist.get('num_machines', 1)} machine"
                f"{'s' if dist.get('num_machines', 1) != 1 else ''}, {mt.get('precision', '?')}, "
                + (f"DeepSpeed ZeRO-{zero}" if zero is not None else "no DeepSpeed")
                + (f", {mt['attn_implementation']} attention" if mt.get("attn_implementation") else ""))
    v = mt.get("verification") or {}
    check = ""
    if v.get("trained_fixed_batch_loss") is not None:
        check = (f"the saved model, reloaded in a fresh process, gives the trained model's loss on a fixed batch "
                 f"({v['trained_fixed_batch_loss']:.4f} vs {v['reloaded_fixed_batch_loss']:.4f}, "
                 f"difference {v.get('abs_diff', 0):.1e}, tolerance {v.get('rtol')} relative)")
    lr = tc.get("learning_rate")
    rows = [
        ("data", _data_cell(m.get("inputs", []))),
        ("training records", records),
        ("method", method),
        ("tokens seen", tokens),
        ("optimizer steps", f"{_int(mt.get('global_step'))}" + (f" ({mt['epoch']:.2f} epochs)" if mt.get("epoch") else "")),
        ("sequence length" if stage == "cpt" else "max length", str(seq) if seq else ""),
        ("batch", batch),
        ("learning rate", f"{lr:g}, {tc.get('lr_scheduler_type', '')} schedule, {_warmup(tc.get('warmup_steps'))}" if lr else ""),
        ("weight decay / max grad norm", f"{tc.get('weight_decay')} / {tc.get('max_grad_norm')}" if "weight_decay" in tc else ""),
        ("trainable parameters", train_cell),
        ("train loss (mean over the run)", f"{mt['train_loss']:.4f}" if isinstance(mt.get("train_loss"), (int, float)) else ""),
        ("hardware", hardware),
        ("wall time", f"{_duration(mt.get('train_runtime'))} training, {_duration(m.get('wall_time_s'))} for the stage"),
        ("reload check", check),
        ("resumed from a checkpoint", "yes" if mt.get("resumed_from") else ""),
        ("seed", str(tc.get("seed", ""))),
    ]
    return [f"### {title}", "", *_table(rows)]


def _evaluation_section(run: RunRecord) -> list[str]:
    lines = ["## Evaluation", ""]
    if not run.results:
        return lines + ["This run has no evaluation (its eval stage did not run)."]
    from pipeline.evaluate import results_markdown

    stages, chance = run.results["stages"], run.results.get("chance") or {}
    lines += [
        "Every stage's model on the same held-out data, computed by the pipeline's eval stage "
        f"(`results.json` in this repository). The released model is the **{run.final_stage}** row.",
        "",
    ]
    if run.final_stage not in stages:
        lines += [f"The released model ({run.final_stage}) was not among the evaluated stages.", ""]
    md = results_markdown(stages, chance=chance)
    body = md.split("\n", 1)[1].lstrip("\n") if md.startswith("# ") else md
    lines.append(body.rstrip("\n"))
    for name, alt in PLOTS:
        if name in run.plots:
            lines += ["", f"![{alt}]({name})"]
    return lines


def _usage_section(run: RunRecord, repo_id: Optional[str]) -> list[str]:
    model_id = repo_id or "path/to/release"
    code = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{model_id}"',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id)",
    ]
    if "sft" in run.manifests:
        code += [
            'messages = [{"role": "user", "content": "Explain depth up-scaling in one sentence."}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        ]
    else:
        code += ['inputs = tokenizer("Depth up-scaling is", return_tensors="pt")']
    code += [
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]
    return ["## How to Use", "", *code]


def _provenance_section(run: RunRecord) -> list[str]:
    final = run.manifests[run.final_stage]
    versions = final.get("versions") or {}
    lines = ["## Reproducibility", ""]
    if final.get("git_commit"):
        lines.append(f"Made with dus-pipeline at commit `{final['git_commit']}` (stages: "
                     f"{', '.join(s for s in STAGES if s in run.manifests)}).")
    if versions:
        lines += ["", "### Framework versions", ""]
        lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += ["", "Files: the model (safetensors), config and tokenizer; `mergekit_config.yml`; "
              "`results.json`/`results.md`" + (" and the plots" if run.plots else "") + ". The pipeline's "
              "manifests and logs are not included; this card carries what they record."]
    return lines


def _intro(run: RunRecord, title: str) -> list[str]:
    merge = run.manifests["merge"].get("metrics") or {}
    base_name = _model_name(None, run.base)
    depth_in = list((merge.get("num_layers_in") or {}).values())
    grown = (f"from {depth_in[0]} to {merge.get('num_hidden_layers')} layers"
             if len(depth_in) == 1 and merge.get("num_hidden_layers") else "in depth")
    steps = []
    if "cpt" in run.manifests:
        steps.append(f"continued pretraining on {_int((run.manifests['cpt'].get('metrics') or {}).get('tokens_seen'))} tokens")
    if "sft" in run.manifests:
        lora = ((run.manifests["sft"].get("config") or {}).get("sft") or {}).get("use_lora")
        steps.append("supervised fine-tuning" + (" (LoRA, merged)" if lora else ""))
    after = f", followed by {' and '.join(steps)}" if steps else " (not trained further)"
    params = merge.get("num_parameters")
    return [
        f"# {title}",
        "",
        f"`{base_name}` grown {grown} by depth up-scaling"
        + (f" ({_human(params)} parameters)" if params else "") + after + ".",
        "",
        f"Depth up-scaling (DUS), introduced with SOLAR 10.7B ([Kim et al., 2023, arXiv:2312.15166]({PAPER_URL})), "
        "makes a deeper model out of a pretrained one without new weights: the layer stack is taken twice, the "
        "last layers of one copy and the first layers of the other are dropped, and the two are stacked "
        "(SOLAR: 32 layers, 8 dropped from each copy, 48 layers). The layers next to the seam then occur twice, "
        "which costs some quality at first; continued pretraining recovers it.",
    ]


def _render_card(run: RunRecord, *, license: Optional[str] = None, language: Any = None,
                 repo_id: Optional[str] = None) -> str:
    from huggingface_hub import ModelCardData

    repo_id = repo_id or run.release_cfg.get("repo_id")
    meta, notes = card_metadata(run, license=license, language=language)
    title = repo_id.split("/")[-1] if repo_id else (run.run_name or run.run_dir.name)
    body: list[str] = [*_intro(run, title), "", *_merge_section(run), "", "## Training Details", ""]
    trained = [s for s in ("cpt", "sft") if s in run.manifests]
    if not trained:
        body += ["The merged model was not trained further.", ""]
    for stage in trained:
        body += [*_training_section(run, stage), ""]
    body += [*_evaluation_section(run), "", *_usage_section(run, repo_id), "",
             "## License and Language", "", *(f"- {n}" for n in notes), "", *_provenance_section(run)]
    front = ModelCardData(**meta).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"


def build_model_card(run_dir: Path | str, *, license: Optional[str] = None, language: Any = None,
                     repo_id: Optional[str] = None) -> str:
    """The model card (README.md text) of a run, from its manifests alone.

    ``license``/``language``/``repo_id`` override the run config's ``release.*`` values, which
    override what is carried from the base model's card (see ``card_metadata``).
    """
    return _render_card(load_run(run_dir), license=license, language=language, repo_id=repo_id)


# --------------------------------------------------------------------------------- the release


def _excluded(rel: Path) -> Optional[str]:
    """Why a file of the model stage is left out of the release (None: it goes in)."""
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if rel.parts[0] in _EXCLUDE_DIRS or any(p.startswith("checkpoint-") for p in rel.parts[:-1]):
        return "pipeline logs / resume state"
    if rel.name.lower().endswith(PICKLE_SUFFIXES):
        return "pickle"
    if len(rel.parts) == 1 and rel.name in _EXCLUDE_NAMES:
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
    atomic_write_text(out / CARD_NAME, card if card is not None else _render_card(run))
    atomic_write_text(out / MERGEKIT_CONFIG_NAME, run.merge_yaml)
    if run.results:
        from pipeline.evaluate import write_results

        write_results(run.results["stages"], out, chance=run.results.get("chance") or {})
        written += [out / n for n in RESULTS_FILES]
    for name in run.plots:
        _copy_replace(run.eval_dir / name, out / name)
        written.append(out / name)
    return written


def build_release(run_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """``<run_dir>/release/`` (or ``out_dir``): the final model + card + merge config + results + plots.

    Written atomically (complete or not at all; an older release there is replaced). Loads with
    ``AutoModelForCausalLM.from_pretrained``; holds no manifest, logs or pickle.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / RELEASE_DIR_NAME
    _check_out_dir(run, out, replacing=True)
    src = run.model_dir()
    check_model_files(src)
    card = _render_card(run)
    with atomic_output_dir(out, overwrite=True) as tmp:
        skipped = link_model_files(src, tmp)
        check_model_files(tmp)
        write_release_docs(run, tmp, card)
    left_out = sorted({rel.split("/", 1)[0] + ("/" if "/" in rel else "") for rel, why in skipped if why != "regenerated"})
    if left_out:
        log(f"left out of the release: {', '.join(left_out)}")
    log(f"{out} (the {run.final_stage} model, model card, mergekit config"
        + (", results" if run.results else "") + ")")
    return out


def regenerate_card(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Rewrite the card, merge config, results and plots of a release from the run's manifests
    (the model files, if any, are left as they are). Returns the files written."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / RELEASE_DIR_NAME
    _check_out_dir(run, out, replacing=False)
    return write_release_docs(run, out)


# ------------------------------------------------------------------------------------ the push


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # pragma: no cover
        return False


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
    if _hub_offline():
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
                 or f.split("/", 1)[0] in _EXCLUDE_DIRS)
    if bad:
        raise ConfigError(str(release_dir), f"holds files a release must not: {bad}",
                          "push a directory made by build_release, not a stage directory")
    if CARD_NAME not in names:
        raise ConfigError(str(release_dir), "has no README.md (model card)", "build it with build_release")
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
    log(f"{verb} {len(files)} files ({_size(total)}) to https://huggingface.co/{repo_id} "
        f"({'private' if private else 'public'} if created)")
    for rel, size in files:
        print(f"  {rel}  {_size(size)}", flush=True)
    if dry_run:
        if not os.environ.get(token_env):
            log(f"dry run: {token_env} is not set; a real push needs it")
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
    log(f"pushed to {url}")
    return [rel for rel, _ in files]


def run_release(cfg) -> Optional[Path]:
    """The driver's release step (``cfg``: PipelineConfig with a ``release`` section): build
    ``<run_dir>/release``, then push it when ``release.push_to_hub``. None when disabled."""
    rc = cfg.release
    if not rc.enabled:
        return None
    if rc.push_to_hub:
        check_push_settings(repo_id=rc.repo_id, dry_run=rc.dry_run, token_env=rc.token_env)
    out = build_release(Path(cfg.paths.run_dir))
    if rc.push_to_hub:
        push_release(out, repo_id=rc.repo_id, private=rc.private, dry_run=rc.dry_run, token_env=rc.token_env)
    return out

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

``push_release`` uploads the directory with ``HfApi.create_repo`` + ``upload_folder``. The token is
read from an environment variable (``HF_TOKEN``) at upload time and passed to the client only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pipeline import hub
from pipeline.config import STAGES
from pipeline.data import is_hub_dataset_name
from pipeline.evaluation.generation import read_generations, read_generations_markdown
from pipeline.evaluation.leaderboard import board_markdown
from pipeline.evaluation.results import results_markdown
from pipeline.release.record import BASE_TAGS, CARD_NAME, HUB_REPO, MERGEKIT_URL, PAPER_URL, PLOTS, RunRecord, load_run


def _is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


def _is_hub_repo(ref: str) -> bool:
    return not _is_local_ref(ref) and bool(HUB_REPO.match(ref))


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


def gguf_source(base: dict) -> Optional[dict]:
    """The GGUF import record of a base read from a GGUF file (the base stage's ``gguf_source``
    metric: file name, quant type, dtype, license from its metadata), else None."""
    source = (base.get("metrics") or {}).get("gguf_source")
    return source if isinstance(source, dict) and source.get("source_file") else None


def _gguf_weights_note(source: dict) -> str:
    quant = source.get("source_quant_type")
    return f"{quant + ', ' if quant else ''}dequantized to {source.get('dtype') or 'float32'}"


def published_merge_yaml(run: RunRecord) -> str:
    """The merge config as it is published: each local model directory replaced by the name the card
    gives it (a hub id stays as it is). A path on the machine that made the model means nothing to a
    reader, and may say more about that machine than its owner meant to publish. A base read from a
    GGUF file is named by its model, and a comment says the weights are that file's, dequantized."""
    text = run.merge_yaml
    for ref, name in merged_models(run):
        if _is_local_ref(ref):
            text = text.replace(ref, name)
    source = gguf_source(run.base)
    if source:
        text = (f"# {_model_name(None, run.base)}: weights from {source['source_file']} "
                f"({_gguf_weights_note(source)}), not the original checkpoint's\n") + text
    return text


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
            if inp.get("role") == "data" and _is_hub_dataset(inp.get("path", "")):
                name = inp["path"].split(":", 1)[0]
                if name not in datasets:
                    datasets.append(name)
    if datasets:
        meta["datasets"] = datasets
    return meta, notes


def _is_hub_dataset(name: str) -> bool:
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
    ]
    lines += _seam_choice(metrics.get("seam_analysis"))
    lines += [
        "### Models Merged",
        "",
        "The following models were included in the merge:",
    ]
    for ref, name in models:
        link = f"[{name}](https://huggingface.co/{name})" if _is_hub_repo(name) else name
        where = " (a local model directory, named so in the configuration below)" if _is_local_ref(ref) else ""
        if (source := gguf_source(run.base)) and _same_path(ref, run.base.get("model_dir") or ""):
            where = (f": weights from `{source['source_file']}` ({_gguf_weights_note(source)}), not the original "
                     "checkpoint's; named so in the configuration below")
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
        published_merge_yaml(run).rstrip("\n"),
        "```",
    ]
    return lines


def _seam_choice(analysis: Optional[dict]) -> list[str]:
    """Why these layers, for a merge=auto run (the merge stage's seam analysis)."""
    if not analysis:
        return []
    rec, solar = analysis.get("recommended") or {}, analysis.get("solar") or {}

    def seam(c: dict) -> str:
        return " + ".join(f"[{lo}, {hi})" for lo, hi in c.get("slices") or [])

    def ppl(c: dict) -> str:
        v = c.get("measured_perplexity")
        return f"{v:.2f}" if isinstance(v, (int, float)) else "not scored"

    split = analysis.get("split") or {}
    if split.get("name") == "selection":
        h, sel = split.get("heldout_fraction", 0), split.get("selection_fraction", 0)
        tokens = (f"{_int(analysis.get('num_tokens'))} tokens of the selection split (records at content-hash "
                  f"position [{h:g}, {h + sel:g}): neither the held-out records the evaluation below scores nor "
                  "continued pretraining's)")
        column = "selection-split perplexity before training"
    else:  # a report written before the selection split: chosen on the held-out records
        tokens = (f"{_int(analysis.get('num_tokens'))} held-out tokens (the same records the evaluation below "
                  "scores, so its numbers favour the chosen seam)")
        column = "held-out perplexity before training"
    lines = [f"The seam was chosen from data (`merge=auto`, {analysis.get('target_layers')} layers): every "
             "SOLAR-shaped merge [0, a) + [b, N) was ranked by the angular distance between the hidden states "
             f"that become neighbours at its seam, and the best predicted were merged and scored by perplexity on "
             f"{tokens}.", "", f"| seam | {column} |", "|---|---|"]
    if analysis.get("base_perplexity"):
        lines.append(f"| the base model itself | {analysis['base_perplexity']:.2f} |")
    lines.append(f"| **{seam(rec)}** (chosen) | {ppl(rec)} |")
    if solar and solar.get("slices") != rec.get("slices"):
        lines.append(f"| {seam(solar)} (SOLAR's rule) | {ppl(solar)} |")
    rho, n = analysis.get("spearman_rho"), analysis.get("spearman_n")
    if isinstance(rho, (int, float)) and n:
        # Only given from 6 scored seams on (pipeline.analysis.seams.MIN_SPEARMAN_SEAMS), always with its n.
        lines += ["", f"Spearman's rho between predicted damage and measured perplexity: {rho:.2f} "
                      f"(n = {n}: {analysis.get('spearman_over') or 'scored seams'})."]
    return lines + [""]


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


# Training stages the card describes, in pipeline order, with their section titles.
TRAINED_STAGES = {"cpt": "Continued pretraining (cpt)", "sft": "Supervised fine-tuning (sft)",
                  "dpo": "Preference alignment (dpo)"}


def _dpo_cell(tc: dict) -> str:
    loss = tc.get("loss_type", "sigmoid")
    cell = f"DPO, TRL `loss_type={loss}`, beta {tc.get('beta')}, reference = the input (sft) model"
    if tc.get("rpo_alpha"):
        cell += f", + {tc['rpo_alpha']} × NLL of the chosen reply (RPO)"
    if tc.get("precompute_ref_log_probs"):
        cell += ", reference log-probs precomputed"
    return cell


# What carries the loss in each training stage (the tokens_trained metric counts exactly these).
_TRAINED_TOKENS_ARE = {"cpt": "corpus tokens", "sft": "assistant tokens",
                       "dpo": "reply tokens (chosen and rejected)"}


def _tokens_cell(stage: str, mt: dict) -> str:
    """The tokens the stage's training loop really consumed (counted on its batches, all ranks):
    those that carry the loss, and the non-padding input tokens. A manifest written before these were
    counted has only the nominal batch × length × steps, and the cell says so."""
    trained = mt.get("trained_tokens")
    if trained is None:
        return f"{_int(mt.get('tokens_seen'))} (nominal: batch × max length × steps, not counted)" if mt.get("tokens_seen") else ""
    cell = (f"{_int(trained)} {_TRAINED_TOKENS_ARE.get(stage, 'loss-bearing tokens')} carrying the loss, of "
            f"{_int(mt.get('tokens_seen'))} non-padding input tokens")
    if mt.get("tokens_counted_from_step"):
        cell += f" (counted from step {mt['tokens_counted_from_step']}: the run resumed from a checkpoint without counts)"
    return cell


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
    title = TRAINED_STAGES[stage]
    tokens = _tokens_cell(stage, mt)
    heldout = data.get("heldout_fraction")
    if stage == "cpt" and mt.get("data_blocks"):
        records = f"{_int(mt['data_blocks'])} packed blocks of {seq} tokens"
        if heldout:
            records += f"; {heldout:.0%} of the corpus records held out for evaluation (chosen by content hash)"
    elif stage == "sft" and mt.get("data_train_examples") is not None:
        records = f"{_int(mt['data_train_examples'])} conversations"
        if mt.get("data_assistant_tokens_in_train_split") is not None:
            records += f" ({_int(mt['data_assistant_tokens_in_train_split'])} assistant tokens in the whole training split)"
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
        ("tokens trained", tokens),
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
        ("preference loss", _dpo_cell(tc) if stage == "dpo" else ""),
        ("resumed from a checkpoint", "yes" if mt.get("resumed_from") else ""),
        ("seed", str(tc.get("seed", ""))),
    ]
    return [f"### {title}", "", *_table(rows)]


def leaderboard_section(results: dict) -> tuple[list[str], dict]:
    """The seed's table (Open LLM Leaderboard v1, offline) when the eval ran eval=leaderboard:
    (its card lines, the stages' metrics without the board tasks' for the general table)."""
    info = results.get("leaderboard")
    stages = results["stages"]
    if not info:
        return [], stages
    board_tasks = set(info.get("tasks") or {})
    lines = ["### Open LLM Leaderboard v1 (offline)", "",
             board_markdown(stages, info).rstrip("\n"), "",
             "Per-sample details (lm-eval `--log_samples`) and lm-eval's own results JSON: "
             "`leaderboard/<stage>/` in the run's eval directory.", ""]
    rest = {s: {k: v for k, v in m.items() if k.partition("/")[0] not in board_tasks} for s, m in stages.items()}
    return lines, rest


def _evaluation_section(run: RunRecord) -> list[str]:
    lines = ["## Evaluation", ""]
    if not run.results:
        return lines + ["This run has no evaluation (its eval stage did not run)."]
    board_lines, stages = leaderboard_section(run.results)
    chance = run.results.get("chance") or {}
    lines += [
        "Every stage's model on the same held-out data, computed by the pipeline's eval stage "
        f"(`results.json` in this repository). The released model is the **{run.final_stage}** row.",
        "",
    ]
    if run.final_stage not in stages:
        lines += [f"The released model ({run.final_stage}) was not among the evaluated stages.", ""]
    lines += board_lines
    md = results_markdown(stages, chance=chance)
    body = md.split("\n", 1)[1].lstrip("\n") if md.startswith("# ") else md
    lines.append(body.rstrip("\n"))
    for name, alt in PLOTS:
        if name in run.plots:
            lines += ["", f"![{alt}]({name})"]
    generations = read_generations(run.eval_dir)
    if generations:
        lines += ["", "### Greedy answers to fixed prompts", "",
                  "Each stage's model, greedy decoding, the same chat template for every stage:", ""]
        lines += read_generations_markdown(run.eval_dir).split("\n", 2)[2].rstrip("\n").splitlines()
    return lines


def gguf_repo_id(repo_id: Optional[str]) -> Optional[str]:
    return f"{repo_id}-GGUF" if repo_id else None


def ladder_perplexity_label(ladder: dict) -> str:
    """The ladder's perplexity is llama.cpp's, on its own windows of half the held-out records (the
    other half calibrates the imatrix): not the eval table's number, so not its label."""
    scoring = ladder.get("scoring") or {}
    return (f"ppl under llama.cpp ({scoring.get('window', '?')}-token windows, "
            f"{_int(scoring.get('positions'))} scored positions)")


def ladder_table(ladder: dict) -> list[str]:
    ref = ladder["reference"]
    rows = [f"| file | quant | size (MB) | bits per weight | {ladder_perplexity_label(ladder)} | KL divergence | top-1 agreement "
            "| tensor types (share of parameters) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            f"| (not published) | {ref['type']} reference | {ref['file_mb']:.1f} | {ref['bpw']:.2f} | "
            f"{ref['score']['perplexity']:.3f} | 0 | 1 | {ref['type']} |"]
    for r in sorted(ladder["rungs"], key=lambda r: r["file_mb"]):
        s = r["score"]
        quant = r["label"] + (f" (**same file as {r['same_file_as']}**)" if r.get("same_file_as") else "")
        rows.append(f"| `{r['file']}` | {quant} | {r['file_mb']:.1f} | {r['bpw']:.2f} | {s['perplexity']:.3f} | "
                    f"{s['mean_kld']:.4f} | {s['top1_agreement']:.3f} | {r.get('tensor_types_text', '–')} |")
    return rows


def ollama_tag(rung: dict) -> str:
    """The tag Ollama picks a file of a GGUF repository by: the rung's quant type (an imatrix rung's
    file name ends in ``-imat``, which names no type)."""
    return rung["type"]


def _run_gguf_lines(rung: dict, repo: str) -> list[str]:
    file = rung["file"]
    return ["```bash",
            f"llama-cli -m {file} -cnv                        # llama.cpp",
            f"ollama run hf.co/{repo}:{ollama_tag(rung)}   # Ollama, straight from the Hub",
            "```",
            "LM Studio: search for the repository name and pick a file by its quant type."]


def _quantized_section(run: RunRecord, repo_id: Optional[str]) -> list[str]:
    if not run.ladder:
        return []
    repo = gguf_repo_id(repo_id) or "<this repo>-GGUF"
    best = min((r for r in run.ladder["rungs"]), key=lambda r: abs(r["score"]["mean_kld"] - 0.01), default=None)
    lines = ["## Quantized versions (GGUF)", "",
             f"Made from this model with llama.cpp (`{repo}`), each file scored under llama.cpp against the "
             f"unquantized {run.ladder['reference']['type']} GGUF on the same held-out tokens "
             f"({run.ladder['reference']['score']['positions']} next-token positions): perplexity, mean KL "
             "divergence and how often the most likely next token is the reference's.", "", *ladder_table(run.ladder)]
    if (run.quantize_dir / "ladder.png").is_file():
        lines += ["", "![Quality against size of every quantized file](ladder.png)"]
    if best is not None:
        lines += ["", "To run one:", "", *_run_gguf_lines(best, repo)]
    return lines


def render_gguf_card(run: RunRecord, *, repo_id: Optional[str] = None) -> str:
    """README.md of the GGUF repository: the ladder, how it was measured, how to run each file."""
    from huggingface_hub import ModelCardData

    repo_id = repo_id or run.release_cfg.get("repo_id")
    name = repo_id.split("/")[-1] if repo_id else (run.run_name or run.run_dir.name)
    meta = {"base_model": repo_id or name, "tags": ["gguf", "quantized", *BASE_TAGS], "library_name": "gguf",
            "pipeline_tag": "text-generation"}
    license = run.release_cfg.get("license")
    if license:
        meta["license"] = license
    body = [f"# {name} GGUF", "",
            f"GGUF files of [{name}]({'https://huggingface.co/' + repo_id if repo_id else '../'}) "
            "(a depth up-scaled model, see its card), made and measured by dus-pipeline with llama.cpp.", "",
            *_quantized_section(run, repo_id)[2:]]
    front = ModelCardData(**meta).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"


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
        cpt = run.manifests["cpt"].get("metrics") or {}
        counted = cpt.get("trained_tokens")
        steps.append(f"continued pretraining on {_int(counted)} tokens" if counted is not None
                     else f"continued pretraining (nominally {_int(cpt.get('tokens_seen'))} tokens)")
    if "sft" in run.manifests:
        lora = ((run.manifests["sft"].get("config") or {}).get("sft") or {}).get("use_lora")
        steps.append("supervised fine-tuning" + (" (LoRA, merged)" if lora else ""))
    if "dpo" in run.manifests:
        lora = ((run.manifests["dpo"].get("config") or {}).get("dpo") or {}).get("use_lora")
        steps.append("preference alignment with DPO" + (" (LoRA, merged)" if lora else ""))
    after = (f", followed by {', '.join(steps[:-1])} and {steps[-1]}" if len(steps) > 1
             else f", followed by {steps[0]}" if steps else " (not trained further)")
    params = merge.get("num_parameters")
    source = gguf_source(run.base)
    weights = (f" (its weights read from `{source['source_file']}`: {_gguf_weights_note(source)}, not the original "
               "checkpoint's)") if source else ""
    return [
        f"# {title}",
        "",
        f"`{base_name}`{weights} grown {grown} by depth up-scaling"
        + (f" ({_human(params)} parameters)" if params else "") + after + ".",
        "",
        f"Depth up-scaling (DUS), introduced with SOLAR 10.7B ([Kim et al., 2023, arXiv:2312.15166]({PAPER_URL})), "
        "makes a deeper model out of a pretrained one without new weights: the layer stack is taken twice, the "
        "last layers of one copy and the first layers of the other are dropped, and the two are stacked "
        "(SOLAR: 32 layers, 8 dropped from each copy, 48 layers). The layers next to the seam then occur twice, "
        "which costs some quality at first; continued pretraining recovers it.",
    ]


def render_card(run: RunRecord, *, license: Optional[str] = None, language: Any = None,
                 repo_id: Optional[str] = None) -> str:
    from huggingface_hub import ModelCardData

    repo_id = repo_id or run.release_cfg.get("repo_id")
    meta, notes = card_metadata(run, license=license, language=language)
    title = repo_id.split("/")[-1] if repo_id else (run.run_name or run.run_dir.name)
    body: list[str] = [*_intro(run, title), "", *_merge_section(run), "", "## Training Details", ""]
    trained = [s for s in TRAINED_STAGES if s in run.manifests]
    if not trained:
        body += ["The merged model was not trained further.", ""]
    for stage in trained:
        body += [*_training_section(run, stage), ""]
    body += [*_evaluation_section(run), "", *_quantized_section(run, repo_id), "", *_usage_section(run, repo_id), "",
             "## License and Language", "", *(f"- {n}" for n in notes), "", *_provenance_section(run)]
    front = ModelCardData(**meta).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip("\n") + "\n"


def build_model_card(run_dir: Path | str, *, license: Optional[str] = None, language: Any = None,
                     repo_id: Optional[str] = None) -> str:
    """The model card (README.md text) of a run, from its manifests alone.

    ``license``/``language``/``repo_id`` override the run config's ``release.*`` values, which
    override what is carried from the base model's card (see ``card_metadata``).
    """
    return render_card(load_run(run_dir), license=license, language=language, repo_id=repo_id)


# --------------------------------------------------------------------------------- the release


# ------------------------------------------------------------------------------------ the push



"""The body sections of the model card, each from the run's record: the introduction, the merge
(mergekit's sections, the seam choice of merge=auto), each training stage, the evaluation, how to
use the model, and reproducibility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config import STAGES
from pipeline.evaluation.generation import read_generations, read_generations_markdown
from pipeline.evaluation.leaderboard import board_markdown
from pipeline.evaluation.results import results_markdown
from pipeline.release.card_format import format_count, format_duration, format_short_count, table_lines
from pipeline.release.card_metadata import (
    TRAINED_STAGES,
    gguf_source,
    gguf_weights_note,
    is_hub_dataset,
    is_hub_repo,
    is_local_ref,
    merged_models,
    model_name,
    published_merge_yaml,
    same_path,
)
from pipeline.release.record import MERGEKIT_URL, PAPER_URL, PLOTS, RunRecord


def intro_section(run: RunRecord, title: str) -> list[str]:
    merge = run.manifests["merge"].get("metrics") or {}
    base_name = model_name(None, run.base)
    depth_in = list((merge.get("num_layers_in") or {}).values())
    grown = (f"from {depth_in[0]} to {merge.get('num_hidden_layers')} layers"
             if len(depth_in) == 1 and merge.get("num_hidden_layers") else "in depth")
    steps = []
    if "cpt" in run.manifests:
        cpt = run.manifests["cpt"].get("metrics") or {}
        counted = cpt.get("trained_tokens")
        steps.append(f"continued pretraining on {format_count(counted)} tokens" if counted is not None
                     else f"continued pretraining (nominally {format_count(cpt.get('tokens_seen'))} tokens)")
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
    weights = (f" (its weights read from `{source['source_file']}`: {gguf_weights_note(source)}, not the original "
               "checkpoint's)") if source else ""
    return [
        f"# {title}",
        "",
        f"`{base_name}`{weights} grown {grown} by depth up-scaling"
        + (f" ({format_short_count(params)} parameters)" if params else "") + after + ".",
        "",
        f"Depth up-scaling (DUS), introduced with SOLAR 10.7B ([Kim et al., 2023, arXiv:2312.15166]({PAPER_URL})), "
        "makes a deeper model out of a pretrained one without new weights: the layer stack is taken twice, the "
        "last layers of one copy and the first layers of the other are dropped, and the two are stacked "
        "(SOLAR: 32 layers, 8 dropped from each copy, 48 layers). The layers next to the seam then occur twice, "
        "which costs some quality at first; continued pretraining recovers it.",
    ]


def _layer_runs(layer_map: list, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """[(output layers, source model, source layers)] with consecutive layers grouped."""
    runs: list[list] = []
    for out_i, (model, layer) in enumerate(layer_map):
        if runs and runs[-1][2] == model and runs[-1][4] == layer - 1 and runs[-1][1] == out_i - 1:
            runs[-1][1], runs[-1][4] = out_i, layer
        else:
            runs.append([out_i, out_i, model, layer, layer])
    span = lambda a, b: f"{a}" if a == b else f"{a}–{b}"  # noqa: E731
    return [(span(a, b), names.get(m, model_name(m, {})), span(c, d)) for a, b, m, c, d in runs]


def merge_section(run: RunRecord) -> list[str]:
    m = run.manifests["merge"]
    metrics = m.get("metrics") or {}
    models = merged_models(run)
    names = dict(models)
    base_name = model_name(None, run.base)
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
        link = f"[{name}](https://huggingface.co/{name})" if is_hub_repo(name) else name
        where = " (a local model directory, named so in the configuration below)" if is_local_ref(ref) else ""
        if (source := gguf_source(run.base)) and same_path(ref, run.base.get("model_dir") or ""):
            where = (f": weights from `{source['source_file']}` ({gguf_weights_note(source)}), not the original "
                     "checkpoint's; named so in the configuration below")
        lines.append(f"* {link}{where}")
    lines += ["", "### Resulting Model", ""]
    layers_in = metrics.get("num_layers_in") or {}
    depth_in = ", ".join(f"{names.get(r, model_name(r, run.base))}: {n}" for r, n in layers_in.items())
    final = run.manifests[run.final_stage].get("metrics") or {}
    rows = [
        ("layers", f"{depth_in or '?'} → **{metrics.get('num_hidden_layers', '?')}**"),
        ("parameters", f"{format_count(metrics.get('num_parameters'))} ({format_short_count(metrics.get('num_parameters'))})"
         if metrics.get("num_parameters") else ""),
        ("dtype of the merge", str(metrics.get("dtype") or "")),
        ("layers inserted (zero-initialised copies)", ", ".join(map(str, metrics.get("new_layers") or []))),
        ("parameters of the released model", format_count(final.get("num_parameters"))
         if run.final_stage != "merge" and final.get("num_parameters") not in (None, metrics.get("num_parameters")) else ""),
    ]
    lines += table_lines(rows)
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
        tokens = (f"{format_count(analysis.get('num_tokens'))} tokens of the selection split (records at content-hash "
                  f"position [{h:g}, {h + sel:g}): neither the held-out records the evaluation below scores nor "
                  "continued pretraining's)")
        column = "selection-split perplexity before training"
    else:  # a report written before the selection split: chosen on the held-out records
        tokens = (f"{format_count(analysis.get('num_tokens'))} held-out tokens (the same records the evaluation below "
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
        if is_hub_dataset(path):
            name = path.split(":", 1)[0]
            parts.append(f"[{path}](https://huggingface.co/datasets/{name})")
        else:
            parts.append(f"`{Path(path).name}` (sha256 `{str(inp.get('sha256', ''))[:12]}`)")
    return ", ".join(parts)


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
        return f"{format_count(mt.get('tokens_seen'))} (nominal: batch × max length × steps, not counted)" if mt.get("tokens_seen") else ""
    cell = (f"{format_count(trained)} {_TRAINED_TOKENS_ARE.get(stage, 'loss-bearing tokens')} carrying the loss, of "
            f"{format_count(mt.get('tokens_seen'))} non-padding input tokens")
    if mt.get("tokens_counted_from_step"):
        cell += f" (counted from step {mt['tokens_counted_from_step']}: the run resumed from a checkpoint without counts)"
    return cell


def _warmup(v: Any) -> str:
    if not v:
        return "no warmup"
    return f"warmup {v:.0%} of the steps" if 0 < v < 1 else f"warmup {int(v)} steps"


def training_section(run: RunRecord, stage: str) -> list[str]:
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
            batch += f" ({format_count(seqs * seq)} tokens) per optimizer step"
        else:
            batch += " per optimizer step"
    title = TRAINED_STAGES[stage]
    tokens = _tokens_cell(stage, mt)
    heldout = data.get("heldout_fraction")
    if stage == "cpt" and mt.get("data_blocks"):
        records = f"{format_count(mt['data_blocks'])} packed blocks of {seq} tokens"
        if heldout:
            records += f"; {heldout:.0%} of the corpus records held out for evaluation (chosen by content hash)"
    elif stage == "sft" and mt.get("data_train_examples") is not None:
        records = f"{format_count(mt['data_train_examples'])} conversations"
        if mt.get("data_assistant_tokens_in_train_split") is not None:
            records += f" ({format_count(mt['data_assistant_tokens_in_train_split'])} assistant tokens in the whole training split)"
        if mt.get("data_heldout_examples") is not None:
            records += (f"; {format_count(mt['data_heldout_examples'])} more held out for evaluation"
                        + (f" ({heldout:.0%}, chosen by content hash)" if heldout else ""))
    else:
        records = ""
    trainable, total = mt.get("trainable_parameters"), mt.get("num_parameters")
    train_cell = ""
    if trainable and total:
        train_cell = (f"{format_count(trainable)} of {format_count(total)} (all)" if trainable == total
                      else f"{format_count(trainable)} of {format_count(total)} ({trainable / total:.2%})")
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
        ("optimizer steps", f"{format_count(mt.get('global_step'))}" + (f" ({mt['epoch']:.2f} epochs)" if mt.get("epoch") else "")),
        ("sequence length" if stage == "cpt" else "max length", str(seq) if seq else ""),
        ("batch", batch),
        ("learning rate", f"{lr:g}, {tc.get('lr_scheduler_type', '')} schedule, {_warmup(tc.get('warmup_steps'))}" if lr else ""),
        ("weight decay / max grad norm", f"{tc.get('weight_decay')} / {tc.get('max_grad_norm')}" if "weight_decay" in tc else ""),
        ("trainable parameters", train_cell),
        ("train loss (mean over the run)", f"{mt['train_loss']:.4f}" if isinstance(mt.get("train_loss"), (int, float)) else ""),
        ("hardware", hardware),
        ("wall time", f"{format_duration(mt.get('train_runtime'))} training, {format_duration(m.get('wall_time_s'))} for the stage"),
        ("reload check", check),
        ("preference loss", _dpo_cell(tc) if stage == "dpo" else ""),
        ("resumed from a checkpoint", "yes" if mt.get("resumed_from") else ""),
        ("seed", str(tc.get("seed", ""))),
    ]
    return [f"### {title}", "", *table_lines(rows)]


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


def evaluation_section(run: RunRecord) -> list[str]:
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


def usage_section(run: RunRecord, repo_id: Optional[str]) -> list[str]:
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


def provenance_section(run: RunRecord) -> list[str]:
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

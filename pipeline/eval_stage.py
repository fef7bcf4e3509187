"""The eval stage: every earlier stage's model on the same held-out data, one table and two plots.

Writes ``<run_dir>/04_eval/`` with ``results.json``, ``results.md``, ``training.png`` (loss across
cpt and sft with each stage's held-out perplexity) and ``tasks.png`` (per metric, one bar per stage).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data import conversation_key, is_heldout, iter_text_records, load_conversations, split_records
from pipeline.fsutil import atomic_output_dir
from pipeline.manifest import read_manifest, resolve_model_dir, stage_dir, stage_key, write_manifest


def stage_models(cfg: PipelineConfig) -> dict[str, tuple[str, dict]]:
    """{stage: (model dir, manifest)} for the stages to evaluate that have completed."""
    out = {}
    for stage in cfg.eval.stages:
        manifest = read_manifest(stage_dir(cfg.paths.run_dir, stage))
        if manifest is not None and manifest.get("model_dir"):
            out[stage] = (resolve_model_dir(cfg.paths.run_dir, stage, manifest), manifest)
    return out


def run_eval_stage(cfg: PipelineConfig) -> dict:
    from pipeline import evaluate as ev

    started = time.time()
    models = stage_models(cfg)
    inputs = [{"role": "model", "stage": s, "path": d, "sha256": m["key"]} for s, (d, m) in models.items()]
    key = stage_key("eval", {"eval": asdict(cfg.eval), "data": asdict(cfg.data)}, inputs)
    final = stage_dir(cfg.paths.run_dir, "eval")
    if (m := read_manifest(final)) and m["key"] == key:
        print("[dus] eval: up to date", flush=True)
        return _summary(m["metrics"], final)

    # Only the held-out records are kept: the corpus itself may be far larger than memory.
    heldout_texts = [
        r for name in cfg.data.cpt_files
        for r in iter_text_records(name, text_column=cfg.data.text_column,
                                   txt_document_separator=cfg.data.txt_document_separator,
                                   max_record_chars=cfg.data.max_record_chars)
        if is_heldout(r, cfg.data.heldout_fraction)
    ]
    conversations = load_conversations(list(cfg.data.sft_files), messages_column=cfg.data.messages_column,
                                       sft_format=cfg.data.sft_format)
    heldout_convs = split_records(conversations, cfg.data.heldout_fraction, conversation_key).heldout
    # Every stage's conversations are rendered with the final chat template, so the token
    # sequences (and losses) are comparable across stages.
    chat_tok = models["sft"][0] if "sft" in models else next(iter(models.values()))[0]

    harness = cfg.eval.use_harness and bool(cfg.eval.harness_tasks)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_files = {"dus_mc": cfg.eval.harness_mc_file,
                      "dus_corpus_ppl": str(ev.write_text_jsonl(heldout_texts, Path(scratch) / "heldout_corpus.jsonl"))}
        for stage, (model_dir, _) in models.items():
            print(f"[dus] eval: {stage} ({model_dir})", flush=True)
            results[stage] = ev.evaluate_model(
                model_dir, heldout_texts=heldout_texts, heldout_conversations=heldout_convs,
                seq_len=cfg.eval.seq_len, batch_size=cfg.eval.batch_size, max_heldout_tokens=cfg.eval.max_heldout_tokens,
                max_length=cfg.sft.max_length, max_sft_examples=cfg.eval.max_sft_heldout_examples,
                chat_tokenizer_dir=chat_tok, trust_remote_code=cfg.model.trust_remote_code,
            )
            if harness:
                results[stage].update(ev.run_lm_eval(
                    model_dir, tasks=list(cfg.eval.harness_tasks), include_path=cfg.eval.harness_include_path,
                    batch_size=cfg.eval.harness_batch_size or cfg.eval.batch_size, device=cfg.eval.harness_device,
                    num_fewshot=dict(cfg.eval.harness_num_fewshot) or None, limit=cfg.eval.harness_limit,
                    data_files=data_files, average=dict(cfg.eval.harness_average) or None,
                    # Rolling perplexity windows of the length the models were trained and scored at
                    # (lm-eval's default is the model's whole context, beyond what a small run trained).
                    model_args={"trust_remote_code": cfg.model.trust_remote_code, "max_length": cfg.eval.seq_len},
                ))
    chance = {}
    if harness and "dus_mc" in cfg.eval.harness_tasks:
        c = ev.mc_chance_accuracy(cfg.eval.harness_mc_file)
        chance = {"dus_mc/acc": c, "dus_mc/acc_norm": c}
    with atomic_output_dir(final, overwrite=True) as tmp:
        ev.write_results(results, tmp, chance=chance)
        logs = {s: ev.read_log_history(stage_dir(cfg.paths.run_dir, s)) for s in ("cpt", "sft") if s in models}
        ppl = {s: r[f"{ev.HELDOUT}/perplexity"] for s, r in results.items() if f"{ev.HELDOUT}/perplexity" in r}
        ev.plot_training(logs, ppl, tmp / "training.png")
        ev.plot_tasks(results, tmp / "tasks.png", chance=chance)
        manifest = write_manifest(tmp, stage="eval", key=key, inputs=inputs, config={"eval": asdict(cfg.eval)},
                                  metrics=results, started_at=started, model_dir=None)
    return _summary(manifest["metrics"], final)


def _summary(results: dict, eval_dir: Path) -> dict:
    from pipeline.evaluate import HELDOUT

    last = [s for s in ("sft", "cpt", "merge", "base") if s in results]
    objective = results[last[0]].get(f"{HELDOUT}/perplexity") if last else None
    return {"stages": results, "objective": objective, "eval_dir": str(eval_dir)}

"""The eval stage: every earlier stage's model on the same held-out data, one table and two plots.

Writes ``<run_dir>/NN_eval/`` with ``results.json``, ``results.md``, ``training.png`` (loss across
cpt and sft with each stage's held-out perplexity) and ``tasks.png`` (per metric, one bar per stage). The metrics are
``pipeline.evaluation``'s; config group ``conf/eval/``; tests: tests/test_evaluate.py.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline import metric_names as M
from pipeline.config import STAGES, TRAINING_STAGES, PipelineConfig
from pipeline.data import check_data_files, conversation_key, heldout_text_records, load_conversations, split_records
from pipeline.errors import ConfigError
from pipeline.evaluation.generation import greedy_answers, write_generations
from pipeline.evaluation import leaderboard
from pipeline.evaluation.contamination import contaminated_docs
from pipeline.evaluation.harness import check_tasks_available, mc_chance_accuracy, run_lm_eval, write_text_jsonl
from pipeline.evaluation.metrics import evaluate_model
from pipeline.evaluation.plots import plot_tasks, plot_training, read_log_history
from pipeline.evaluation.results import write_results
from pipeline.log import log
from pipeline.manifest import Manifest, StageInput, model_chain, read_manifest, resolve_model_dir, stage_dir
from pipeline.stages.dpo import preference_results
from pipeline.stages.sft import check_sft_files
from pipeline.stages.stage import BaseStage, StageOutput, data_for_key, section_for_key


def stage_models(cfg: PipelineConfig) -> dict[str, tuple[str, Manifest]]:
    """{stage: (model dir, manifest)} for the stages to evaluate that have completed and are in this
    run's chain (``model_chain``: a stage turned off is not evaluated, even with its old directory on disk)."""
    out = {}
    chain = model_chain(cfg)
    for stage in cfg.eval.stages:
        if stage not in chain:
            continue
        manifest = read_manifest(stage_dir(cfg.paths.run_dir, stage))
        if manifest is not None and manifest.model_dir:
            out[stage] = (resolve_model_dir(cfg.paths.run_dir, stage, manifest), manifest)
    return out


def board_plan(cfg: PipelineConfig) -> leaderboard.BoardPlan:
    """The leaderboard run eval.harness_* asks for (checked: refusals name the field)."""
    return leaderboard.plan_board(list(cfg.eval.harness_tasks), limit=cfg.eval.harness_limit,
                                  shots=dict(cfg.eval.harness_num_fewshot))


def training_files(cfg: PipelineConfig) -> list[str]:
    """Every file this run trains on (the contamination check's training side)."""
    return [*cfg.data.cpt_files, *cfg.data.sft_files, *(cfg.data.dpo_files if cfg.dpo.enabled else [])]


def evaluate_stages(cfg: PipelineConfig, out_dir: Path) -> dict:
    """Score every completed stage's model; write results.json/md and the plots into ``out_dir``."""
    models = stage_models(cfg)
    heldout_texts = heldout_text_records(list(cfg.data.cpt_files), heldout_fraction=cfg.data.heldout_fraction,
                                         text_column=cfg.data.text_column,
                                         txt_document_separator=cfg.data.txt_document_separator,
                                         max_record_chars=cfg.data.max_record_chars)
    conversations = load_conversations(list(cfg.data.sft_files), messages_column=cfg.data.messages_column,
                                       sft_format=cfg.data.sft_format)
    heldout_convs = split_records(conversations, cfg.data.heldout_fraction, conversation_key).heldout
    # Every stage's conversations are rendered with the final chat template, so the token
    # sequences (and losses) are comparable across stages.
    chat_tok = models["sft"][0] if "sft" in models else next(iter(models.values()))[0]

    harness = cfg.eval.use_harness and bool(cfg.eval.harness_tasks)
    board = harness and cfg.eval.harness_preset == leaderboard.PRESET
    board_info = None
    if board:
        plan = board_plan(cfg)
        contaminated = contaminated_docs(leaderboard.eval_docs(plan), training_files(cfg), field="data")
        if cfg.eval.decontaminate:
            plan.exclude = contaminated
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_files = {"dus_mc": cfg.eval.harness_mc_file,
                      "dus_corpus_ppl": str(write_text_jsonl(heldout_texts, Path(scratch) / "heldout_corpus.jsonl"))}
        for stage, (model_dir, _) in models.items():
            log(f"{stage} ({model_dir})", where="eval")
            results[stage] = evaluate_model(
                model_dir, heldout_texts=heldout_texts, heldout_conversations=heldout_convs,
                seq_len=cfg.eval.seq_len, batch_size=cfg.eval.batch_size, max_heldout_tokens=cfg.eval.max_heldout_tokens,
                max_length=cfg.sft.max_length, max_sft_examples=cfg.eval.max_sft_heldout_examples,
                chat_tokenizer_dir=chat_tok, trust_remote_code=cfg.model.trust_remote_code,
            )
            if board:
                # lm-eval's results JSON and per-sample logs per stage: <eval dir>/leaderboard/<stage>/.
                run = leaderboard.run_board(
                    model_dir, plan, out_dir=out_dir / "leaderboard" / stage,
                    batch_size=cfg.eval.harness_batch_size or cfg.eval.batch_size, device=cfg.eval.harness_device,
                    model_args={"trust_remote_code": cfg.model.trust_remote_code})
                results[stage].update(run.metrics)
                board_info = leaderboard.board_info(plan, run, contaminated=contaminated,
                                                    decontaminate=cfg.eval.decontaminate)
            elif harness:
                results[stage].update(run_lm_eval(
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
        c = mc_chance_accuracy(cfg.eval.harness_mc_file)
        chance = {"dus_mc/acc": c, "dus_mc/acc_norm": c}
    # With dpo on: held-out preference accuracy and reward margin of sft and dpo (pipeline/stages/dpo.py).
    for stage, metrics in preference_results(cfg, models).items():
        results[stage].update(metrics)
    write_results(results, out_dir, chance=chance, leaderboard=board_info)
    if cfg.eval.generation_prompts:
        prompts = list(cfg.eval.generation_prompts)
        write_generations(prompts, {s: greedy_answers(d, prompts, chat_tokenizer_dir=chat_tok,
                                                      max_new_tokens=cfg.eval.generation_max_new_tokens,
                                                      trust_remote_code=cfg.model.trust_remote_code)
                                    for s, (d, _) in models.items()}, out_dir)
    logs = {s: read_log_history(stage_dir(cfg.paths.run_dir, s)) for s in TRAINING_STAGES if s in models}
    ppl = {s: r[M.HELDOUT_PERPLEXITY] for s, r in results.items() if M.HELDOUT_PERPLEXITY in r}
    plot_training(logs, ppl, out_dir / "training.png")
    plot_tasks(results, out_dir / "tasks.png", chance=chance)
    return results


def objective(results: dict) -> float | None:
    """What a sweep minimises: the held-out perplexity of the last evaluated stage."""
    last = [s for s in reversed(STAGES) if s in results]
    return results[last[0]].get(M.HELDOUT_PERPLEXITY) if last else None


class EvalStage(BaseStage):
    name = "eval"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.eval.enabled

    def check(self, cfg: PipelineConfig, selected: Sequence[str]) -> None:
        bad = [s for s in cfg.eval.stages if s not in STAGES or s == "eval"]
        if bad:
            raise ConfigError("eval.stages", f"unknown stage(s) {bad}", "use base, merge, cpt, sft, dpo")
        check_data_files(list(cfg.data.cpt_files), field="data.cpt_files", column=cfg.data.text_column,
                         column_field="data.text_column", txt_ok=True, what="raw-text files for continued pretraining")
        check_sft_files(cfg)
        if cfg.eval.use_harness and cfg.eval.harness_preset not in (None, leaderboard.PRESET):
            raise ConfigError("eval.harness_preset", f"unknown preset {cfg.eval.harness_preset!r}",
                              f"use {leaderboard.PRESET} or leave it unset")
        if cfg.eval.use_harness and cfg.eval.harness_tasks and cfg.eval.harness_preset == leaderboard.PRESET:
            board_plan(cfg)  # unknown task, data package missing, bad limit or shots: now, not after training
        elif cfg.eval.use_harness and cfg.eval.harness_tasks:
            # Offline without the datasets cached, fail now, not after training.
            check_tasks_available(list(cfg.eval.harness_tasks), include_path=cfg.eval.harness_include_path)

    def inputs(self, cfg: PipelineConfig) -> list[StageInput]:
        return [StageInput(role="model", stage=s, path=d, sha256=m.key) for s, (d, m) in stage_models(cfg).items()]

    def key_config(self, cfg: PipelineConfig) -> dict:
        return {"eval": section_for_key("eval", asdict(cfg.eval)), "data": data_for_key(cfg, reads_preference_data=cfg.dpo.enabled)}

    def run(self, cfg: PipelineConfig, *, inputs: list[StageInput], out_dir: Path) -> StageOutput:
        return StageOutput(metrics=evaluate_stages(cfg, out_dir), model_dir=None)

"""Issue 18, "numbers that mislead": every number means what its label says.

Each test names the item it guards. The GGUF files here are real ones written with the ``gguf``
package (the same reader the ladder uses on llama.cpp's output), not stand-ins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "llama",
                metadata: dict[str, str] | None = None) -> Path:
    """A GGUF file holding ``tensors`` ({name: (GGML type name, float32 array)}), quantized by gguf's
    own quantizer for Q8_0."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, (kind, array) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            data = quantize(array.astype(np.float32), qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- item 12: the ladder


def _rung_record(label: str, quant: str, file: str, *, mb: float, imatrix: bool = False) -> dict:
    return {"label": label, "type": quant, "imatrix": imatrix, "file": file, "file_bytes": 1, "file_mb": mb,
            "bpw": 8.5, "quantize_s": 1.0,
            "score": {"perplexity": 50.0, "mean_kld": 0.01, "kld_p99": 0.1, "top1_agreement": 0.9, "score_s": 1.0}}


def test_item12_each_rung_reports_its_real_type_mix_and_identical_files_are_marked(tmp_path):
    """Rows say what the written file holds (read back from the GGUF), and a rung that came out as the
    same file as another (the demo's Q6_K and Q8_0) is marked so, in ladder.md and in the card."""
    from pipeline.quantize.gguf_file import tensor_type_mix
    from pipeline.quantize.ladder import with_file_facts
    from pipeline.quantize.report import ladder_markdown, write_ladder_reports
    from pipeline.release.gguf_card import ladder_table

    rng = np.random.default_rng(0)
    big, norm = rng.standard_normal((64, 96)), np.ones(64)
    # What llama.cpp does to a K-quant on 96-wide rows: falls back (here to Q8_0) for that tensor.
    q8 = _write_gguf(tmp_path / "m-Q8_0.gguf", {"blk.0.w": ("Q8_0", big), "blk.0.norm": ("F32", norm)})
    q6 = tmp_path / "m-Q6_K.gguf"
    q6.write_bytes(q8.read_bytes())
    f16 = _write_gguf(tmp_path / "m-F16.gguf", {"blk.0.w": ("F16", big), "blk.0.norm": ("F32", norm)})

    mix = tensor_type_mix(q8)
    assert list(mix) == ["Q8_0", "F32"] and mix["Q8_0"] == pytest.approx(64 * 96 / (64 * 96 + 64))

    records = tmp_path / ".records"
    records.mkdir()
    rungs = []
    for label, quant, path, mb in (("F16", "F16", f16, 12.0), ("Q6_K", "Q6_K", q6, 6.5), ("Q8_0", "Q8_0", q8, 6.5)):
        rec = _rung_record(label, quant, path.name, mb=mb)
        (records / f"{label}.json").write_text(json.dumps(rec))
        rungs.append(with_file_facts(rec, path, records / f"{label}.json"))
    # The facts are kept in the rung's record, so a rerun reuses them.
    assert json.loads((records / "Q6_K.json").read_text())["tensor_types_text"] == "99% Q8_0, 1% F32"

    result = {"model_name": "m", "complete": True, "rungs": rungs,
              "scoring": {"runtime": "llama.cpp", "window": 512, "windows": 2, "positions": 1022},
              "reference": {"type": "F32", "why": "checkpoint dtype", "file": "m-F32.gguf", "file_mb": 24.0, "bpw": 32.0,
                            "convert_s": 1.0, "score": {"perplexity": 49.0, "positions": 1022, "score_s": 1.0}},
              "tokenizer_fidelity": {"texts_checked": 1, "tokens_checked": 10}}
    write_ladder_reports(result, tmp_path, plot=False)
    saved = json.loads((tmp_path / "ladder.json").read_text())
    assert [r["same_file_as"] for r in saved["rungs"]] == [None, None, "Q6_K"]
    md = ladder_markdown(saved)
    assert "| Q6_K | 6.5 |" in md and "| Q8_0 (same file as Q6_K) |" in md
    assert "99% Q8_0, 1% F32" in md and "99% F16, 1% F32" in md
    card = "\n".join(ladder_table(saved))
    assert "Q8_0 (**same file as Q6_K**)" in card and "99% Q8_0, 1% F32" in card


def test_item12_the_ollama_tag_of_an_imatrix_rung_is_its_quant_type():
    from pipeline.release.gguf_card import _run_gguf_lines

    rung = _rung_record("Q4_K_M+imatrix", "Q4_K_M", "m-Q4_K_M-imat.gguf", mb=2.0, imatrix=True)
    text = "\n".join(_run_gguf_lines(rung, "me/m-GGUF"))
    assert "ollama run hf.co/me/m-GGUF:Q4_K_M " in text and ":imat" not in text


def test_item12_dpo_tokens_are_the_real_ones_of_trls_preference_batches():
    """A DPO batch (TRL's own collator): input tokens are prompt + reply of both sides without padding,
    loss-bearing ones both replies: not pairs × max_length."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from pipeline.training.callbacks import batch_token_counts

    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
             {"prompt_ids": [5], "chosen_ids": [8, 9, 11, 12], "rejected_ids": [13, 14]}]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=1024)(pairs)
    assert batch["input_ids"].numel() == 4 * 5  # 2 pairs x 2 sides, padded to 5
    assert batch_token_counts(batch, pad_token_id=0) == ((3 + 2) + (3 + 1) + (1 + 4) + (1 + 2), 2 + 1 + 4 + 2)


def test_item9_a_packed_block_counts_its_end_of_document_tokens_when_pad_is_eos():
    """cpt's packed blocks carry no padding: an eos that doubles as the pad id (SmolLM2) separates
    documents and is trained on, so it is counted (it was not: 50,128 of 50,176 tokens)."""
    import torch

    from pipeline.data.packing import pack_documents
    from pipeline.training.callbacks import batch_token_counts

    eos = 2
    blocks = pack_documents([[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, eos]], seq_len=4)
    batch = {"input_ids": torch.tensor(blocks.input_ids), "position_ids": torch.tensor(blocks.position_ids),
             "labels": torch.tensor(blocks.labels)}
    inputs, _ = batch_token_counts(batch, pad_token_id=eos)
    assert inputs == len(blocks.input_ids) * 4 and int((batch["input_ids"] == eos).sum()) >= 1


# ------------------------------------------------------------------ item 9: tokens actually trained


def test_item9_consumed_tokens_are_counted_on_the_batches_the_loop_took(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """sft through the stage's own TRL trainer, 2 steps of 2 conversations: the counts are those of the
    first 2 collated batches (the loop's; one the loader prefetched beyond is not counted), the
    non-padding count equals the Trainer's own, and it is far below the split-wide assistant count."""
    from transformers import AutoTokenizer

    from pipeline.config import DataConfig, PathsConfig, PipelineConfig, SFTConfig
    from pipeline.stages.sft import build_sft_trainer
    from pipeline.training.callbacks import ConsumedTokens

    cfg = PipelineConfig(data=DataConfig(sft_files=[str(tiny_data_dir / "instructions.jsonl")], heldout_fraction=0.0),
                         sft=SFTConfig(max_length=128, per_device_train_batch_size=2, max_steps=2, save_steps=1,
                                       learning_rate=1e-4, logging_steps=1),
                         paths=PathsConfig(run_dir=str(tmp_path)))
    cfg.model.name_or_path = str(tiny_base_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    setup = build_sft_trainer(cfg, tokenizer=tok, input_model=str(tiny_base_model_dir), checkpoint_dir=tmp_path / "ck",
                              ds_config=None, bf16=False, attn="sdpa")
    trainer = setup.trainer
    collated = []
    collate = trainer.data_collator

    def keep(examples):
        batch = collate(examples)
        collated.append(batch)
        return batch

    trainer.data_collator = keep
    consumed = ConsumedTokens(trainer, pad_token_id=tok.pad_token_id)
    trainer.add_callback(consumed)
    trainer.train()

    used = collated[:2]  # 2 steps x 1 micro-batch
    inputs = sum(int(b["attention_mask"].sum()) for b in used)
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in used)
    totals = consumed.totals()
    assert totals == {"input_tokens": inputs, "trained_tokens": trained, "counted_from_step": 0}
    assert trainer.state.num_input_tokens_seen == inputs  # transformers' own non-padding count agrees
    assert 0 < trained < setup.data_stats["assistant_tokens_in_train_split"] / 5
    # Each checkpoint keeps the counts; a run resumed from it starts from them.
    saved = json.loads((tmp_path / "ck" / "checkpoint-1" / "consumed_tokens.json").read_text())
    first = collated[0]
    assert saved["input_tokens"] == int(first["attention_mask"].sum())
    resumed = ConsumedTokens(trainer, resumed_from=str(tmp_path / "ck" / "checkpoint-1"))
    assert resumed.totals()["input_tokens"] == saved["input_tokens"]


def test_item9_a_stage_manifest_reports_tokens_trained_not_a_nominal_product(tmp_path, tiny_base_model_dir,
                                                                            tiny_data_dir):
    """cpt in-process, 2 steps x 2 blocks of 64 tokens (no padding): 256 input tokens, 2 x 2 x 63
    tokens carrying the loss, and the card's cell says so."""
    from pipeline.config import (
        CPTConfig, DataConfig, DistributedConfig, InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig,
        PipelineConfig,
    )
    from pipeline.driver import run_stage
    from pipeline.release.card_sections import _tokens_cell
    from pipeline.stages import get_stage

    out = tmp_path / "out"
    cfg = PipelineConfig(
        model=ModelConfig(name_or_path=str(tiny_base_model_dir)),
        merge=MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 4])])]),
        data=DataConfig(cpt_files=[str(tiny_data_dir / "corpus.txt")]),
        cpt=CPTConfig(seq_len=64, per_device_train_batch_size=2, max_steps=2, save_steps=100),
        distributed=DistributedConfig(launcher="inprocess", zero_stage=0),
        paths=PathsConfig(run_dir=str(out / "run"), cache_dir=str(tmp_path / "cache"), output_root=str(out)),
    )
    for name in ("base", "merge"):
        run_stage(get_stage(name), cfg)
    metrics = run_stage(get_stage("cpt"), cfg).metrics
    assert metrics["tokens_seen"] == 2 * 2 * 64
    assert metrics["trained_tokens"] == 2 * 2 * 63
    assert _tokens_cell("cpt", metrics) == "252 corpus tokens carrying the loss, of 256 non-padding input tokens"


# ------------------------------------------------------------- item 13: where the weights came from

from test_release import _clone, run_dir  # noqa: E402,F401 - the release tests' hand-built run (a fixture)


def _set_manifest_fields(stage_path: Path, **fields) -> None:
    from pipeline.fsutil import atomic_write_json

    m = json.loads((stage_path / "manifest.json").read_text())
    for key, value in fields.items():
        m[key] = {**(m.get(key) or {}), **value} if isinstance(value, dict) else value
    atomic_write_json(stage_path / "manifest.json", m)


def test_item13_a_gguf_base_is_published_as_that_file_dequantized_with_its_license(run_dir, tmp_path):  # noqa: F811
    import yaml

    from pipeline.manifest import stage_dir
    from pipeline.release.card import build_model_card
    from pipeline.release.package import build_release

    run = _clone(run_dir, tmp_path / "run")
    source = {"source_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "source_quant_type": "Q4_1", "dtype": "float32",
              "license": "MIT", "gguf_architecture": "llama"}
    _set_manifest_fields(stage_dir(run, "base"), metrics={"gguf_source": source})
    card = build_model_card(run)
    intro = card.split("## Merge Details")[0]
    assert "weights read from `SmolLM2-135M-Instruct.Q4_1.gguf`: Q4_1, dequantized to float32" in intro
    assert "weights from `SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1, dequantized to float32)" in card  # models merged
    # The license is the GGUF's metadata's, not the (here different) base directory's card's.
    assert "\nlicense: mit\n" in card and "general.license" in card
    published = (build_release(run) / "mergekit_config.yml").read_text()
    assert published.startswith("# tiny-base: weights from SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, dequantized to float32)")
    assert yaml.safe_load(published)["slices"][0]["sources"][0]["model"] == "tiny-base"


def test_item13_the_gguf_import_records_the_files_quant_type(tmp_path):
    from pipeline.models.gguf import IMPORT_RECORD, _quant_type, import_record

    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_tensor("w", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _quant_type(path) == "Q4_1"
    # A record written before the type was kept: read from the file's name.
    (tmp_path / IMPORT_RECORD).write_text(json.dumps({"source_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert import_record(tmp_path)["source_quant_type"] == "Q4_1"


def test_item13_the_card_names_dpo_in_its_opening_sentence_when_dpo_ran(run_dir, tmp_path):  # noqa: F811
    import shutil

    from pipeline.manifest import stage_dir
    from pipeline.release.card import build_model_card

    run = _clone(run_dir, tmp_path / "run")
    sft, dpo = stage_dir(run, "sft"), stage_dir(run, "dpo")
    shutil.copytree(sft, dpo, copy_function=shutil.copy)
    _set_manifest_fields(dpo, stage="dpo", key="key-dpo",
                         inputs=[{"role": "model", "stage": "sft", "path": str(sft), "sha256": "key-sft"}],
                         config={"dpo": {"beta": 0.1, "loss_type": "sigmoid", "use_lora": False}})
    opening = build_model_card(run).split("\n\n")[2]
    assert "supervised fine-tuning (LoRA, merged) and preference alignment with DPO." in opening
    assert "continued pretraining" in opening


# ------------------------------------------------------ item 11: one scorer, labels that say which


def test_item11_seam_analysis_and_eval_score_the_same_tokens_alike(tiny_base_model_dir, tiny_data_dir):
    """The seam analysis's perplexity and the eval's held-out perplexity are one scorer: on the same
    tokens in the same windows they are the same number (before, the analysis also scored each record's
    BOS token, so the two differed on identical text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.analysis.similarity import measure_perplexity
    from pipeline.data import tokenize_records
    from pipeline.evaluation.metrics import heldout_perplexity

    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir).eval()
    texts = (tiny_data_dir / "corpus.txt").read_text().split("\n\n")[:12]
    stream = [t for doc in tokenize_records(tok, texts) for t in doc]
    assert tok.bos_token_id is not None and stream.count(tok.bos_token_id) == len(texts)
    seq_len = 64
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    batches = [torch.tensor([b]) for b in blocks if len(b) >= 2]
    analysis = measure_perplexity(model=model, token_batches=batches, progress=False)
    ours = heldout_perplexity(model, tok, texts, seq_len=seq_len, batch_size=4)
    assert analysis == pytest.approx(ours["perplexity"], rel=1e-6)
    assert ours["window"] == seq_len


def test_item11_the_card_labels_its_three_perplexities_apart():
    """Eval table, seam table and GGUF ladder each say which tokens, which windows, which engine."""
    from pipeline.evaluation.results import results_markdown
    from pipeline.release.gguf_card import ladder_perplexity_label

    results = {"base": {"heldout/perplexity": 41.8, "heldout/tokens": 4096, "heldout/window": 512}}
    header = results_markdown(results).splitlines()[2]
    assert "held-out ppl (4,096 tokens of the held-out records, 512-token windows, transformers)" in header
    ladder = ladder_perplexity_label({"scoring": {"window": 512, "positions": 8176}})
    assert ladder == "ppl under llama.cpp (512-token windows, 8,176 scored positions)"
    assert "held-out ppl" not in ladder


# ----------------------------------------------- item 10: preference metrics that are not measured


def test_item10_a_model_scored_against_itself_has_no_reward_metrics_and_tables_say_why(tiny_base_model_dir):
    from pipeline.evaluation.preference import evaluate_preferences
    from pipeline.evaluation.results import results_markdown

    pair = {"prompt": [{"role": "user", "content": "What is depth up-scaling?"}],
            "chosen": [{"role": "assistant", "content": "Stacking a model's layers twice."}],
            "rejected": [{"role": "assistant", "content": "A kind of soup."}]}
    own = evaluate_preferences(policy_dir=tiny_base_model_dir, reference_dir=tiny_base_model_dir, pairs=[pair] * 3,
                               beta=0.1, max_length=128)
    assert own.reference_is_policy and own.reward_accuracy is None and own.mean_reward_margin is None
    assert own.logprob_accuracy in (0.0, 1.0)  # still measured: it needs no reference
    dpo = {"preference/reward_accuracy": 0.625, "preference/reward_margin": 0.21, "preference/logprob_accuracy": 0.6,
           "preference/examples": 16}
    md = results_markdown({"sft": own.table_metrics(), "dpo": dpo})
    header, _, sft_row, dpo_row = md.splitlines()[2:6]
    assert "held-out preference accuracy (chance 0.5)" in header and "chosen more likely than rejected (chance 0.5)" in header
    assert [c.strip() for c in sft_row.split("|")[2:4]] == ["n/a (reference = itself)"] * 2
    assert sft_row.split("|")[4].strip() == f"{own.logprob_accuracy:.3f}"
    assert "0.625" in dpo_row and "0.210" in dpo_row
    assert "Chance for preference/reward_accuracy: 0.500" in md


# ------------------------------------------------------------ item 12: the DPO loss is not a perplexity


def test_item12_dpo_loss_gets_its_own_panel_not_the_perplexity_axis(tmp_path):
    from pipeline.evaluation.plots import plot_training, training_figure

    logs = {"cpt": [{"step": s, "loss": 5.0 - 0.01 * s} for s in range(1, 11)],
            "sft": [{"step": s, "loss": 4.0} for s in range(1, 6)],
            "dpo": [{"step": s, "loss": 0.6931 - 0.01 * s} for s in range(1, 5)]}
    fig = training_figure(logs, {"base": 57.0, "sft": 61.0, "dpo": 61.0})
    lm_ax, dpo_ax = fig.axes[0], [a for a in fig.axes if a.get_title() == "DPO loss"][0]
    assert not any("dpo training loss" in line.get_label() for line in lm_ax.get_lines())
    assert [line.get_label() for line in dpo_ax.get_lines()][0] == "dpo training loss"
    assert "not a perplexity" in dpo_ax.get_ylabel()
    assert plot_training(logs, {"sft": 61.0}, tmp_path / "training.png").stat().st_size > 0
    # Without a preference stage: one panel, as before.
    assert len([a for a in training_figure({"cpt": logs["cpt"]}, {}).axes if a.get_title()]) == 1


def test_item10_the_demo_has_dpo_settings_that_move_it_and_the_default_stays_a_real_models():
    """dpo=demo: the learning rate and epochs under which dpo moved the demo model (measured in
    docs/dpo.md); the default keeps the full-DPO rate for real models."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from pipeline.config import REPO_ROOT, PipelineConfig

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    run = ["paths.run_dir=/nonexistent", "run_name=t", "dpo.enabled=true"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        demo = compose("config", overrides=["dpo=demo", *run])
        default = compose("config", overrides=run)
    assert (demo.dpo.learning_rate, demo.dpo.num_train_epochs) == (1e-4, 3) and not demo.dpo.use_lora
    assert default.dpo.learning_rate == 5e-7

"""pipeline.evaluate: perplexity and assistant-token loss against hand computations, lm-eval offline
on the local tasks, the offline leaderboard check, results files and plots.

Uses the session fixtures ``tiny_tokenizer_dir`` / ``tiny_base_model_dir`` from conftest.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evaluation import harness, plots
from pipeline.evaluation import metrics as ev_metrics
from pipeline.evaluation import results as results_mod
from pipeline.config import REPO_ROOT, EvalConfig
from pipeline.data import load_conversations, load_text_records, split_records
from pipeline.errors import ConfigError

DEMO = REPO_ROOT / "data" / "demo"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir, dtype=torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def heldout_texts():
    records = load_text_records([str(DEMO / "corpus.txt")])
    return split_records(records, 0.05).heldout[:4]


@pytest.fixture(scope="module")
def conversations():
    return load_conversations([str(DEMO / "instructions.jsonl")])[:6]


# --------------------------------------------------------------------------- perplexity


def _manual_heldout_nll(model, tok, texts, seq_len):
    """Straightforward re-implementation: one window at a time, log_softmax, gather, loop."""
    stream, target = [], []
    for text in texts:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        stream += ids
        target += [False] + [True] * (len(ids) - 1)  # a record's bos is never a target
    nll, n = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(stream), seq_len):
            window = stream[lo : lo + seq_len]
            if len(window) < 2:
                continue
            logp = model(input_ids=torch.tensor([window])).logits[0].log_softmax(-1)
            token_logp = logp[torch.arange(len(window) - 1), torch.tensor(window[1:])]  # log p(t_i | t_<i)
            keep = torch.tensor(target[lo + 1 : lo + len(window)])
            nll -= token_logp[keep].double().sum().item()
            n += int(keep.sum())
    return nll, n


def test_heldout_perplexity_is_exp_of_hand_computed_mean_nll(model_and_tokenizer, heldout_texts):
    model, tok = model_and_tokenizer
    texts = [t[:400] for t in heldout_texts]
    out = ev_metrics.heldout_perplexity(model, tok, texts, seq_len=48, batch_size=3)
    nll, n = _manual_heldout_nll(model, tok, texts, 48)
    assert out["tokens"] == n
    assert out["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # Deterministic, and the batch size only changes how windows are grouped.
    assert ev_metrics.heldout_perplexity(model, tok, texts, seq_len=48, batch_size=3) == out
    assert ev_metrics.heldout_perplexity(model, tok, texts, seq_len=48, batch_size=1)["loss"] == pytest.approx(out["loss"], rel=1e-5)
    capped = ev_metrics.heldout_perplexity(model, tok, texts, seq_len=48, batch_size=3, max_tokens=100)
    assert capped["tokens"] <= 99
    assert model.training is False


def test_heldout_perplexity_rejects_bad_arguments(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ConfigError, match="seq_len"):
        ev_metrics.heldout_perplexity(model, tok, ["some text"], seq_len=1, batch_size=1)
    with pytest.raises(ConfigError, match="longer than the model's"):
        ev_metrics.heldout_perplexity(model, tok, ["some text"], seq_len=model.config.max_position_embeddings + 1, batch_size=1)
    with pytest.raises(ConfigError, match="no held-out"):
        ev_metrics.heldout_perplexity(model, tok, [], seq_len=8, batch_size=1)


# --------------------------------------------------------------------------- assistant-token loss


def test_assistant_token_loss_counts_only_assistant_tokens(model_and_tokenizer, conversations):
    model, tok = model_and_tokenizer
    out = ev_metrics.assistant_token_loss(model, tok, conversations, max_length=512, batch_size=4)

    nll, n, n_all = 0.0, 0, 0
    with torch.no_grad():
        for conv in conversations:
            enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            token_logp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll -= token_logp[keep].double().sum().item()
            n += int(keep.sum())
            n_all += len(ids) - 1
    assert out["tokens"] == n and out["examples"] == len(conversations)
    assert out["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-9)
    # The mask is the assistant replies (+ their eos), far fewer tokens than the whole conversations.
    replies = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1
                  for c in conversations for m in c if m["role"] == "assistant")
    assert n == replies < n_all

    # A different user turn changes the context (so the loss), never which tokens are scored.
    edited = [[{**m, "content": "Tell me, briefly: " + m["content"]} if m["role"] == "user" else m for m in c]
              for c in conversations]
    out_edited = ev_metrics.assistant_token_loss(model, tok, edited, max_length=512, batch_size=4)
    assert out_edited["tokens"] == out["tokens"]
    # Padding (batch of 4) gives the same numbers as no padding (batch of 1).
    assert ev_metrics.assistant_token_loss(model, tok, conversations, max_length=512, batch_size=1)["loss"] == pytest.approx(
        out["loss"], rel=1e-5)
    # max_examples and truncation.
    assert ev_metrics.assistant_token_loss(model, tok, conversations, max_length=512, batch_size=4, max_examples=2)["examples"] == 2
    short = ev_metrics.assistant_token_loss(model, tok, conversations, max_length=40, batch_size=4)
    assert short["tokens"] < out["tokens"]


def test_assistant_token_loss_refuses_a_template_without_end_of_turn_token(model_and_tokenizer, conversations):
    """No {% generation %} markers needed (pipeline.data.chat_masking), but a reply closed by plain
    text cannot be masked with its end-of-turn token: refused, naming the conversation."""
    model, tok = model_and_tokenizer
    template = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        with pytest.raises(ConfigError, match=r"held-out sft conversation 0: .*single end-of-turn token"):
            ev_metrics.assistant_token_loss(model, tok, conversations, max_length=64, batch_size=2)
    finally:
        tok.chat_template = template


# --------------------------------------------------------------------------- lm-eval


def test_run_lm_eval_offline_on_local_tasks(tiny_base_model_dir, heldout_texts, tmp_path):
    pytest.importorskip("lm_eval")
    corpus = harness.write_text_jsonl([t[:800] for t in heldout_texts], tmp_path / "heldout.jsonl")
    metrics = harness.run_lm_eval(
        str(tiny_base_model_dir), tasks=["dus_mc", "dus_corpus_ppl"], include_path=None, batch_size="8",
        device="cpu", limit=12, data_files={"dus_corpus_ppl": str(corpus)},
        average={"dus_mc": "acc", "dus_corpus_ppl": "bits_per_byte"},
    )
    assert 0.0 <= metrics["dus_mc/acc"] <= 1.0 and 0.0 <= metrics["dus_mc/acc_norm"] <= 1.0
    assert metrics["dus_mc/acc_stderr"] > 0
    assert metrics["dus_corpus_ppl/word_perplexity"] > 1 and metrics["dus_corpus_ppl/byte_perplexity"] > 1
    assert metrics["dus_corpus_ppl/bits_per_byte"] == pytest.approx(math.log2(metrics["dus_corpus_ppl/byte_perplexity"]))
    assert metrics[ev_metrics.AVERAGE_KEY] == pytest.approx((metrics["dus_mc/acc"] + metrics["dus_corpus_ppl/bits_per_byte"]) / 2)
    assert not any(k.endswith(",none") for k in metrics)


def test_run_lm_eval_rejects_bad_task_settings(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError, match="harness_num_fewshot.*arc_challenge"):
        harness.run_lm_eval("unused", tasks=["dus_mc"], batch_size=1, device="cpu", num_fewshot={"arc_challenge": 25})
    with pytest.raises(ConfigError, match="dus_corpus_ppl needs its data file"):
        harness.run_lm_eval("unused", tasks=["dus_corpus_ppl"], batch_size=1, device="cpu")


def test_leaderboard_offline_fails_before_loading_the_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    for name in ("HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The Hub's v1 tasks through the generic harness path (eval=leaderboard itself runs them on
    # offline data: tests/test_leaderboard.py).
    shots = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}
    tasks = list(shots)
    with pytest.raises(ConfigError) as err:  # the model dir does not exist: failing here means before loading it
        harness.run_lm_eval(str(tmp_path / "no-model"), tasks=tasks, batch_size="auto", device="cpu",
                       num_fewshot=shots)
    message = str(err.value)
    assert "offline" in message and "network" in message and "cais/mmlu" in message
    for task in tasks:
        assert task in message

    # Online: names are checked, datasets are not (lm-eval downloads them). Offline and cached: passes.
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    harness.check_tasks_available(["arc_challenge", "dus_mc"], task_manager=task_manager)
    with pytest.raises(ConfigError, match="unknown lm-eval task.*arc_challange"):
        harness.check_tasks_available(["arc_challange"], task_manager=task_manager)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Where datasets 5.x looks offline: a prepared copy, per config.
    (tmp_path / "hf_home" / "datasets" / "allenai___ai2_arc" / "ARC-Challenge" / "0.0.0" / "0123abcd").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        harness.check_tasks_available(["arc_challenge", "arc_easy", "dus_mc"], task_manager=task_manager)
    assert "arc_easy (allenai/ai2_arc)" in str(err.value) and "arc_challenge" not in str(err.value)


def test_flatten_lm_eval_results_and_average():
    raw = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.4},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                      "exact_match,flexible-extract": 0.2, "sample_len": 1319},
            "wikitext": {"word_perplexity,none": 30.0, "word_perplexity_stderr,none": "N/A"},
        },
    }
    flat = harness.flatten_lm_eval_results(raw, ["mmlu", "gsm8k", "wikitext"])
    assert flat == {"mmlu/acc": 0.5, "mmlu/acc_stderr": 0.01, "gsm8k/exact_match,strict-match": 0.1,
                    "gsm8k/exact_match_stderr,strict-match": 0.01, "gsm8k/exact_match,flexible-extract": 0.2,
                    "wikitext/word_perplexity": 30.0}
    assert harness.average_metrics(flat, {"mmlu": "acc", "gsm8k": "exact_match,strict-match"}) == pytest.approx(0.3)
    assert harness.average_metrics(flat, {"mmlu": "acc", "arc_challenge": "acc_norm"}) is None
    assert harness.mc_chance_accuracy(DEMO / "mc_eval.jsonl") == pytest.approx(0.417, abs=5e-4)


def test_local_task_yamls_are_valid_lm_eval_configs(tmp_path):
    for task in ev_metrics.LOCAL_TASKS:
        cfg = yaml.safe_load((ev_metrics.LOCAL_TASKS_DIR / f"{task}.yaml").read_text())
        assert cfg["task"] == task and cfg["dataset_path"] == "json"
    out = harness.materialize_local_tasks(tmp_path, ["dus_mc"], {})
    cfg = yaml.safe_load((out / "dus_mc.yaml").read_text())
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == (DEMO / "mc_eval.jsonl").resolve()


# --------------------------------------------------------------------------- results and plots


def _results(base=38.2, merge=95.0, cpt=36.0, sft=37.5):
    def stage(ppl, loss, acc):
        return {"heldout/loss": math.log(ppl), "heldout/perplexity": ppl, "heldout/tokens": 1000,
                "sft_heldout/loss": loss, "sft_heldout/perplexity": math.exp(loss), "sft_heldout/tokens": 200,
                "dus_mc/acc": acc, "dus_mc/acc_stderr": 0.02, "dus_corpus_ppl/word_perplexity": ppl * 10}

    # Out of order on purpose: rows follow the pipeline's stage order.
    return {"sft": stage(sft, 2.9, 0.49), "base": stage(base, 3.9, 0.41), "merge": stage(merge, 4.6, 0.40),
            "cpt": stage(cpt, 3.8, 0.42)}


def test_write_results_json_and_markdown(tmp_path):
    results_mod.write_results(_results(), tmp_path, chance={"dus_mc/acc": 0.417})
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["stages"]) == ["base", "merge", "cpt", "sft"]
    assert data["stages"]["merge"]["heldout/perplexity"] == 95.0
    md = (tmp_path / "results.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| stage"))
    assert header == ("| stage | held-out ppl (1,000 tokens of the held-out records, transformers) | assistant-token loss "
                      "| dus_mc/acc (chance 0.417) | dus_corpus_ppl/word_perplexity |")
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and not line.startswith("| stage")]
    assert rows == ["base", "merge", "cpt", "sft"]
    assert "| merge | 95.00 | 4.600 | 0.400 ± 0.020 | 950.00 |" in md
    assert "merge raised held-out perplexity from 38.20 (base) to 95.00; cpt brought it to 36.00" in md
    assert "sft lowered the assistant-token loss on held-out conversations from 3.8000 (cpt) to 2.9000" in md
    assert "dus_mc/acc: best stage sft at 0.490 ± 0.020 vs chance 0.417 (more than 2 standard errors above chance)" in md
    assert data["summary"] == [line for line in lines if line in data["summary"]]

    # The sentences follow the numbers.
    results_mod.write_results(_results(merge=30.0, cpt=31.0), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "merge lowered held-out perplexity from 38.20 (base) to 30.00; cpt brought it to 31.00" in md
    # Stages that did not run are simply absent.
    results_mod.write_results({"base": {"heldout/perplexity": 12.0}}, tmp_path)
    assert "| base | 12.00 |" in (tmp_path / "results.md").read_text()


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(tmp_path):
    cpt_dir = tmp_path / "02_cpt"
    (cpt_dir / "checkpoint-20").mkdir(parents=True)
    history = [{"step": s, "loss": 6.0 - s / 10, "learning_rate": 1e-3} for s in range(1, 21)] + [{"step": 20, "train_loss": 5.0}]
    (cpt_dir / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert plots.read_log_history(cpt_dir) == history
    assert plots.read_log_history(tmp_path / "missing") == []
    sft_logs = [{"step": s, "loss": 3.0 - s / 20} for s in range(1, 11)]
    results = _results()
    training = plots.plot_training({"cpt": plots.read_log_history(cpt_dir), "sft": sft_logs},
                                {s: m["heldout/perplexity"] for s, m in results.items()}, tmp_path / "plots" / "training.png")
    tasks = plots.plot_tasks(results, tmp_path / "plots" / "tasks.png", chance={"dus_mc/acc": 0.417})
    assert _is_png(training) and _is_png(tasks)
    # Degenerate inputs still give a figure.
    assert _is_png(plots.plot_training({}, {"base": 10.0, "merge": 20.0}, tmp_path / "t2.png"))
    assert plots.plot_tasks({}, tmp_path / "empty.png").is_file()


# --------------------------------------------------------------------------- config group


@pytest.mark.parametrize("choice", ["default", "leaderboard"])
def test_eval_config_group_composes_against_the_schema(choice, tmp_path):
    fields = set(EvalConfig.__dataclass_fields__)
    keys = set(yaml.safe_load((REPO_ROOT / "conf" / "eval" / f"{choice}.yaml").read_text())) - {"defaults"}
    if not keys <= fields:
        pytest.skip(f"EvalConfig lacks {sorted(keys - fields)} (the harness fields are proposed, not merged yet)")
    from dataclasses import field, make_dataclass

    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from pipeline.config import PathsConfig

    Root = make_dataclass("Root", [("eval", EvalConfig, field(default_factory=EvalConfig)),
                                   ("paths", PathsConfig, field(default_factory=PathsConfig))])

    shutil.copytree(REPO_ROOT / "conf" / "eval", tmp_path / "eval")
    (tmp_path / "config.yaml").write_text("defaults:\n  - eval_test_schema\n  - eval: default\n  - _self_\n")
    ConfigStore.instance().store(name="eval_test_schema", node=Root)
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("config", overrides=[f"eval={choice}", "paths.run_dir=unused"])
    eval_cfg = OmegaConf.to_object(cfg).eval
    assert Path(eval_cfg.harness_mc_file).is_file()
    if choice == "leaderboard":
        assert eval_cfg.harness_preset == "leaderboard" and eval_cfg.harness_num_fewshot["arc_challenge"] == 25
        assert set(eval_cfg.harness_num_fewshot) == set(eval_cfg.harness_tasks)

"""DPO with TRL 1.16's DPOTrainer on the tiny model (pipeline/training/dpo.py) and the held-out
preference metrics (pipeline/evaluation/preference.py): real trainer steps, no mocks."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import REPO_ROOT
from pipeline.data.preference import load_preferences
from pipeline.errors import ConfigError
from pipeline.data.preference import tokenize_pair
from pipeline.evaluation.preference import evaluate_preferences, reply_logprobs
from pipeline.training.dpo import DPOSettings, build_dpo_trainer, trl_loss_arguments, validate_dpo_settings
from conftest import torch_threads

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, tiny_data_dir) -> Path:
    """64 pairs: a demo question, its reference answer as chosen, another row's answer as rejected."""
    rows = [json.loads(line) for line in (tiny_data_dir / "instructions.jsonl").read_text().splitlines()[:64]]
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    with open(out, "w") as f:
        for i, row in enumerate(rows):
            j = rng.choice([k for k in range(len(rows)) if k != i])
            f.write(json.dumps({"chosen": row["messages"], "rejected": row["messages"][:1] + [rows[j]["messages"][1]]}) + "\n")
    return out


@pytest.fixture(scope="module")
def pairs(pairs_file) -> list[dict]:
    return load_preferences([str(pairs_file)])


@pytest.fixture(scope="module")
def tokenizer(tiny_base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_model_dir)


def trainer_args(tmp_path, **overrides) -> dict:
    args = dict(output_dir=str(tmp_path / "ck"), use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                per_device_eval_batch_size=64, learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", seed=0, data_seed=0)
    args.update(overrides)
    return args


def chosen_nll(model, tokenizer, pairs) -> float:
    """Mean token NLL of the chosen replies over all pairs (TRL's `sft` loss term, one batch)."""
    tokenized = [tokenize_pair(tokenizer, p) for p in pairs]
    chosen, _ = reply_logprobs(model, tokenizer, tokenized, max_length=MAX_LENGTH)
    tokens = sum(min(len(t.prompt_ids) + len(t.chosen_ids), MAX_LENGTH) - len(t.prompt_ids) for t in tokenized)
    return -sum(chosen) / tokens


@pytest.mark.parametrize("settings, field", [
    (DPOSettings(beta=0), "dpo.beta"),
    (DPOSettings(beta=-0.1), "dpo.beta"),
    (DPOSettings(loss_type="kto"), "dpo.loss_type"),
    (DPOSettings(loss_type="sft"), "dpo.loss_type"),
    (DPOSettings(max_length=128, max_prompt_length=128), "dpo.max_prompt_length"),
    (DPOSettings(rpo_alpha=0.0), "dpo.rpo_alpha"),
])
def test_bad_settings_are_refused_before_any_model_loads(settings, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_dpo_settings(settings)


def test_rpo_alpha_becomes_trl_sft_term():
    assert trl_loss_arguments(DPOSettings(loss_type="ipo")) == {"loss_type": ["ipo"], "loss_weights": None}
    assert trl_loss_arguments(DPOSettings(rpo_alpha=0.5)) == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}


def test_dpo_steps_move_the_policy_not_the_reference_and_eval_matches_trl(tmp_path, tiny_base_model_dir, tokenizer, pairs):
    """Full fine-tune: the first loss is ln 2 (the reference is the initial policy), the policy's
    weights move and the reference's do not, training raises the implicit reward margin on the
    trained pairs, and evaluate_preferences on a saved model gives TRL's own reward metrics."""
    train, held = pairs[:8], pairs[48:64]
    with torch_threads(1):
        trainer, collator, stats = build_dpo_trainer(
            model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=train, eval_pairs=held,
            settings=DPOSettings(beta=0.1, max_length=MAX_LENGTH), bf16=False,
            trainer_args=trainer_args(tmp_path, max_steps=8, per_device_train_batch_size=2))
        assert stats == {"train_pairs": 8, "dropped_prompt_too_long": 0, "dropped_by_trl_max_length": 0}
        ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
        policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert history[0]["rewards/margins"] == 0.0
        assert all(torch.equal(v, trainer.ref_model.state_dict()[k]) for k, v in ref_before.items())
        moved = sum(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in policy_before.items())
        assert moved == len(policy_before)
        assert len(set(collator.served)) == 8  # two epochs over 8 pairs: each seen

        trl_eval = trainer.evaluate()  # one batch of all 16 held-out pairs
        trainer.save_model(str(tmp_path / "dpo"))
        ours = evaluate_preferences(policy_dir=tmp_path / "dpo", reference_dir=tiny_base_model_dir, pairs=held,
                                    beta=0.1, max_length=MAX_LENGTH, batch_size=5)
        # A prompt that fills max_length leaves no reply token: TRL drops the pair, and so do we.
        assert ours.pairs + ours.skipped_prompt_too_long == 16 and ours.pairs == len(trainer.eval_dataset)
        assert ours.mean_chosen_reward == pytest.approx(trl_eval["eval_rewards/chosen"], abs=1e-4)
        assert ours.mean_rejected_reward == pytest.approx(trl_eval["eval_rewards/rejected"], abs=1e-4)
        assert ours.mean_reward_margin == pytest.approx(trl_eval["eval_rewards/margins"], abs=1e-4)
        assert ours.reward_accuracy == pytest.approx(trl_eval["eval_rewards/accuracies"])
        on_train = evaluate_preferences(policy_dir=tmp_path / "dpo", reference_dir=tiny_base_model_dir, pairs=train,
                                        beta=0.1, max_length=MAX_LENGTH)
        assert on_train.mean_reward_margin > 0.1 and on_train.reward_accuracy >= 0.75, on_train


def test_a_model_against_itself_has_no_reward_metrics_but_a_logprob_accuracy(tiny_base_model_dir, pairs):
    with torch_threads(1):
        r = evaluate_preferences(policy_dir=tiny_base_model_dir, reference_dir=tiny_base_model_dir, pairs=pairs[:16],
                                 beta=0.1, max_length=MAX_LENGTH)
    # Every reward is 0 by construction: undefined, not measured (issue 18 item 10).
    assert r.reference_is_policy and (r.reward_accuracy, r.reward_ties, r.mean_reward_margin) == (None, None, None)
    assert 0.0 < r.logprob_accuracy < 1.0 and math.isfinite(r.mean_logprob_margin)
    with pytest.raises(ConfigError, match="beta"):
        evaluate_preferences(policy_dir=tiny_base_model_dir, reference_dir=tiny_base_model_dir, pairs=pairs[:2], beta=0)


def test_reply_logprobs_sum_the_reply_tokens_only(tiny_base_model_dir, tokenizer, pairs):
    """Cross-check with the model's own loss: -sum(reply log-probs) = mean CE over reply tokens x count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir).eval()
    t = tokenize_pair(tokenizer, pairs[0])
    assert tokenizer.decode(t.chosen_ids) == pairs[0]["chosen"][0]["content"] + tokenizer.eos_token
    ids = t.prompt_ids + t.chosen_ids
    labels = [-100] * len(t.prompt_ids) + t.chosen_ids
    with torch.no_grad():
        ce = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    (chosen,), _ = reply_logprobs(model, tokenizer, [t], max_length=None)
    assert chosen == pytest.approx(-ce * len(t.chosen_ids), rel=1e-5)


def test_rpo_adds_alpha_times_the_chosen_nll(tmp_path, tiny_base_model_dir, tokenizer, pairs):
    """First step (policy == reference): DPO's sigmoid loss is ln 2, so the logged loss is
    ln 2 + rpo_alpha x the mean NLL of the chosen replies of the batch (here all 4 pairs)."""
    from transformers import AutoModelForCausalLM

    batch = pairs[:4]
    with torch_threads(1):
        trainer, _, _ = build_dpo_trainer(
            model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=batch, bf16=False,
            settings=DPOSettings(beta=0.1, max_length=MAX_LENGTH, rpo_alpha=0.5), trainer_args=trainer_args(tmp_path))
        trainer.train()
        nll = chosen_nll(AutoModelForCausalLM.from_pretrained(tiny_base_model_dir).eval(), tokenizer, batch)
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)


def test_lora_and_precomputed_reference(tmp_path, tiny_base_model_dir, tokenizer, pairs):
    """LoRA: no reference copy (adapters off = the initial model), only adapter weights train.
    precompute_ref_log_probs: no reference model; the stored reference log-probs are the initial
    model's, equal to our own scoring of the pairs."""
    from transformers import AutoModelForCausalLM

    batch = pairs[:4]
    with torch_threads(1):
        lora, _, _ = build_dpo_trainer(
            model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=batch, bf16=False,
            settings=DPOSettings(max_length=MAX_LENGTH, use_lora=True, lora_r=4, lora_alpha=8),
            trainer_args=trainer_args(tmp_path / "lora", learning_rate=5e-2, max_steps=2))
        assert lora.ref_model is None
        trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        lora.train()
        losses = [h["loss"] for h in lora.state.log_history if "loss" in h]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] != losses[0]

        pre, _, _ = build_dpo_trainer(
            model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=batch, bf16=False,
            settings=DPOSettings(max_length=MAX_LENGTH, precompute_ref_log_probs=True), trainer_args=trainer_args(tmp_path / "pre"))
        assert pre.ref_model is None
        stored = {(tuple(r["prompt_ids"]) + tuple(r["chosen_ids"])): (r["ref_chosen_logps"], r["ref_rejected_logps"])
                  for r in pre.train_dataset}
        model = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir).eval()
        tokenized = [tokenize_pair(tokenizer, p) for p in batch]
        chosen, rejected = reply_logprobs(model, tokenizer, tokenized, max_length=MAX_LENGTH)
        for t, c, r in zip(tokenized, chosen, rejected):
            assert stored[tuple(t.prompt_ids) + tuple(t.chosen_ids)] == pytest.approx((c, r), rel=1e-4)
        pre.train()
        assert next(h for h in pre.state.log_history if "loss" in h)["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_max_prompt_length_drops_and_counts_long_prompts(tmp_path, tiny_base_model_dir, tokenizer, pairs):
    lengths = [len(tokenize_pair(tokenizer, p).prompt_ids) for p in pairs[:16]]
    limit = sorted(lengths)[8]
    with torch_threads(1):
        trainer, _, stats = build_dpo_trainer(
            model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=pairs[:16], bf16=False,
            settings=DPOSettings(max_length=MAX_LENGTH, max_prompt_length=limit), trainer_args=trainer_args(tmp_path))
    assert stats["dropped_prompt_too_long"] == sum(n > limit for n in lengths) > 0
    assert stats["train_pairs"] == sum(n <= limit for n in lengths)
    assert max(len(r["prompt_ids"]) for r in trainer.train_dataset) <= limit
    with pytest.raises(ConfigError, match="drops all 16"):
        build_dpo_trainer(model_dir=str(tiny_base_model_dir), tokenizer=tokenizer, train_pairs=pairs[:16], bf16=False,
                          settings=DPOSettings(max_length=MAX_LENGTH, max_prompt_length=1), trainer_args=trainer_args(tmp_path))


def launch_two_ranks(tmp_path: Path, model_dir: Path, pairs_file: Path, *flags: str) -> Path:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT))
    ds = REPO_ROOT / "conf" / "deepspeed" / "zero3.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file", str(ds),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
           "--dynamo_backend", "no", "--mixed_precision", "no", "--zero3_init_flag", "true",
           str(REPO_ROOT / "tests" / "dpo_zero3_worker.py"), str(model_dir), str(pairs_file), str(out), str(ds), *flags]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "precompute", "lora"])
def test_zero3_two_ranks_train_on_different_pairs_and_the_saved_model_is_the_trained_one(
        tmp_path, tiny_base_model_dir, pairs_file, mode):
    """2 processes, DeepSpeed ZeRO-3 over gloo on CPU: each rank knows its rank, the ranks train on
    disjoint pairs, the first loss is ln 2 (the reference is the initial model: a sharded copy,
    precomputed log-probs, or the adapter switched off), and the saved model (consolidated weights,
    or the LoRA adapter merged onto the base) reloads here, in a fresh process, to the in-memory
    model's fixed-batch loss."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    small = tmp_path / "pairs24.jsonl"
    small.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:24]))
    out = launch_two_ranks(tmp_path, tiny_base_model_dir, small, *([] if mode == "full" else [f"--{mode}"]))
    records = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert all(len(r["served"]) == 4 for r in records)  # 2 steps x 2 pairs per rank
    assert not set(records[0]["served"]) & set(records[1]["served"])
    result = json.loads((out / "fixed_batch.json").read_text())
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0]
    if mode == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(tiny_base_model_dir, use_safetensors=True)
        model = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(out / "model", use_safetensors=True).eval()
        trained, initial = load_file(out / "model" / "model.safetensors"), load_file(tiny_base_model_dir / "model.safetensors")
        assert trained.keys() == initial.keys() and all(not torch.equal(trained[k], initial[k]) for k in initial)
    with torch.no_grad():
        reloaded = model(**{k: torch.tensor(v) for k, v in result["batch"].items()}).loss.item()
    assert reloaded == pytest.approx(result["loss"], rel=1e-5)

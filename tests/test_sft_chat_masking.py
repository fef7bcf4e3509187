"""The sft stage, preflight, eval and the hand-off check on pipeline.data.chat_masking's masks: a real
chat template without {% generation %} markers (Qwen2.5's, on its real tokenizer) trains exactly
the verified masks, a row that fails verification is named by file and row, the eval's
assistant-token loss scores the same tokens, and the hand-off check names a NaN loss or an empty
fixed batch for what they are."""

from __future__ import annotations

import json
import math

import pytest

from chat_tokenizers import gguf_tokenizer, trl_template
from pipeline.config import DataConfig, PathsConfig, PipelineConfig, SFTConfig
from pipeline.data.chat_masking import labels_from_mask, mask_assistant_tokens
from pipeline.errors import ConfigError, StageFailed

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": " Rome."},
     {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "\nMadrid."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
    [{"role": "user", "content": "Largest planet?"}, {"role": "assistant", "content": "Jupiter."}],
    [{"role": "user", "content": "Color of the sky?"}, {"role": "assistant", "content": "Blue, on a clear day."}],
]
# Uppercases a reply that asks for it: the rendered tokens are not the reply, so masking must refuse.
SHOUTING_QWEN = trl_template("qwen2_5").replace(
    "message.content + '<|im_end|>'",
    "(message.content | upper if 'shout' in message.content else message.content) + '<|im_end|>'")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    tok = gguf_tokenizer("qwen2")
    tok.chat_template = trl_template("qwen2_5")
    return tok


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory, qwen_tokenizer):
    """A tiny random Llama on Qwen2.5's real tokenizer and template (no generation markers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("qwen-tiny")
    model.save_pretrained(out)
    qwen_tokenizer.save_pretrained(out)
    return out


def _write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def _cfg(tmp_path, files, *, heldout_fraction=0.0, max_length=128):
    return PipelineConfig(data=DataConfig(sft_files=files, heldout_fraction=heldout_fraction),
                          sft=SFTConfig(max_length=max_length, per_device_train_batch_size=2, max_steps=1),
                          paths=PathsConfig(run_dir=str(tmp_path)))


def test_sft_stage_trains_the_verified_masks_of_a_template_without_markers(tmp_path, qwen_tokenizer, qwen_model_dir):
    from pipeline.stages.sft import build_sft_trainer

    assert "{%- generation" not in qwen_tokenizer.chat_template and "{% generation" not in qwen_tokenizer.chat_template
    data = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    setup = build_sft_trainer(_cfg(tmp_path, [data]), tokenizer=qwen_tokenizer, input_model=str(qwen_model_dir),
                              checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")
    expected = {}
    for conv in CONVERSATIONS:
        ex = mask_assistant_tokens(qwen_tokenizer, conv, max_length=128)
        expected[tuple(ex.input_ids)] = ex.labels()
    dataset = setup.trainer.train_dataset
    assert len(dataset) == len(CONVERSATIONS)
    for row in dataset:
        assert row["labels"] == expected[tuple(row["input_ids"])]
    # The collator pads and keeps the labels; the fixed batch holds the same labels.
    batch = setup.collator([dataset[0], dataset[1]])
    for r in range(2):
        n = len(dataset[r]["input_ids"])
        assert batch["labels"][r].tolist()[:n] == dataset[r]["labels"]
    for ids, labels in zip(setup.fixed_batch["input_ids"], setup.fixed_batch["labels"]):
        trained = qwen_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
    assert setup.data_stats["assistant_tokens_in_train_split"] == sum(sum(1 for v in lab if v != -100) for lab in expected.values())
    assert setup.data_stats["rows_dropped_no_trained_token"] == 0


def test_sft_stage_names_the_row_whose_mask_fails_verification(tmp_path, qwen_tokenizer, qwen_model_dir):
    from pipeline.stages.sft import build_sft_trainer

    tok = gguf_tokenizer("qwen2")
    tok.chat_template = SHOUTING_QWEN
    convs = [*CONVERSATIONS[:4], [{"role": "user", "content": "Loud?"}, {"role": "assistant", "content": "shout it"}]]
    data = _write_jsonl(tmp_path / "chat.jsonl", convs)
    with pytest.raises(ConfigError, match=r"data\.sft_files \(.*chat\.jsonl\) row 4: message 1 \(assistant\): "
                                          r"the tokens found for the reply decode to 'SHOUT IT'"):
        build_sft_trainer(_cfg(tmp_path, [data], heldout_fraction=0.3), tokenizer=tok, input_model=str(qwen_model_dir),
                          checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")


def test_preflight_sample_checks_the_first_rows_of_each_file(tmp_path):
    from pipeline.stages.sft import PREFLIGHT_ROWS_PER_FILE, check_sft_sample_formatting

    tok = gguf_tokenizer("qwen2")
    tok.chat_template = SHOUTING_QWEN
    shout = [{"role": "user", "content": "Loud?"}, {"role": "assistant", "content": "shout it"}]
    early = _write_jsonl(tmp_path / "early.jsonl", [CONVERSATIONS[0], CONVERSATIONS[1], shout])
    with pytest.raises(ConfigError, match=r"data\.sft_files \(.*early\.jsonl\) row 2: message 1"):
        check_sft_sample_formatting(_cfg(tmp_path, [early]), tok, "tok")
    late = _write_jsonl(tmp_path / "late.jsonl", [CONVERSATIONS[2]] * PREFLIGHT_ROWS_PER_FILE + [shout])
    check_sft_sample_formatting(_cfg(tmp_path, [late]), tok, "tok")  # a sample: the 9th row is sft's to find


def test_eval_assistant_token_loss_scores_the_same_tokens(qwen_tokenizer, qwen_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation import metrics as ev_metrics

    model = AutoModelForCausalLM.from_pretrained(qwen_model_dir, dtype=torch.float32)
    out = ev_metrics.assistant_token_loss(model, qwen_tokenizer, CONVERSATIONS, max_length=128, batch_size=4)
    masks = [mask_assistant_tokens(qwen_tokenizer, c, max_length=128) for c in CONVERSATIONS]
    assert out["tokens"] == sum(sum(ex.assistant_mask[1:]) for ex in masks)
    # The same number by hand: mean NLL over the masked labels, one conversation at a time.
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in masks:
            ids = torch.tensor([ex.input_ids])
            labels = torch.tensor([labels_from_mask(input_ids=ex.input_ids, assistant_mask=ex.assistant_mask)])
            logits = model(input_ids=ids).logits[:, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    assert count == out["tokens"] and math.isclose(out["loss"], nll / count, rel_tol=1e-4)


def test_hand_off_check_names_a_nan_loss_and_an_empty_fixed_batch():
    from pipeline.training.verify import check_fixed_batch_loss, predicted_tokens

    batch = {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]], "labels": [[5, -100, 7]]}
    assert predicted_tokens(batch) == 1  # position 0 is never predicted
    check_fixed_batch_loss(batch, trained_loss=2.5)
    with pytest.raises(StageFailed, match="non-finite loss on the fixed batch .*diverged"):
        check_fixed_batch_loss(batch, trained_loss=float("nan"))
    empty = {**batch, "labels": [[5, -100, -100]]}
    with pytest.raises(StageFailed, match="fixed verification batch has no trained token") as err:
        check_fixed_batch_loss(empty, trained_loss=float("nan"))
    assert "ZeRO-3" not in str(err.value)


def test_mistral_tokenizer_needs_no_chat_template_for_assistant_only_loss(tmp_path):
    from chat_tokenizers import mistral_v3_tokenizer
    from pipeline.stages.sft import check_chat_template

    tok = mistral_v3_tokenizer(tmp_path / "mistral")
    assert not tok.chat_template
    check_chat_template(tok, assistant_only_loss=True, source="mistral-v3")  # mistral-common encodes it
    with pytest.raises(ConfigError, match="tokenizer of mistral-v3: has no chat template"):
        check_chat_template(tok, assistant_only_loss=False, source="mistral-v3")  # TRL renders full-loss rows


def test_packed_sft_rows_keep_exactly_the_masked_labels(tmp_path, qwen_tokenizer, qwen_model_dir):
    """With sft.packing, TRL packs the pre-tokenized rows (input_ids + labels): every trained label
    survives, and no other token is trained."""
    from collections import Counter

    from pipeline.stages.sft import build_sft_trainer

    data = _write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    cfg = _cfg(tmp_path, [data], max_length=128)
    cfg.sft.packing = True
    setup = build_sft_trainer(cfg, tokenizer=qwen_tokenizer, input_model=str(qwen_model_dir),
                              checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")
    expected = Counter()
    for conv in CONVERSATIONS:
        ex = mask_assistant_tokens(qwen_tokenizer, conv, max_length=128)
        expected.update(t for t in ex.labels() if t != -100)
    packed = Counter(t for row in setup.trainer.train_dataset for t in row["labels"] if t != -100)
    assert len(setup.trainer.train_dataset) < len(CONVERSATIONS) and packed == expected

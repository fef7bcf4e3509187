"""sft data in the formats users bring (chat messages, ShareGPT, alpaca, prompt/completion):
converted once to chat messages, with a clear error naming the file and row for anything else."""

import json

import pytest

from pipeline.config import DataConfig, PathsConfig, PipelineConfig, SFTConfig
from pipeline.data import load_conversations
from pipeline.errors import ConfigError

CHAT = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]

# The same conversation in each format a user might bring.
ROWS = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Seven."}]},
    "alpaca": {"instruction": "Name a prime.", "input": "", "output": "Seven."},
    "prompt_completion": {"prompt": "Name a prime.", "completion": "Seven."},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("declared", ["auto", "exact"])
def test_every_format_becomes_the_same_conversation(tmp_path, fmt, declared):
    f = write_jsonl(tmp_path / f"{fmt}.jsonl", [ROWS[fmt]])
    assert load_conversations([f], sft_format="auto" if declared == "auto" else fmt) == [CHAT]


def test_alpaca_input_follows_the_instruction_and_system_is_kept(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "bonjour", "output": "hello",
                                            "system": "Be brief."}])
    assert load_conversations([f]) == [[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]]


def test_sharegpt_multi_turn_with_system_and_prompt_completion_as_message_lists(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                                  {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                  {"from": "gpt", "value": "d"}]}
    conversational_pc = {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}
    f = write_jsonl(tmp_path / "mixed.jsonl", [sharegpt, conversational_pc])
    convs = load_conversations([f])
    assert [m["role"] for m in convs[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[1] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("row, fmt, message", [
    ({"question": "q", "answer": "a"}, "auto", r"row 1: no sft format recognised from the columns \['answer', 'question'\]"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "auto", "unknown ShareGPT speaker 'narrator'"),
    ({"instruction": "i", "output": 3}, "auto", "alpaca rows need string 'instruction' and 'output'"),
    ({"prompt": "p", "completion": ""}, "auto", "has no assistant message"),
    ({"messages": CHAT}, "alpaca", r"alpaca rows need .*\(format: alpaca\)"),
    ({"messages": CHAT}, "xml", "data.sft_format: unknown format 'xml'"),
])
def test_unusable_rows_are_named_by_file_and_row(tmp_path, row, fmt, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [ROWS["messages"], row])
    with pytest.raises(ConfigError, match=message) as e:
        load_conversations([f], sft_format=fmt)
    if fmt != "xml":
        assert "bad.jsonl" in str(e.value)


def test_preflight_checks_the_first_row_through_the_chat_template(tmp_path, tiny_base_model_dir):
    """Sample rows go through the real masking before anything runs: an alpaca file passes, and a
    template that does not write the assistant's reply is refused, naming the row."""
    import shutil

    from pipeline.checks.preflight import preflight

    data = write_jsonl(tmp_path / "alpaca.jsonl", [ROWS["alpaca"]])
    cfg = PipelineConfig(stage="sft", data=DataConfig(sft_files=[data], cpt_files=[data]), sft=SFTConfig(),
                         paths=PathsConfig(run_dir=str(tmp_path / "run"), output_root=str(tmp_path)))
    cfg.model.name_or_path = str(tiny_base_model_dir)
    preflight(cfg)

    from transformers import AutoTokenizer

    from pipeline.models.demo import CHAT_TEMPLATE

    # The assistant's reply is not written at all: nothing to train on, found on the sample row.
    wrapped = "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    assert wrapped in CHAT_TEMPLATE
    model = tmp_path / "model"
    shutil.copytree(tiny_base_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE.replace(wrapped, "{{- eos_token }}")
    tok.save_pretrained(model)
    cfg.model.name_or_path = str(model)
    with pytest.raises(ConfigError, match=r"alpaca.jsonl\) row 0: message 1 \(assistant\): the chat template does not "
                                          "render this turn's content"):
        preflight(cfg)


def test_sft_stage_trains_on_alpaca_data(tmp_path, tiny_base_model_dir):
    """An alpaca file goes through the real sft trainer: its rows are the converted conversations."""
    from transformers import AutoTokenizer

    from pipeline.stages.sft import build_sft_trainer

    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(1, i + 1))}
            for i in range(1, 9)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    cfg = PipelineConfig(data=DataConfig(sft_files=[data], heldout_fraction=0.0),
                         sft=SFTConfig(max_length=64, per_device_train_batch_size=2, max_steps=1),
                         paths=PathsConfig(run_dir=str(tmp_path)))
    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    setup = build_sft_trainer(cfg, tokenizer=tok, input_model=str(tiny_base_model_dir),
                                              checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")
    trainer, collator = setup.trainer, setup.collator
    assert len(trainer.train_dataset) == 8
    batch = collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(trained, skip_special_tokens=True).strip() in {r["output"] for r in rows}

"""Preference data for DPO (pipeline/data/preference.py): every accepted format becomes TRL's
conversational preference example, and every bad row is refused naming its file and row."""

from __future__ import annotations

import json

import pytest

from pipeline.data import conversation_key, is_heldout
from pipeline.data.preference import (
    check_preference_files,
    load_preferences,
    preference_key,
    split_preferences,
)
from pipeline.errors import ConfigError

Q, A, B = "What is a polygon?", "A closed chain of line segments.", "Bollywood is a film industry."
EXPECTED = {"prompt": [{"role": "user", "content": Q}],
            "chosen": [{"role": "assistant", "content": A}],
            "rejected": [{"role": "assistant", "content": B}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_chosen_rejected_strings(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": Q, "chosen": A, "rejected": B, "score": 3}])
    assert load_preferences([f]) == [EXPECTED]
    assert load_preferences([f], dpo_format="strings") == [EXPECTED]


def test_ultrafeedback_binarized_full_conversations(tmp_path):
    """chosen/rejected are whole conversations sharing the prompt turns; UltraFeedback's `prompt`
    string and score columns are not used; extra message keys are dropped."""
    system = {"role": "system", "content": "Be brief."}
    turns = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": Q}]
    row = {"prompt": Q, "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
           "chosen": turns + [{"role": "assistant", "content": A, "name": "gpt"}],
           "rejected": turns + [{"role": "assistant", "content": B}]}
    [pair] = load_preferences([write_jsonl(tmp_path / "uf.jsonl", [row])])
    assert pair == {"prompt": turns, "chosen": [EXPECTED["chosen"][0]], "rejected": [EXPECTED["rejected"][0]]}


def test_explicit_prompt_messages_json_and_parquet(tmp_path):
    """TRL's own explicit-prompt conversational form, from .json and .parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"prompt": EXPECTED["prompt"], "chosen": EXPECTED["chosen"], "rejected": EXPECTED["rejected"]}
    (tmp_path / "p.json").write_text(json.dumps([row]))
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "p.parquet")
    assert load_preferences([str(tmp_path / "p.json"), str(tmp_path / "p.parquet")]) == [EXPECTED, EXPECTED]


def test_formats_may_mix_per_row_with_auto_but_not_when_pinned(tmp_path):
    f = write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": Q, "chosen": A, "rejected": B},
        {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
         "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]},
    ])
    assert load_preferences([f]) == [EXPECTED, EXPECTED]
    with pytest.raises(ConfigError, match=r"row 1.*format: strings"):
        load_preferences([f], dpo_format="strings")


def refusal(tmp_path, row, **kw) -> str:
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": Q, "chosen": A, "rejected": B}, row])
    with pytest.raises(ConfigError) as e:
        load_preferences([f], **kw)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "row 1" in msg, msg  # names the file and the row
    return msg


@pytest.mark.parametrize("row, problem", [
    ({"prompt": Q, "chosen": A, "rejected": A}, "same text"),
    ({"prompt": Q, "chosen": A + "  ", "rejected": " " + A}, "same text"),
    ({"prompt": "  ", "chosen": A, "rejected": B}, "'prompt' is empty"),
    ({"prompt": Q, "chosen": "", "rejected": B}, "'chosen' reply is empty"),
    ({"chosen": [{"role": "assistant", "content": A}], "rejected": [{"role": "assistant", "content": B}]},
     "prompt is empty"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
      "rejected": [{"role": "user", "content": "Something else?"}, {"role": "assistant", "content": B}]},
     "different prompt turns"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
      "rejected": [{"role": "system", "content": "x"}, {"role": "user", "content": Q},
                   {"role": "assistant", "content": B}]},
     "different prompt turns"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
      "rejected": [{"role": "user", "content": Q}, {"role": "user", "content": B}]},
     "must end with an assistant message"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": [{"type": "text"}]}],
      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]},
     "non-text content"),
    ({"prompt": EXPECTED["prompt"], "chosen": EXPECTED["chosen"] * 2, "rejected": EXPECTED["rejected"]},
     "exactly the one assistant reply"),
])
def test_bad_rows_are_refused_with_file_row_and_problem(tmp_path, row, problem):
    assert problem in refusal(tmp_path, row)


@pytest.mark.parametrize("row", [
    {"instruction": Q, "output": A},  # alpaca: an sft format, not preferences
    {"prompt": Q, "chosen": A},  # no rejected
    {"prompt": Q, "chosen": 3, "rejected": B},
    {"messages": [{"role": "user", "content": Q}]},
])
def test_unrecognised_rows_list_the_accepted_formats(tmp_path, row):
    msg = refusal(tmp_path, row)
    assert "no preference format recognised" in msg and "UltraFeedback" in msg and "'prompt'/'chosen'/'rejected'" in msg


def test_files_and_format_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_preferences([str(tmp_path / "missing.jsonl")])
    txt = tmp_path / "p.txt"
    txt.write_text("hello")
    with pytest.raises(ConfigError, match=r"p\.txt.*\.jsonl/\.json/\.parquet"):
        load_preferences([str(txt)])
    with pytest.raises(ConfigError, match="no files given"):
        load_preferences([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="contain no preference pairs"):
        load_preferences([str(empty)])
    f = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": Q, "chosen": A, "rejected": B}])
    with pytest.raises(ConfigError, match=r"data.dpo_format.*unknown format 'ultrafeedback'"):
        load_preferences([f], dpo_format="ultrafeedback")


def test_hub_names_are_refused_offline_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot be fetched offline"):
        load_preferences(["HuggingFaceH4/ultrafeedback_binarized:train_prefs"])


def test_preflight_check_counts_pairs_and_finds_a_bad_row_late_in_the_file(tmp_path):
    good = [{"prompt": f"{Q} {i}", "chosen": A, "rejected": B} for i in range(50)]
    f = write_jsonl(tmp_path / "p.jsonl", good + [{"prompt": Q, "chosen": B, "rejected": B}])
    assert check_preference_files([f], max_rows=50) == 50
    with pytest.raises(ConfigError, match="row 50"):
        check_preference_files([f])


def test_heldout_split_follows_the_sft_split_of_the_chosen_conversation():
    """A pair built from an sft conversation (its reference answer as chosen) is held out exactly
    when sft holds that conversation out, whatever the rejected reply is."""
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}],
              "chosen": [{"role": "assistant", "content": f"answer {i}"}],
              "rejected": [{"role": "assistant", "content": f"other {i % 7}"}]} for i in range(400)]
    split = split_preferences(pairs, 0.25)
    assert 50 < len(split.heldout) < 150 and len(split.train) + len(split.heldout) == 400
    for p in pairs:
        sft_conv = p["prompt"] + p["chosen"]
        assert preference_key(p) == conversation_key(sft_conv)
        assert (p in split.heldout) == is_heldout(conversation_key(sft_conv), 0.25)


def _make_demo_preferences():
    import importlib.util

    from pipeline.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("make_demo_preferences", REPO_ROOT / "scripts" / "make_demo_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_demo_preferences_are_reproduced_byte_for_byte(tmp_path):
    """data/demo/preferences.jsonl is what the script writes (mismatched-answer negatives, fixed
    seed); 96 of its 384 pairs are held out at the demo's heldout_fraction 0.05, and those are
    exactly the pairs whose conversation sft holds out."""
    from pipeline.config import REPO_ROOT
    from pipeline.data import load_conversations

    script = _make_demo_preferences()
    stats = script.main(["--out", str(tmp_path / "p.jsonl")])
    shipped = REPO_ROOT / "data" / "demo" / "preferences.jsonl"
    assert (tmp_path / "p.jsonl").read_bytes() == shipped.read_bytes()
    assert (stats["pairs"], stats["heldout_pairs"], stats["train_pairs"]) == (384, 96, 288)
    pairs = load_preferences([str(shipped)])
    split = split_preferences(pairs, 0.05)
    assert (len(split.train), len(split.heldout)) == (288, 96)
    sft = {conversation_key(c) for c in load_conversations([str(REPO_ROOT / "data" / "demo" / "instructions.jsonl")])}
    for p in pairs:
        assert conversation_key(p["prompt"] + p["chosen"]) in sft  # chosen = the reference answer
        assert conversation_key(p["prompt"] + p["rejected"]) not in sft  # rejected: another question's answer


def test_rejected_replies_sampled_from_a_model(tmp_path, tiny_base_model_dir, tiny_data_dir):
    script = _make_demo_preferences()
    stats = script.main(["--input", str(tiny_data_dir / "instructions.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                         "--model", str(tiny_base_model_dir), "--train-pairs", "3", "--heldout-pairs", "1",
                         "--max-new-tokens", "8", "--batch-size", "4"])
    pairs = load_preferences([str(tmp_path / "s.jsonl")])
    assert len(pairs) == stats["pairs"] == 4 - stats["skipped_samples"] and pairs
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all("sample of the model" in r["source"]["rejected"] for r in rows)

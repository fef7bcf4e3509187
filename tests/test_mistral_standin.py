"""The SOLAR experiment's own base model, Mistral-7B-Instruct-v0.3, proven on a local stand-in
(issue #11): a tiny random ``MistralForCausalLM`` with the real v3 tokenizer (mistral-common's
package data) and the Hub's v0.3 chat template, built offline here, never vendored.

- ``python -m pipeline experiment=solar_10.7b preflight=true`` composes for the stand-in on CPU and
  its chat-template check masks the demo's sample rows through mistral-common.
- base -> merge -> sft on 2 processes under DeepSpeed ZeRO-3 (the real ``accelerate launch`` path)
  trains exactly the assistant tokens: reply + ``</s>`` of each row, and a row's system prompt is in
  its input ids (mistral-common keeps it; the Hub template would drop it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chat_tokenizers import mistral_v3_tokenizer

from pipeline.config import REPO_ROOT

DEMO_DATA = REPO_ROOT / "data" / "demo"

# The Hub's chat template of mistralai/Mistral-7B-Instruct-v0.3 (its tokenizer_config.json
# "chat_template", the revision with tool calling, 2024-08). Not on this machine as a file; the text
# is the one public copies quote (e.g. zhudotexe/kani, kani/prompts/impl/mistral.py), with the Hub
# file's blank lines (they render to nothing: `{#-` and `{{-` strip them). Kept for what the
# stand-in must look like - the pipeline does not render Mistral conversations with it (see
# docs/chat-masking.md: it drops the system prompt of a conversation that ends with a reply).
MISTRAL_7B_INSTRUCT_V03_CHAT_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


def build_mistral_v03_standin(out: Path) -> Path:
    """A tiny random MistralForCausalLM shaped like Mistral-7B-Instruct-v0.3 where it matters to the
    pipeline (vocab 32,768, grouped-query attention 4:1, untied embeddings, rope_theta 1e6, no
    sliding window, bf16 weights, the real v3 tokenizer and the Hub's chat template); hidden 64,
    4 layers instead of 4096 and 32."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    tokenizer = mistral_v3_tokenizer(out)  # copies mistral-common's tokenizer.model.v3 to out/tokenizer.model
    # The Hub repo ships the same SentencePiece file under both names (mistral-common reads the .v3 one).
    shutil.copyfile(out / "tokenizer.model", out / "tokenizer.model.v3")
    tokenizer.chat_template = MISTRAL_7B_INSTRUCT_V03_CHAT_TEMPLATE
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1.0e6, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mistral_standin(tmp_path_factory) -> Path:
    return build_mistral_v03_standin(tmp_path_factory.mktemp("mistral-7b-instruct-v0.3-standin"))


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def solar_overrides(model_dir: Path, out: Path, *, sft_file: Path) -> list[str]:
    """What makes `experiment=solar_10.7b` compose for the 4-layer stand-in on a CPU machine: the
    stand-in as base, SOLAR's n/m arithmetic with n=1 ([0,3) + [1,4) = 6 layers), the demo data,
    2 CPU processes under ZeRO-3, short sequences."""
    return [
        "experiment=solar_10.7b", f"model.name_or_path={model_dir}", "merge=dus", "merge.n_layers_removed=1",
        f"data.cpt_files=[{DEMO_DATA / 'corpus.txt'}]", f"data.sft_files=[{sft_file}]",
        f"data.dpo_files=[{DEMO_DATA / 'preferences.jsonl'}]", "dpo.max_length=256", "dpo.gradient_checkpointing=false",
        "distributed=cpu_zero3", f"paths.output_root={out}", f"paths.cache_dir={out}/cache", "run_name=solar_standin",
        "cpt.seq_len=128", "cpt.per_device_train_batch_size=2", "cpt.gradient_accumulation_steps=1",
        "cpt.gradient_checkpointing=false",
        "sft.max_length=256", "sft.per_device_train_batch_size=2", "sft.gradient_accumulation_steps=1",
        "sft.gradient_checkpointing=false",
        "eval.seq_len=128", "eval.batch_size=2", "eval.use_harness=false",
    ]


def run_pipeline(args: list[str], *, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], check=False, cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The stand-in itself (fast)
# ---------------------------------------------------------------------------------------------

def test_standin_is_mistral_v03_shaped_and_masked_through_mistral_common(mistral_standin):
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.data.chat_masking import mask_assistant_tokens, mistral_common_tokenizer_for

    config = AutoConfig.from_pretrained(mistral_standin)
    assert config.model_type == "mistral" and config.vocab_size == 32768 and config.num_hidden_layers == 4
    assert (mistral_standin / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(mistral_standin)
    assert len(tok) == 32768 and tok.chat_template == MISTRAL_7B_INSTRUCT_V03_CHAT_TEMPLATE
    mistral = mistral_common_tokenizer_for(tok)
    assert mistral is not None and type(mistral.instruct_tokenizer).__name__ == "InstructTokenizerV3"

    conv = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    # The Hub template on a training conversation (ends with a reply) drops the system prompt ...
    assert "Answer in one word." not in tok.apply_chat_template(conv, tokenize=False)
    assert tok.apply_chat_template(conv[1:], tokenize=False) == "<s>[INST] Capital of France?[/INST] Paris.</s>"
    # ... the pipeline encodes it with mistral-common, which keeps it (in the last user turn).
    ex = mask_assistant_tokens(tok, conv, where="stand-in")
    assert ex.encoder == "mistral_common"
    assert "Answer in one word." in tok.decode(ex.input_ids)
    trained = [t for t, m in zip(ex.input_ids, ex.assistant_mask) if m]
    assert tok.decode(trained) == "Paris.</s>"


# A system prompt on every other row: Mistral-7B-Instruct-v0.3's Hub template drops it from a
# training conversation, mistral-common keeps it; the test checks which one the sft stage used.
SYSTEM_PROMPT = "You are a concise assistant. Answer in plain English."
SFT_ROWS = 48


def write_sft_rows(path: Path) -> list[list[dict]]:
    """The first SFT_ROWS conversations of data/demo/instructions.jsonl, every even one with a
    system prompt, plus one two-turn conversation made of two demo rows."""
    conversations = []
    with open(DEMO_DATA / "instructions.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= SFT_ROWS:
                break
            messages = json.loads(line)["messages"]
            if i % 2 == 0:
                messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
            conversations.append(messages)
    conversations.append([*conversations[1], *conversations[3]])
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    return conversations


def reference_mistral_v3():
    """mistral-common's own v3 encoder (the oracle the tests compare with; the pipeline finds it
    by the tokenizer's pieces, this takes it by file name)."""
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    return MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)


def sentencepiece_v3():
    """The v3 SentencePiece model itself (what Mistral's ids are defined by)."""
    import mistral_common
    import sentencepiece

    path = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def reference_ids(mistral, conversation: list[dict]) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in conversation])
    return list(mistral.encode_chat_completion(request).tokens)


# ---------------------------------------------------------------------------------------------
# python -m pipeline experiment=solar_10.7b preflight=true
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # a Hydra CLI start, the merge plan and 8 rows through mistral-common: ~15-25 s on a loaded machine
def test_solar_experiment_preflight_passes_on_the_standin(mistral_standin, tmp_path):
    args = ["preflight=true", *solar_overrides(mistral_standin, tmp_path, sft_file=DEMO_DATA / "instructions.jsonl")]
    proc = run_pipeline(args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "preflight: no problems found" in out
    # SOLAR's arithmetic with n=1 on 4 layers: [0,3) + [1,4) = 6 layers, from the merge plan.
    assert "model after merge: 6 layers" in out and "(merge plan)" in out
    assert "ZeRO-3 on 2 process(es)" in out  # distributed=cpu_zero3 replaced the experiment's 8 GPUs
    # The chat-template check: the first 8 demo rows masked through mistral-common, each verified,
    # training reply + </s> of each (counted here with SentencePiece itself, independently; not with
    # the HF fast tokenizer, which splits "  " differently: see the test below).
    sp = sentencepiece_v3()
    with open(DEMO_DATA / "instructions.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f))["messages"] for _ in range(8)]
    expected = sum(len(sp.encode(m["content"])) + 1 for conv in rows for m in conv if m["role"] == "assistant")
    line = (f"preflight sft: 8 of the first 8 rows of {DEMO_DATA / 'instructions.jsonl'} masked and verified "
            f"(encoder: mistral_common, {expected} trained tokens)")
    assert line in out, out[-3000:]
    run_dir = tmp_path / "solar_standin"
    assert not (run_dir.exists() and [p for p in run_dir.iterdir() if p.name[:2].isdigit()]), "a stage ran"


def test_training_ids_are_sentencepiece_s_where_the_hf_fast_tokenizer_differs(mistral_standin):
    """The fast tokenizer transformers converts from tokenizer.model.v3 splits a double space
    differently from SentencePiece ('.  It' -> '▁▁', 'It' instead of '▁', '▁It'); row 3 of the demo
    data has one. Mistral's ids are SentencePiece's: the masked rows carry those (mistral-common), and
    the trained tokens are exactly the reply's SentencePiece encoding + </s>."""
    from transformers import AutoTokenizer

    from pipeline.data.chat_masking import mask_assistant_tokens

    tok = AutoTokenizer.from_pretrained(mistral_standin)
    sp = sentencepiece_v3()
    with open(DEMO_DATA / "instructions.jsonl", encoding="utf-8") as f:
        conv = [json.loads(line)["messages"] for _, line in zip(range(4), f)][3]
    reply = conv[-1]["content"]
    assert "  " in reply
    hf_ids = tok(reply, add_special_tokens=False)["input_ids"]
    sp_ids = sp.encode(reply)
    assert hf_ids != sp_ids  # the discrepancy this test is about (if a release fixes it, drop this line)
    ex = mask_assistant_tokens(tok, conv, where="demo row 3")
    assert ex.input_ids == reference_ids(reference_mistral_v3(), conv)
    assert [t for t, m in zip(ex.input_ids, ex.assistant_mask) if m] == sp_ids + [tok.eos_token_id]


# ---------------------------------------------------------------------------------------------
# base -> merge -> sft on 2 processes under DeepSpeed ZeRO-3 (accelerate launch), eval, release
# ---------------------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.25  # ~12 of the 49 conversations held out: a fixed batch of 4 with and without system prompts


@pytest.fixture(scope="module")
def solar_sft_run(mistral_standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("solar-sft")
    sft_file = out / "sft.jsonl"
    conversations = write_sft_rows(sft_file)
    # The sft hand-off is what this run proves: dpo and the quant ladder stay off.
    args = [*solar_overrides(mistral_standin, out, sft_file=sft_file), "cpt.enabled=false", "dpo.enabled=false",
            "quantize=none",
            f"data.heldout_fraction={HELDOUT_FRACTION}", "sft.max_steps=2", "sft.save_steps=2", "sft.logging_steps=1",
            "eval.max_heldout_tokens=2048"]
    proc = run_pipeline(args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / "solar_standin", conversations, proc


def _trained_spans(ids: list[int], conversation: list[dict], sp, eos: int, inst_end: int) -> list[tuple[int, int]]:
    """Where each reply + </s> sits in mistral-common's ids, found independently of the pipeline:
    the k-th </s> closes the k-th reply, whose SentencePiece encoding ends there, right after [/INST]."""
    eos_at = [k for k, t in enumerate(ids) if t == eos]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert len(eos_at) == len(replies)
    spans = []
    for reply, end in zip(replies, eos_at):
        own = sp.encode(reply)
        start = end - len(own)
        assert ids[start:end] == own and ids[start - 1] == inst_end
        spans.append((start, end + 1))
    return spans


@pytest.mark.slow  # base -> merge -> 2-rank ZeRO-3 sft -> eval -> release: ~2 min of 2 loaded cores
def test_sft_on_the_standin_trains_exactly_each_reply_and_its_eos(solar_sft_run, mistral_standin):
    from transformers import AutoTokenizer

    run_dir, conversations, proc = solar_sft_run
    assert sorted(p.name for p in run_dir.iterdir() if p.name[:2].isdigit()) == ["00_base", "01_merge", "03_sft", "05_eval"]
    tok = AutoTokenizer.from_pretrained(mistral_standin)
    sp, mistral = sentencepiece_v3(), reference_mistral_v3()
    eos, inst_end = tok.eos_token_id, tok.convert_tokens_to_ids("[/INST]")
    by_ids = {tuple(reference_ids(mistral, c)): c for c in conversations}

    batch = json.loads((run_dir / "03_sft" / "logs" / "fixed_batch.json").read_text())
    assert len(batch["input_ids"]) == 4  # FIXED_BATCH_EXAMPLES held-out conversations
    with_system = 0
    for row_ids, row_mask, row_labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = sum(row_mask)
        ids, labels = row_ids[:n], row_labels[:n]
        assert all(lab == -100 for lab in row_labels[n:])
        conv = by_ids.get(tuple(ids))
        assert conv is not None, f"a fixed-batch row is not mistral-common's encoding of any data row: {tok.decode(ids)!r}"
        spans = _trained_spans(ids, conv, sp, eos, inst_end)
        expected = [-100] * n
        for start, end in spans:
            expected[start:end] = ids[start:end]
        assert labels == expected  # -100 everywhere except each reply's tokens + </s>
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert [tok.decode(ids[s:e]) for s, e in spans] == [r + "</s>" for r in replies]
        if conv[0]["role"] == "system":
            with_system += 1
            # mistral-common keeps the system prompt (in the last user turn); the Hub template drops it.
            assert SYSTEM_PROMPT in tok.decode(ids)
            assert SYSTEM_PROMPT not in tok.apply_chat_template(conv, tokenize=False)
    assert with_system >= 1, "no fixed-batch row has a system prompt: change HELDOUT_FRACTION or the rows"

    # Every trained token of the training split counted: reply + </s> of each training conversation.
    from pipeline.data import conversation_key, split_records

    train = split_records(conversations, HELDOUT_FRACTION, conversation_key).train
    metrics = json.loads((run_dir / "03_sft" / "manifest.json").read_text())["metrics"]
    assert metrics["data_train_examples"] == len(train)
    assert metrics["data_assistant_tokens_in_train_split"] == sum(len(sp.encode(m["content"])) + 1
                                                 for c in train for m in c if m["role"] == "assistant")
    assert "encoder: mistral_common" in proc.stdout  # the preflight's sample check, in the same run


@pytest.mark.slow
def test_sft_on_the_standin_ran_two_zero3_ranks_on_different_mistral_common_rows(solar_sft_run):
    import hashlib

    run_dir, conversations, _ = solar_sft_run
    mistral = reference_mistral_v3()
    # The runner fingerprints each example a rank's collator served (sha1 of its input ids).
    fingerprint = {hashlib.sha1(json.dumps(reference_ids(mistral, c)).encode()).hexdigest()[:16]: c
                   for c in conversations}
    records = [json.loads((run_dir / "03_sft" / "logs" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["pid"] != records[1]["pid"]
    served = [set(r["served_indices"]) for r in records]
    assert served[0] and served[1] and not served[0] & served[1], "both ranks trained on the same rows"
    for s in served:
        assert s <= set(fingerprint), "a served row is not mistral-common's encoding of a data row"
    assert any(fingerprint[f][0]["role"] == "system" for s in served for f in s)  # trained with system prompts
    metrics = json.loads((run_dir / "03_sft" / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 3 and metrics["global_step"] == 2
    v = metrics["verification"]
    assert v["abs_diff"] <= v["rtol"] * abs(v["trained_fixed_batch_loss"])  # the ZeRO-3 export reloads


@pytest.mark.slow
def test_eval_release_and_exports_on_the_standin(solar_sft_run, mistral_standin):
    """eval scores the held-out replies + </s> (the tokens sft trains); save_pretrained of the fast
    tokenizer writes no tokenizer.model, so the training stage carries it (and tokenizer.model.v3)
    from its input and the release keeps the file that defines the ids; no local path is published."""
    from pipeline.data import conversation_key, split_records

    run_dir, conversations, _ = solar_sft_run
    sp = sentencepiece_v3()
    heldout = split_records(conversations, HELDOUT_FRACTION, conversation_key).heldout
    heldout_reply_tokens = sum(len(sp.encode(m["content"])) + 1 for c in heldout for m in c if m["role"] == "assistant")
    results = json.loads((run_dir / "05_eval" / "results.json").read_text())
    assert set(results["stages"]) == {"base", "merge", "sft"}
    for stage, metrics in results["stages"].items():
        assert metrics["sft_heldout/examples"] == len(heldout) and metrics["sft_heldout/skipped"] == 0, stage
        assert metrics["sft_heldout/tokens"] == heldout_reply_tokens, stage
        assert metrics["sft_heldout/loss"] > 0, stage
    original = (mistral_standin / "tokenizer.model.v3").read_bytes()
    for folder in ("01_merge", "03_sft", "release"):
        for name in ("tokenizer.model", "tokenizer.model.v3"):
            assert (run_dir / folder / name).read_bytes() == original, f"{folder}/{name}"
    for p in (run_dir / "release").rglob("*"):
        if p.is_file() and p.suffix in (".md", ".json", ".yml", ".jinja"):
            assert str(run_dir.parent) not in p.read_text(encoding="utf-8"), p

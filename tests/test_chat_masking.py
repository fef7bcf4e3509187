"""pipeline.data.chat_masking on real chat templates and tokenizers (offline; see chat_tokenizers.py).

Each template x {1, 2 turns} x {with, without system prompt} x {plain reply, reply starting with a
space / newline}: the ids equal the template's own tokenization, every trained turn decodes to its
reply + end-of-turn token, nothing else is trained, and - where TRL ships a ``*_training.jinja``
with ``{% generation %}`` markers for the same template - the mask equals the one transformers
computes from those markers (an independent oracle). Plus Qwen3 reasoning, truncation, options,
bad input, Mistral v3 through mistral-common, and a real SFTTrainer step training exactly the mask.
"""

from __future__ import annotations

import json

import pytest

from chat_tokenizers import (gemma_standin_tokenizer, gguf_tokenizer, mistral_v3_tokenizer, smollm2_tokenizer,
                             trl_template, with_template)
from pipeline.data.chat_masking import (check_template_masks, labels_from_mask, mask_assistant_tokens,
                                        masked_rows, mistral_common_tokenizer_for)
from pipeline.errors import ConfigError

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
USER1 = {"role": "user", "content": "What is the capital of France?"}
USER2 = {"role": "user", "content": "And of Italy? Explain briefly."}


def _assistant(text):
    return {"role": "assistant", "content": text}


REPLIES = {
    "plain": ("Paris.", "Rome: it has been the capital since 1871."),
    "leading_space": (" Paris, of course.", "  Rome."),
    "leading_newline": ("\nParis.", "\n\nRome, since 1871:\n- capital\n- largest city"),
}


def conversations(*, system: bool):
    """(name, messages) for 1 and 2 turns of each reply style, with or without a system prompt."""
    out = []
    for style, (first, second) in REPLIES.items():
        head = [SYSTEM] if system else []
        out.append((f"1turn-{style}", head + [USER1, _assistant(first)]))
        out.append((f"2turn-{style}", head + [USER1, _assistant(first), USER2, _assistant(second)]))
    return out


# template name -> (tokenizer name, expected end-of-turn token, system prompt supported)
TEMPLATES = {
    "llama3": ("llama3", "<|eot_id|>", True),
    "llama3_1": ("llama3", "<|eot_id|>", True),
    "llama3_2": ("llama3", "<|eot_id|>", True),
    "qwen2_5": ("qwen2", "<|im_end|>", True),  # ChatML, as SmolLM2's
    "qwen3": ("qwen2", "<|im_end|>", True),  # Qwen2.5's vocabulary stands in for Qwen3's (same ChatML tokens)
    "phi3": ("phi3", "<|end|>", True),
    "phi3_5": ("phi3", "<|end|>", True),
    "gemma": ("gemma_standin", "<end_of_turn>", False),  # raises on a system turn by design
    "gemma3": ("gemma_standin", "<end_of_turn>", True),
    "smollm2": ("smollm2", "<|im_end|>", True),  # its own tokenizer and template, from its GGUF
}
# TRL's training variants with generation markers (an oracle where they render the same tokens).
TRL_TRAINING = {"llama3", "qwen2_5", "qwen3", "phi3", "phi3_5", "gemma", "gemma3"}

_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(template: str):
    tok_name = TEMPLATES[template][0]
    if tok_name not in _TOKENIZERS:
        loaders = {"gemma_standin": gemma_standin_tokenizer, "smollm2": smollm2_tokenizer}
        _TOKENIZERS[tok_name] = loaders.get(tok_name, lambda: gguf_tokenizer(tok_name))()
        _TOKENIZERS[tok_name].init_template = _TOKENIZERS[tok_name].chat_template
    tok = _TOKENIZERS[tok_name]
    return with_template(tok, tok.init_template if template == "smollm2" else trl_template(template))


def template_ids(tok, messages, **kwargs):
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(enc["input_ids"]), (list(enc["assistant_masks"]) if "assistant_masks" in enc else None)


def assert_turns_are_replies(tok, messages, ex, eot_token):
    eot_id = tok.convert_tokens_to_ids(eot_token)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [t.message_index for t in ex.turns] == replies
    masked = set()
    for turn in ex.turns:
        assert ex.input_ids[turn.token_end - 1] == eot_id
        text = tok.decode(ex.input_ids[turn.token_start:turn.token_end - 1], skip_special_tokens=False)
        reply = messages[turn.message_index]["content"]
        if not turn.note:
            assert text.strip() == reply.strip(), (text, reply)
        masked.update(range(turn.token_start, turn.token_end))
    assert [k for k, m in enumerate(ex.assistant_mask) if m] == sorted(masked)
    # Nothing of the prompts is trained.
    trained_text = tok.decode([t for t, m in zip(ex.input_ids, ex.assistant_mask) if m])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] not in trained_text


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_masks_exactly_the_replies(template):
    tok = tokenizer_for(template)
    _, eot, system_ok = TEMPLATES[template]
    cases = conversations(system=False) + (conversations(system=True) if system_ok else [])
    compared_with_trl = 0
    for name, messages in cases:
        ex = mask_assistant_tokens(tok, messages, where=f"{template}/{name}")
        ids, _ = template_ids(tok, messages)
        assert ex.input_ids == ids, name
        assert ex.encoder == "chat_template" and not ex.truncated
        assert_turns_are_replies(tok, messages, ex, eot)
        if template in TRL_TRAINING:
            trl_ids, trl_mask = template_ids(tok, messages, chat_template=trl_template(f"{template}_training"),
                                             return_assistant_tokens_mask=True)
            if trl_ids == ids:  # TRL's variant renders the same tokens: its markers are an oracle
                # TRL also marks the newline the template writes after the end-of-turn token.
                ours = [k for k, m in enumerate(ex.assistant_mask) if m]
                theirs = [k for k, m in enumerate(trl_mask) if m and tok.decode([ids[k]]).strip()]
                ours = [k for k in ours if tok.decode([ids[k]]).strip()]
                if template.startswith("phi3"):
                    # Phi-3's training variant also marks the eos the template writes after the
                    # last <|end|>\n; Phi-3 stops at <|end|>, which we train, and not at that eos.
                    theirs = [k for k in theirs if not (k == len(ids) - 1 and ids[k] == tok.eos_token_id)]
                assert ours == theirs, (name, tok.decode([ids[k] for k in ours]), tok.decode([ids[k] for k in theirs]))
                compared_with_trl += 1
    if template in TRL_TRAINING and template != "qwen3":
        assert compared_with_trl == len(cases)


def test_gemma_system_prompt_is_refused_by_its_template_as_config_error():
    tok = tokenizer_for("gemma")
    with pytest.raises(ConfigError, match=r"data\.jsonl row 3: the chat template refused.*System role not supported"):
        mask_assistant_tokens(tok, [SYSTEM, USER1, _assistant("Paris.")], where="data.jsonl row 3")


def test_qwen3_reasoning_kept_in_the_last_turn_and_dropped_from_earlier_ones():
    tok = tokenizer_for("qwen3")
    messages = [USER1, _assistant("<think>\nFrance's capital city.\n</think>\n\nParis."),
                USER2, _assistant("<think>Italy: Rome.</think>Rome.")]
    ex = mask_assistant_tokens(tok, messages, where="qwen3")
    first, last = ex.turns
    # Earlier turn: the template drops the reasoning; the trained tokens are the answer + <|im_end|>.
    assert tok.decode(ex.input_ids[first.token_start:first.token_end]) == "Paris.<|im_end|>"
    assert "reasoning dropped" in first.note
    # Last turn: the reasoning block, as the template writes it, is trained with the answer.
    assert tok.decode(ex.input_ids[last.token_start:last.token_end]) == "<think>\nItaly: Rome.\n</think>\n\nRome.<|im_end|>"
    assert "France's capital" not in tok.decode(ex.input_ids)
    # A last turn without reasoning: the template's empty <think></think> is trained, as TRL's
    # qwen3_training.jinja marks it.
    plain = mask_assistant_tokens(tok, [USER1, _assistant("Paris.")], where="qwen3")
    assert tok.decode([t for t, m in zip(plain.input_ids, plain.assistant_mask) if m]) == \
        "<think>\n\n</think>\n\nParis.<|im_end|>"
    trl_ids, trl_mask = template_ids(tok, [USER1, _assistant("Paris.")], chat_template=trl_template("qwen3_training"),
                                     return_assistant_tokens_mask=True)
    assert trl_ids == plain.input_ids
    assert [m for m, t in zip(trl_mask, trl_ids) if tok.decode([t]).strip()] == \
        [m for m, t in zip(plain.assistant_mask, plain.input_ids) if tok.decode([t]).strip()]


def test_qwen3_with_think_as_added_tokens():
    """Real Qwen3 has <think>/</think> as added (non-special) tokens: the mask and the end-of-turn
    search treat them as reply text."""
    tok = with_template(gguf_tokenizer("qwen2"), trl_template("qwen3"))
    tok.add_tokens(["<think>", "</think>"])
    think, close = tok.convert_tokens_to_ids(["<think>", "</think>"])
    messages = [USER1, _assistant("<think>\nFrance's capital city.\n</think>\n\nParis."),
                USER2, _assistant("<think>Italy: Rome.</think>Rome.")]
    ex = mask_assistant_tokens(tok, messages)
    assert ex.input_ids == template_ids(tok, messages)[0]
    first, last = ex.turns
    assert think not in ex.input_ids[first.token_start:first.token_end]
    trained = ex.input_ids[last.token_start:last.token_end]
    assert trained[0] == think and close in trained and trained[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_inside_a_reply_keeps_a_prefix_or_untrains_it():
    tok = tokenizer_for("llama3_1")
    messages = [USER1, _assistant("Paris."), USER2, _assistant("Rome has been the capital of Italy since 1871.")]
    full = mask_assistant_tokens(tok, messages)
    second = full.turns[1]
    cut = second.token_start + 3  # inside the second reply
    kept = mask_assistant_tokens(tok, messages, max_length=cut)
    assert kept.truncated and kept.input_ids == full.input_ids[:cut]
    assert kept.assistant_mask == full.assistant_mask[:cut]
    kept_text = tok.decode(kept.input_ids[second.token_start:cut])
    assert kept_text and messages[3]["content"].startswith(kept_text)
    dropped = mask_assistant_tokens(tok, messages, max_length=cut, keep_truncated_reply=False)
    assert dropped.assistant_mask[second.token_start:] == [0, 0, 0]
    assert dropped.assistant_mask[:second.token_start] == full.assistant_mask[:second.token_start]
    # Cut before the first reply: nothing trained; masked_rows drops the row and counts it.
    early = mask_assistant_tokens(tok, messages, max_length=full.turns[0].token_start)
    assert early.trained_tokens == 0
    rows = masked_rows(tok, [messages, messages], max_length=full.turns[0].token_start)
    assert rows.rows == [] and rows.dropped_no_trained_token == 2
    rows = masked_rows(tok, [messages], max_length=None)
    assert rows.rows == [{"input_ids": full.input_ids, "assistant_masks": full.assistant_mask}]


def test_options_end_of_turn_and_roles():
    tok = tokenizer_for("qwen2_5")
    messages = [SYSTEM, USER1, _assistant("Paris.")]
    no_eot = mask_assistant_tokens(tok, messages, train_end_of_turn=False)
    assert tok.decode([t for t, m in zip(no_eot.input_ids, no_eot.assistant_mask) if m]) == "Paris."
    assert no_eot.turns[0].end_of_turn_id is None
    both = mask_assistant_tokens(tok, messages, train_roles=("user", "assistant"))
    assert [t.role for t in both.turns] == ["user", "assistant"]
    assert tok.decode([t for t, m in zip(both.input_ids, both.assistant_mask) if m]) == \
        f"{USER1['content']}<|im_end|>Paris.<|im_end|>"
    assert labels_from_mask(input_ids=[5, 6, 7], assistant_mask=[0, 1, 1]) == [-100, 6, 7]


BAD_TEMPLATES = {
    # The same text whatever the assistant says.
    "ignores replies": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}",
                        r"does not render this turn's content as given"),
    # Turns closed by plain text, not by one special token.
    "text end of turn": ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}",
                         r"not with a single end-of-turn token"),
    # Rewrites the reply: the decoded tokens are not the reply.
    "rewrites replies": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                         "{% endfor %}", r"decode to 'PARIS\.', not to the reply 'Paris\.'"),
    # Writes the reply twice: which copy is the turn is ambiguous.
    "duplicates replies": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                           "{{ messages[-1]['content'] }}", r"appears 2 times"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEMPLATES))
def test_bad_templates_raise_config_error_naming_the_row(case):
    template, message = BAD_TEMPLATES[case]
    tok = with_template(tokenizer_for("qwen2_5"), template)
    with pytest.raises(ConfigError, match=r"^sft\.jsonl row 7: .*" + message):
        mask_assistant_tokens(tok, [USER1, _assistant("Paris.")], where="sft.jsonl row 7")


def test_text_end_of_turn_is_fine_when_not_trained():
    tok = with_template(tokenizer_for("qwen2_5"), BAD_TEMPLATES["text end of turn"][0])
    ex = mask_assistant_tokens(tok, [USER1, _assistant("Paris.")], train_end_of_turn=False)
    # BPE merges the reply's "." with the template's "\n\n": that token is the reply's to write.
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.assistant_mask) if m]) == "Paris.\n\n"


@pytest.mark.parametrize("messages,match", [
    ([USER1], r"has no assistant turn with text"),
    ([USER1, _assistant("   ")], r"has no assistant turn with text"),
    ([], r"is not a non-empty list"),
    ([USER1, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}], r"non-text content"),
])
def test_bad_conversations_raise_config_error(messages, match):
    tok = tokenizer_for("qwen2_5")
    with pytest.raises(ConfigError, match=r"^a\.jsonl row 2: .*" + match):
        mask_assistant_tokens(tok, messages, where="a.jsonl row 2")


def test_check_template_masks_names_the_failing_row():
    tok = tokenizer_for("qwen2_5")
    good = [USER1, _assistant("Paris.")]
    stats = check_template_masks(tok, [good, good], where="data.sft_files", max_length=64)
    assert stats["rows"] == 2 and stats["encoder"] == "chat_template" and stats["trained_tokens"] > 0
    with pytest.raises(ConfigError, match=r"^data\.sft_files \(b\.jsonl\) row 1: .*no assistant turn"):
        check_template_masks(tok, [good, [USER1]], where="data.sft_files",
                             row_names=["data.sft_files (b.jsonl) row 0", "data.sft_files (b.jsonl) row 1"])
    with pytest.raises(ConfigError, match="none of the 1 sampled rows has a trained token within the first 3 tokens"):
        check_template_masks(tok, [good], where="data.sft_files", max_length=3)


def test_generation_marker_template_matches_transformers_mask(tmp_path):
    """A template with {% generation %} markers (as the demo's) goes through the same path and
    agrees with transformers' own marker-based mask."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["Paris is the capital of France. Rome is the capital of Italy."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens=specials[4:])
    tok.chat_template = (
        "{{- bos_token }}{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- '<|system|>' + message['content'] }}"
        "{%- elif message['role'] == 'user' %}{{- '<|user|>' + message['content'] }}"
        "{%- else %}{{- '<|assistant|>' }}{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}")
    for _, messages in conversations(system=True) + conversations(system=False):
        ex = mask_assistant_tokens(tok, messages)
        ids, marker_mask = template_ids(tok, messages, return_assistant_tokens_mask=True)
        assert ex.input_ids == ids and ex.assistant_mask == marker_mask


# ---------------------------------------------------------------------------------------------
# Mistral v3 through mistral-common
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral_tok(tmp_path_factory):
    return mistral_v3_tokenizer(tmp_path_factory.mktemp("mistral-v3"))


def test_mistral_v3_ids_equal_mistral_common_and_keep_the_system_prompt(mistral_tok):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mistral = mistral_common_tokenizer_for(mistral_tok)
    assert mistral is not None and type(mistral.instruct_tokenizer).__name__ == "InstructTokenizerV3"
    import mistral_common
    from pathlib import Path

    reference = MistralTokenizer.from_file(
        str(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"),
        mode=ValidationMode.finetuning)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    eos = mistral_tok.eos_token_id
    for name, messages in conversations(system=True) + conversations(system=False):
        ex = mask_assistant_tokens(mistral_tok, messages, where=name)
        expected = reference.encode_chat_completion(
            ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])).tokens
        assert ex.encoder == "mistral_common" and ex.input_ids == list(expected), name
        text = mistral_tok.decode(ex.input_ids)
        if messages[0]["role"] == "system":
            assert SYSTEM["content"] in text  # the Hub v0.3 template drops it here; mistral-common keeps it
        for turn in ex.turns:
            assert ex.input_ids[turn.token_end - 1] == eos
            reply = mistral_tok.decode(ex.input_ids[turn.token_start:turn.token_end - 1])
            assert reply.strip() == messages[turn.message_index]["content"].strip()
        assert sum(ex.assistant_mask) == sum(t.token_end - t.token_start for t in ex.turns)
        assert_turns_are_replies(mistral_tok, messages, ex, "</s>")


def test_mistral_v1_tokenizer_with_inst_template_goes_through_mistral_common(tmp_path):
    """Mistral-7B-v0.1's vocabulary (mistral-common's tokenizer.model.v1; no [INST] token) is found
    by its pieces once its template names [INST]; ids are mistral-common's V1 encoding."""
    mistral_common = pytest.importorskip("mistral_common")
    pytest.importorskip("sentencepiece")
    import shutil
    from pathlib import Path

    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(src, tmp_path / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    mistral = mistral_common_tokenizer_for(tok)
    assert mistral is not None and type(mistral.instruct_tokenizer).__name__ == "InstructTokenizerV1"
    messages = [USER1, _assistant("Paris."), USER2, _assistant("Rome.")]
    ex = mask_assistant_tokens(tok, messages)
    expected = mistral.encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content=USER1["content"]), AssistantMessage(content="Paris."),
        UserMessage(content=USER2["content"]), AssistantMessage(content="Rome.")])).tokens
    assert ex.encoder == "mistral_common" and ex.input_ids == list(expected)
    assert_turns_are_replies(tok, messages, ex, "</s>")


def test_mistral_detection_is_by_vocabulary_not_template(mistral_tok):
    # Llama 2's SentencePiece vocabulary with an [INST] template is not Mistral's: template path.
    llama2 = gguf_tokenizer("llama_spm")
    llama2.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                            "[/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert mistral_common_tokenizer_for(llama2) is None
    ex = mask_assistant_tokens(llama2, [USER1, _assistant("Paris.")])
    assert ex.encoder == "chat_template"
    assert llama2.decode([t for t, m in zip(ex.input_ids, ex.assistant_mask) if m]) == "Paris.</s>"
    with pytest.raises(ConfigError, match="only assistant turns"):
        mask_assistant_tokens(mistral_tok, [USER1, _assistant("Paris.")], train_roles=("user", "assistant"))


# ---------------------------------------------------------------------------------------------
# TRL trains exactly the mask
# ---------------------------------------------------------------------------------------------

def _tiny_model(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=256))


def _sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=3, learning_rate=1e-3,
                  bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  activation_checkpointing=False, max_length=256, shuffle_dataset=False, dataset_num_proc=None,
                  seed=0)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def test_sft_trainer_trains_exactly_the_mask(tmp_path):
    """Pre-tokenized input_ids + assistant_masks, assistant_only_loss=False: TRL 1.16 builds labels
    from assistant_masks during dataset preparation; the collated labels of a real training step
    are our mask (-100 elsewhere and on padding), and the loss is the mean over those tokens."""
    import datasets
    import torch
    from trl import SFTTrainer

    tok = tokenizer_for("qwen2_5")
    convs = [[SYSTEM, USER1, _assistant("Paris.")],
             [USER1, _assistant(" Paris."), USER2, _assistant("\nRome, since 1871.")],
             [USER2, _assistant("Rome.")]]
    built = masked_rows(tok, convs, max_length=256)
    model = _tiny_model(len(tok))
    trainer = SFTTrainer(model=model, args=_sft_args(tmp_path, assistant_only_loss=False),
                         train_dataset=datasets.Dataset.from_list(built.rows), processing_class=tok)
    seen = []
    collate = trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        seen.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return batch

    trainer.data_collator = recording
    losses = []

    original_compute_loss = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        out = original_compute_loss(model, inputs, *args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = compute_loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(seen) == 1
    batch = seen[0]
    width = batch["input_ids"].shape[1]
    # The sampler shuffles: find each row of the batch by its ids.
    collated = {tuple(batch["input_ids"][r][batch["attention_mask"][r] == 1].tolist()): batch["labels"][r].tolist()
                for r in range(batch["input_ids"].shape[0])}
    assert len(collated) == len(built.rows)
    for example in built.rows:
        n = len(example["input_ids"])
        expected = labels_from_mask(input_ids=example["input_ids"], assistant_mask=example["assistant_masks"])
        assert collated[tuple(example["input_ids"])] == expected + [-100] * (width - n)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The step's loss is the mean NLL over exactly the masked tokens (shifted by one).
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    model_before = _tiny_model(len(tok))
    model_before.load_state_dict(before)
    with torch.no_grad():
        logits = model_before(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100)
    assert losses and abs(losses[0] - float(nll)) < 1e-5


def test_sft_trainer_refuses_assistant_only_loss_on_pretokenized_rows(tmp_path):
    """TRL 1.16 applies assistant_masks whatever assistant_only_loss says; with it True, a
    pre-tokenized dataset is refused as not conversational: the sft stage sets it False."""
    import datasets
    from trl import SFTTrainer

    tok = tokenizer_for("qwen2_5")
    built = masked_rows(tok, [[USER1, _assistant("Paris.")]], max_length=64)
    with pytest.raises(ValueError, match="not conversational"):
        SFTTrainer(model=_tiny_model(len(tok)), args=_sft_args(tmp_path, assistant_only_loss=True),
                   train_dataset=datasets.Dataset.from_list(built.rows), processing_class=tok)


def test_cli_checks_a_file_and_names_the_bad_row(tmp_path, capsys):
    from pipeline.data.chat_masking import main

    tok = tokenizer_for("qwen2_5")
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps({"messages": m}) for _, m in conversations(system=True)) + "\n")
    assert main([str(tok_dir), str(good), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert '"trained_text": "Paris.<|im_end|>"' in out and '"rows": 6' in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [USER1, _assistant("Paris.")]}) + "\n"
                   + json.dumps({"messages": [USER1, USER2]}) + "\n")
    assert main([str(tok_dir), str(bad)]) == 2
    assert f"{bad} row 1: has no assistant message" in capsys.readouterr().out

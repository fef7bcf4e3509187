"""Mistral token ids come from mistral-common everywhere (issue 18 items 1 and 6), on the real
tokenizers mistral-common ships (v3 and v7 SentencePiece, tekken), built offline.

- dpo pairs: split by sft's encoder; the trained reply ids are exactly the reply's SentencePiece ids
  + ``</s>``, the prompt holds the system text (the Hub v0.3 template drops it); a pair whose prompt
  ids are not a prefix of prompt + reply is refused for any tokenizer, naming the file and row.
- plain text: double spaces tokenize to SentencePiece's ids in cpt blocks and held-out perplexity;
  the cpt cache key names the encoder.
- tekken and v7 tokenizers are recognised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chat_tokenizers import mistral_v3_tokenizer
from test_mistral_standin import MISTRAL_7B_INSTRUCT_V03_CHAT_TEMPLATE

from pipeline.config import CPTConfig, DataConfig, PathsConfig, PipelineConfig
from pipeline.data import tokenize_records
from pipeline.data.mistral import mistral_tokenizer_file, plain_text_encoder, text_token_ids
from pipeline.data.preference import load_preferences, tokenize_pair
from pipeline.errors import ConfigError

SYSTEM = "You answer in one word."
DOUBLE_SPACED = "Plain  text   with  double spaces.\n\n  Indented line."


def mistral_data(name: str) -> Path:
    mistral_common = pytest.importorskip("mistral_common")
    return Path(mistral_common.__file__).parent / "data" / name


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    tok = mistral_v3_tokenizer(tmp_path_factory.mktemp("v3"))
    tok.chat_template = MISTRAL_7B_INSTRUCT_V03_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def sentencepiece_v3():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(mistral_data("mistral_instruct_tokenizer_240323.model.v3"))).instruct_tokenizer.tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- item 1: dpo pairs -----------------------------------------------------------------------

def test_mistral_v3_pair_trains_the_reply_ids_and_keeps_the_system_prompt(v3, sentencepiece_v3, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "London,  perhaps."}]}])
    [pair] = load_preferences([str(f)])
    t = tokenize_pair(v3, pair)
    sp, eos = sentencepiece_v3, sentencepiece_v3.eos_id
    assert t.chosen_ids == sp.encode("Paris.", bos=False, eos=False) + [eos]
    assert t.rejected_ids == sp.encode("London,  perhaps.", bos=False, eos=False) + [eos]
    system_ids = sp.encode(SYSTEM, bos=False, eos=False)
    assert any(t.prompt_ids[k:k + len(system_ids)] == system_ids for k in range(len(t.prompt_ids)))
    assert t.prompt_ids[0] == sp.bos_id and t.prompt_ids[-1] == v3.convert_tokens_to_ids("[/INST]")
    assert "[INST]" not in v3.decode(t.chosen_ids)  # the reply holds no user turn


def test_dpo_trainer_trains_exactly_those_ids(v3, tmp_path):
    """The pairs reach TRL as those ids (TRL 1.16 would render them with the Hub template itself)."""
    from transformers import MistralConfig, MistralForCausalLM

    from pipeline.training.dpo import DPOSettings, build_dpo_trainer

    model_dir = tmp_path / "model"
    config = MistralConfig(vocab_size=len(v3), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=None,
                           bos_token_id=v3.bos_token_id, eos_token_id=v3.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(model_dir)
    v3.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"No  {i}."}]} for i in range(4)]
    pairs = load_preferences([str(write_jsonl(tmp_path / "p.jsonl", rows))])
    trainer, _, stats = build_dpo_trainer(
        model_dir=str(model_dir), tokenizer=v3, train_pairs=pairs, settings=DPOSettings(max_length=64),
        trainer_args=dict(output_dir=str(tmp_path / "ck"), use_cpu=True, max_steps=1, per_device_train_batch_size=2,
                          save_strategy="no", report_to=[]), bf16=False)
    assert stats["train_pairs"] == 4
    expected = [tokenize_pair(v3, p) for p in pairs]
    got = sorted((list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset)
    assert got == sorted((t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in expected)


def test_pair_whose_prompt_ids_are_not_a_prefix_is_refused_naming_file_and_row(tiny_tokenizer_dir, tmp_path):
    """Any tokenizer: a template that writes the system text only when a reply follows (as the Hub
    v0.3 template does) makes prompt and prompt + reply diverge: refused, not trained."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% if messages[-1].role == 'assistant' %}"
        "{{ m.content }}\n{% endif %}{% else %}<{{ m.role }}>\n{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    bad = {**good, "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}
    f = write_jsonl(tmp_path / "prefs.jsonl", [good, bad])
    ok, wrong = load_preferences([str(f)])
    assert tokenize_pair(tok, ok).chosen_ids  # a template that keeps the prompt is accepted
    with pytest.raises(ConfigError, match=r"prefs\.jsonl\) row 1.*not a prefix of prompt \+ chosen reply"):
        tokenize_pair(tok, wrong)


# --- item 6: plain text ----------------------------------------------------------------------

def test_plain_text_with_double_spaces_is_sentencepiece_ids_in_cpt(v3, sentencepiece_v3, tmp_path):
    sp = sentencepiece_v3
    expected = sp.encode(DOUBLE_SPACED, bos=False, eos=False)
    assert list(v3(DOUBLE_SPACED, add_special_tokens=False)["input_ids"]) != expected  # the fast tokenizer differs
    assert tokenize_records(v3, [DOUBLE_SPACED]) == [[sp.bos_id] + expected + [sp.eos_id]]

    from pipeline.data.cpt_cache import prepare_cpt_data

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"text": DOUBLE_SPACED}] * 40)
    cfg = PipelineConfig(data=DataConfig(cpt_files=[str(corpus)], heldout_fraction=0.0, tokenize_num_proc=1),
                         cpt=CPTConfig(seq_len=len(expected) + 2), paths=PathsConfig(cache_dir=str(tmp_path / "cache")))
    blocks = prepare_cpt_data(cfg, v3, log=lambda *a: None).train
    stream = [int(t) for row in blocks for t in row["input_ids"]]
    doc = [sp.bos_id] + expected + [sp.eos_id]
    assert stream[:len(doc)] == doc


def test_cpt_cache_key_names_the_encoder(v3, monkeypatch, tmp_path):
    import pipeline.data.cpt_cache as cpt_cache

    assert plain_text_encoder(v3) == "mistral_common:mistral_instruct_tokenizer_240323.model.v3"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    cfg = PipelineConfig(data=DataConfig(cpt_files=[str(corpus)]), paths=PathsConfig(cache_dir=str(tmp_path)))
    sources = cpt_cache.cpt_sources(cfg)
    key = cpt_cache.cache_key(cfg, v3, sources)
    monkeypatch.setattr(cpt_cache, "plain_text_encoder", lambda tokenizer: "hf_tokenizer")
    assert cpt_cache.cache_key(cfg, v3, sources) != key


def test_heldout_perplexity_scores_sentencepiece_ids(v3, sentencepiece_v3):
    from transformers import MistralConfig, MistralForCausalLM

    from pipeline.evaluation.metrics import heldout_perplexity

    config = MistralConfig(vocab_size=len(v3), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=None)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    sp = sentencepiece_v3
    result = heldout_perplexity(model, v3, [DOUBLE_SPACED], seq_len=256, batch_size=1)

    def loss_of(ids: list[int]) -> float:  # bos is context only, every other token predicted
        with torch.no_grad():
            return float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)

    sp_ids = [sp.bos_id] + sp.encode(DOUBLE_SPACED, bos=False, eos=False) + [sp.eos_id]
    fast_ids = [sp.bos_id] + list(v3(DOUBLE_SPACED, add_special_tokens=False)["input_ids"]) + [sp.eos_id]
    loss = result["loss"] if isinstance(result, dict) else result.loss
    assert loss == pytest.approx(loss_of(sp_ids), rel=1e-5)
    assert abs(loss_of(fast_ids) - loss_of(sp_ids)) > 1e-4  # the check could tell them apart


# --- tekken and v7 ---------------------------------------------------------------------------

def test_tekken_tokenizer_is_recognised_and_encoded_by_mistral_common():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from pipeline.data.chat_masking import mask_assistant_tokens

    path = mistral_data("tekken_240911.json")
    tok = convert_tekken_tokenizer(str(path))
    assert mistral_tokenizer_file(tok) == "tekken_240911.json"
    tekken = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    assert text_token_ids(tok, [DOUBLE_SPACED]) == [tekken.encode(DOUBLE_SPACED, bos=False, eos=False)]
    ex = mask_assistant_tokens(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"},
                                     {"role": "assistant", "content": "Hello."}])
    assert ex.encoder == "mistral_common"
    trained = [t for t, m in zip(ex.input_ids, ex.assistant_mask) if m]
    assert trained == tekken.encode("Hello.", bos=False, eos=True)


def test_v7_sentencepiece_tokenizer_is_recognised(tmp_path):
    import shutil

    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    shutil.copy(mistral_data("mistral_instruct_tokenizer_241114.model.v7"), tmp_path / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(tmp_path))
    assert mistral_tokenizer_file(tok) == "mistral_instruct_tokenizer_241114.model.v7"

"""The demo base model: tokenizer, chat template, pretraining data split, saved checkpoint, cache."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import threading
from pathlib import Path

import pytest

from pipeline.config import DemoModelConfig
from pipeline.fsutil import hash_path
from pipeline.models import demo
from pipeline.errors import ConfigError

ROUND_TRIP_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, trailing spaces  \n\n\ttabs\tand\r\nCRLF\n",
    "cancellation of the \u00bd\u00a2 decrease",
    "na\u00efve caf\u00e9, \u6771\u4eac, emoji \U0001F600 and a NUL-free mix of 'quotes' -- dashes...",
    "",
    "A" * 300,
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run as fast on one thread, and far faster when other processes share the cores."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_files_and_round_trip(tiny_tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_tokenizer_dir / name).is_file(), name
    tok = _tok(tiny_tokenizer_dir)
    assert tok.is_fast
    assert 300 < len(tok) <= 512
    for text in ROUND_TRIP_TEXTS:
        ids = _ids(tok, text)
        assert tok.decode(ids) == text
        assert demo.BOS not in tok.convert_ids_to_tokens(ids)
    # bos is added, eos is not (Mistral/Llama convention).
    ids = tok("hear me speak")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert ids[1:] == _ids(tok, "hear me speak")
    # the trained merges compress English text
    text = ROUND_TRIP_TEXTS[0]
    assert len(_ids(tok, text)) < len(text.encode()) / 1.5


def test_special_tokens(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    for i, t in enumerate(demo.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i
        assert _ids(tok, t) == [i]  # never split
        assert t in tok.all_special_tokens
        assert tok.decode(_ids(tok, f"x{t}y"), skip_special_tokens=True) == "xy"
    assert tok.padding_side == "right"


def test_chat_template_has_generation_markers(tiny_tokenizer_dir):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = _tok(tiny_tokenizer_dir)
    text = (tiny_tokenizer_dir / "chat_template.jinja").read_text()
    assert re.search(r"\{%-?\s*generation\s*-?%\}", text) and re.search(r"\{%-?\s*endgeneration\s*-?%\}", text)
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)  # TRL's own check: the eos is trained


CONVERSATIONS = [
    [{"role": "user", "content": "Why can camels survive for long without water?"},
     {"role": "assistant", "content": "Camels use the fat in their humps to keep them filled with energy."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Who was Caius Marcius?"},
     {"role": "assistant", "content": " A Roman general,\nchief enemy to the people.\n"},
     {"role": "user", "content": "\nAnd then?  "},
     {"role": "assistant", "content": "\n\nHe was banished.  "}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_assistant_mask_covers_exactly_the_replies(tiny_tokenizer_dir, conv):
    tok = _tok(tiny_tokenizer_dir)
    out = tok.apply_chat_template(conv, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)

    role_id = {r: tok.convert_tokens_to_ids(t) for r, t in
               (("system", demo.SYSTEM), ("user", demo.USER), ("assistant", demo.ASSISTANT))}
    expected_ids, expected_mask = [tok.bos_token_id], [0]
    for m in conv:
        expected_ids.append(role_id[m["role"]])
        expected_mask.append(0)
        content = _ids(tok, m["content"])
        if m["role"] == "assistant":
            expected_ids += content + [tok.eos_token_id]
            expected_mask += [1] * (len(content) + 1)
        else:
            expected_ids += content
            expected_mask += [0] * len(content)
    assert ids == expected_ids  # one bos, turns delimited by special tokens only
    assert mask == expected_mask
    replies = [t for m in conv if m["role"] == "assistant" for t in _ids(tok, m["content"]) + [tok.eos_token_id]]
    assert [t for t, k in zip(ids, mask) if k] == replies


def test_generation_prompt_is_a_prefix(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    conv = CONVERSATIONS[1]
    prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    full = tok.apply_chat_template(conv)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert prompt[-1] == tok.convert_tokens_to_ids(demo.ASSISTANT)
    assert full[: len(prompt)] == prompt
    rendered = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|system|>Answer briefly.<|user|>Who was Caius Marcius?<|assistant|>"
    with pytest.raises(Exception, match="Unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------------------ data split


def test_heldout_records_never_reach_training(tiny_demo_config, tiny_tokenizer_dir, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_demo_config, train_steps=2)
    fraction = 0.2  # enough held-out records in the tiny corpus to make the check meaningful
    split = demo.load_demo_corpus(cfg, fraction)
    assert split.train and len(split.heldout) >= 3
    assert not set(split.heldout) & set(split.train)

    # The tokenizer's training text holds no held-out record.
    texts = set(demo.tokenizer_training_texts(cfg, fraction))
    assert not set(split.heldout) & texts

    packed = []
    real_pack = demo.pack_records

    def spy(tokenizer, records):
        packed.append(list(records))
        return real_pack(tokenizer, records)

    monkeypatch.setattr(demo, "pack_records", spy)
    metrics = demo.build_demo_base(cfg, tmp_path / "m", heldout_fraction=fraction, progress=False,
                                   tokenizer_dir=tiny_tokenizer_dir)
    train_records, heldout_records = packed
    assert train_records == split.train
    assert heldout_records == split.heldout
    assert metrics["train_records"] == len(split.train) and metrics["heldout_records"] == len(split.heldout)

    # The packed token stream decodes to the train records, each between <s> and </s>, and contains
    # none of the held-out text.
    tok = _tok(tiny_tokenizer_dir)
    stream = real_pack(tok, split.train)
    decoded = tok.decode(stream.tolist())
    assert decoded == "".join(f"<s>{r}</s>" for r in split.train)
    for r in split.heldout:
        assert r not in decoded


# ------------------------------------------------------------------------------ model


def test_base_model_loads_with_auto_classes(tiny_base_model_dir, tiny_demo_config):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    d = tiny_base_model_dir
    assert (d / "model.safetensors").is_file()
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
    assert not list(d.parent.glob(".*partial"))
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = _tok(d)
    c = model.config
    assert c.model_type == "mistral"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        64, 4, 4, 2, 128)
    assert c.vocab_size == len(tok)
    assert c.sliding_window is None and c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.dtype == torch.float32
    gen = GenerationConfig.from_pretrained(str(d))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 3)

    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_short_pretraining_lowers_the_loss(tiny_base_model_build, tiny_demo_config, tiny_heldout_fraction):
    d, metrics = tiny_base_model_build
    rows = json.loads((d / demo.TRAIN_LOG_FILE).read_text())
    assert [r["step"] for r in rows] == list(range(1, tiny_demo_config.train_steps + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first == pytest.approx(math.log(metrics["vocab_size"]), abs=0.5)  # random init ~ uniform
    assert last < first - 0.75
    assert metrics["heldout_loss"] < first - 0.75
    assert metrics["heldout_ppl"] == pytest.approx(math.exp(metrics["heldout_loss"]))
    assert metrics["heldout_ppl"] < 0.9 * metrics["unigram_heldout_ppl"]  # learned more than token frequencies
    assert metrics["heldout_tokens"] > 0
    assert metrics["tokens_seen"] == tiny_demo_config.train_steps * tiny_demo_config.batch_size * tiny_demo_config.seq_len
    assert metrics["num_params"] > 0 and metrics["wall_time_s"] > 0
    assert json.loads((d / demo.BUILD_METRICS_FILE).read_text()) == pytest.approx(metrics)
    info = json.loads((d / demo.DEMO_BUILD_FILE).read_text())
    assert info["heldout_fraction"] == tiny_heldout_fraction
    assert info["config"] == dataclasses.asdict(tiny_demo_config)


def test_build_is_deterministic(tiny_demo_config, tiny_tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(tiny_demo_config, train_steps=3)
    for name in ("a", "b"):
        demo.build_demo_base(cfg, tmp_path / name, heldout_fraction=0.05, progress=False,
                             tokenizer_dir=tiny_tokenizer_dir)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_build_without_heldout_records(tiny_demo_config, tiny_tokenizer_dir, tmp_path):
    cfg = dataclasses.replace(tiny_demo_config, train_steps=1)
    metrics = demo.build_demo_base(cfg, tmp_path / "m", heldout_fraction=0.0, progress=False,
                                   tokenizer_dir=tiny_tokenizer_dir)
    assert metrics["heldout_records"] == 0 and metrics["heldout_tokens"] == 0
    assert metrics["heldout_loss"] is None and metrics["heldout_ppl"] is None
    json.loads((tmp_path / "m" / demo.BUILD_METRICS_FILE).read_text(), parse_constant=pytest.fail)  # strict JSON
    with pytest.raises(FileExistsError):  # never silently replaces a directory
        demo.build_demo_base(cfg, tmp_path / "m", heldout_fraction=0.0, progress=False,
                             tokenizer_dir=tiny_tokenizer_dir)


# ------------------------------------------------------------------------------ cache


def test_ensure_demo_base_builds_once(tiny_demo_config, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_demo_config, train_steps=2)
    path = demo.ensure_demo_base(cfg, tmp_path, heldout_fraction=0.05, progress=False)
    assert path.parent == tmp_path / "demo_base" and re.fullmatch(r"[0-9a-f]{16}", path.name)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached demo base")

    monkeypatch.setattr(demo, "build_demo_base", no_build)
    assert demo.ensure_demo_base(cfg, tmp_path, heldout_fraction=0.05, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    # The key follows content, not paths: the same corpus elsewhere hits the same entry ...
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(cfg.corpus, moved / "corpus.txt")
    same = dataclasses.replace(cfg, corpus=str(moved / "corpus.txt"))
    assert demo.ensure_demo_base(same, tmp_path, heldout_fraction=0.05, progress=False) == path
    # ... and any change of config, data or split gives another key.
    key = demo.demo_base_key(cfg, heldout_fraction=0.05)
    assert demo.demo_base_key(dataclasses.replace(cfg, seed=1), heldout_fraction=0.05) != key
    assert demo.demo_base_key(cfg, heldout_fraction=0.1) != key
    assert demo.demo_base_key(cfg, heldout_fraction=0.05, records=demo.RecordOptions(max_record_chars=2000)) != key
    (moved / "corpus.txt").write_text(Path(cfg.corpus).read_text() + "\n\n\nOne more document.\n")
    assert demo.demo_base_key(same, heldout_fraction=0.05) != key


def test_concurrent_ensure_builds_once(tiny_demo_config, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_demo_config, train_steps=1, seed=7)
    calls = []
    real_build = demo.build_demo_base

    def counting_build(*a, **k):
        calls.append(1)
        return real_build(*a, **k)

    monkeypatch.setattr(demo, "build_demo_base", counting_build)
    results, errors = [], []

    def job():
        try:
            results.append(demo.ensure_demo_base(cfg, tmp_path, heldout_fraction=0.05, progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1 and len(set(results)) == 1


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("change, where", [
    ({"hidden_size": 66}, "model.demo.hidden_size"),
    ({"num_key_value_heads": 3}, "model.demo.num_key_value_heads"),
    ({"seq_len": 512}, "model.demo.seq_len"),
    ({"train_steps": 0}, "model.demo.train_steps"),
    ({"corpus": "/nonexistent/corpus.txt"}, "model.demo.corpus"),
    ({"tokenizer_files": ["/nonexistent/x.jsonl"]}, "model.demo.tokenizer_files"),
])
def test_config_errors(tiny_demo_config, tmp_path, change, where):
    cfg = dataclasses.replace(tiny_demo_config, **change)
    with pytest.raises(ConfigError) as e:
        demo.ensure_demo_base(cfg, tmp_path, heldout_fraction=0.05)
    assert e.value.where == where
    assert not (tmp_path / "demo_base").exists() or not any((tmp_path / "demo_base").iterdir())


def test_bad_heldout_fraction_and_vocab(tiny_demo_config, tmp_path):
    with pytest.raises(ConfigError, match="heldout_fraction"):
        demo.ensure_demo_base(tiny_demo_config, tmp_path, heldout_fraction=1.0)
    with pytest.raises(ConfigError, match="vocab_size"):
        demo.train_demo_tokenizer(["some text"], 100, tmp_path / "tok")


# ------------------------------------------------------------------------------ machine cache, shipped base


def test_second_checkout_reuses_the_machine_cache(tiny_demo_config, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_demo_config, train_steps=2, seed=3)
    first = demo.ensure_demo_base(cfg, tmp_path / "clone1" / ".cache", heldout_fraction=0.05, progress=False)
    shared = demo.machine_cache_dir() / "demo_base" / first.name
    assert (shared / "model.safetensors").is_file()

    def no_build(*a, **k):
        raise AssertionError("rebuilt a demo base the machine cache holds")

    monkeypatch.setattr(demo, "build_demo_base", no_build)
    second = demo.ensure_demo_base(cfg, tmp_path / "clone2" / ".cache", heldout_fraction=0.05, progress=False)
    assert second == tmp_path / "clone2" / ".cache" / "demo_base" / first.name
    assert hash_path(second) == hash_path(first)  # same content, so the same stage keys downstream


def _default_demo_config() -> DemoModelConfig:
    """conf/model/demo.yaml's demo section (paths resolved as Hydra does) and the demo's heldout_fraction."""
    import yaml

    repo = Path(demo.__file__).resolve().parents[2]
    fields = yaml.safe_load((repo / "conf" / "model" / "demo.yaml").read_text())["demo"]
    data_dir = str(repo / "data" / "demo")
    fields["corpus"] = fields["corpus"].replace("${paths.data_dir}", data_dir)
    fields["tokenizer_files"] = [f.replace("${paths.data_dir}", data_dir) for f in fields["tokenizer_files"]]
    heldout = yaml.safe_load((repo / "conf" / "data" / "demo.yaml").read_text())["heldout_fraction"]
    return DemoModelConfig(**fields), heldout


def test_shipped_demo_base_is_what_the_recipe_builds(tmp_path):
    """The shipped build (assets/demo_base/<key>/) has the key of today's recipe and data, the
    tokenizer the recipe trains, the recipe's first 20 training steps (losses within 2e-3; the
    full 1,000 steps take 9-22 min: see demo.SHIPPED_DIR for the rebuild), and its recorded
    held-out perplexity is the shipped model's."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, heldout = _default_demo_config()
    key = demo.demo_base_key(cfg, heldout_fraction=heldout)[:16]
    shipped = demo.SHIPPED_DIR / key
    assert (shipped / "model.safetensors").is_file(), (
        f"no shipped demo base for key {key}: the recipe or its data changed; rebuild it "
        "(see pipeline.models.demo.SHIPPED_DIR) and commit assets/demo_base/<new key>/")
    metrics = json.loads((shipped / demo.BUILD_METRICS_FILE).read_text())
    log_rows = json.loads((shipped / demo.TRAIN_LOG_FILE).read_text())
    assert metrics["train_steps"] == cfg.train_steps == len(log_rows)

    tok = demo.train_demo_tokenizer(demo.tokenizer_training_texts(cfg, heldout), cfg.vocab_size, tmp_path / "tok",
                                    model_max_length=cfg.max_position_embeddings)
    assert tok.get_vocab() == demo.load_demo_tokenizer(shipped).get_vocab()

    split = demo.load_demo_corpus(cfg, heldout)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    _, rows, _ = demo.pretrain(cfg, tok, demo.pack_records(tok, split.train), progress=False, stop_after=20)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for mine, theirs in zip(rows, log_rows[:20]):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=2e-3), (mine, theirs)
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-6)

    model = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32)
    ppl = demo.heldout_perplexity(model, tok, split.heldout, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    assert ppl["perplexity"] == pytest.approx(metrics["heldout_ppl"], rel=1e-4)


def test_shipped_base_is_used_without_building(tmp_path, monkeypatch):
    cfg, heldout = _default_demo_config()

    def no_build(*a, **k):
        raise AssertionError("built the demo base although it is shipped")

    monkeypatch.setattr(demo, "build_demo_base", no_build)
    path = demo.ensure_demo_base(cfg, tmp_path, heldout_fraction=heldout, progress=False)
    key = path.name
    assert hash_path(path) == hash_path(demo.SHIPPED_DIR / key)
    assert (demo.machine_cache_dir() / "demo_base" / key / "model.safetensors").is_file()

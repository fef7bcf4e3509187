"""cpt data at scale: tokenized once into an on-disk cache keyed by the data and the tokenizer,
mixtures with token weights, and streaming - all giving the blocks the in-memory reference
(``tokenize_records`` + ``pack_documents``) gives."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from pipeline.config import CPTConfig, DataConfig, PathsConfig, PipelineConfig
from pipeline.data.cpt_cache import StreamingBlocks, prepare_cpt_data, prepare_streaming_cpt_data
from pipeline.data import load_text_records, pack_documents, split_records, tokenize_records
from pipeline.errors import ConfigError

SEQ = 64


def make_cfg(tmp_path, files, **data):
    return PipelineConfig(data=DataConfig(cpt_files=[str(f) for f in files], **data),
                          cpt=CPTConfig(seq_len=SEQ, max_steps=5),
                          paths=PathsConfig(cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run")))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tiny_data_dir):
    """The tiny corpus cut into a big source (3/4 of the text) and a small one (1/4)."""
    d = tmp_path_factory.mktemp("sources")
    records = load_text_records([str(tiny_data_dir / "corpus.txt")])
    total, cut = sum(len(r) for r in records), 0
    while sum(len(r) for r in records[:cut]) < 0.75 * total:
        cut += 1
    (d / "big.txt").write_text("\n\n\n".join(records[:cut]))
    (d / "small.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records[cut:]))
    return d / "big.txt", d / "small.jsonl"


def ids_text(docs) -> str:
    """Token ids as ",1,2,3," text, so a run of ids can be looked up with ``in``."""
    return "," + ",".join(",".join(map(str, d)) for d in docs) + ","


def rows(ds, n=None):
    plain = ds.with_format(None)
    return plain[: len(plain) if n is None else n]


def test_cached_blocks_equal_the_in_memory_reference_and_a_rerun_hits_the_cache(tmp_path, tiny_data_dir, tok):
    corpus = tiny_data_dir / "corpus.txt"
    cfg = make_cfg(tmp_path, [corpus], tokenize_num_proc=2)
    first = prepare_cpt_data(cfg, tok, log=lambda *a: None)
    assert first.stats["cache_hit"] is False

    split = split_records(load_text_records([str(corpus)]), cfg.data.heldout_fraction)
    ref = pack_documents(tokenize_records(tok, split.train), SEQ)
    got = rows(first.train)
    assert got["input_ids"] == ref.input_ids
    assert got["position_ids"] == ref.position_ids and got["labels"] == ref.labels
    assert rows(first.heldout)["input_ids"] == pack_documents(tokenize_records(tok, split.heldout), SEQ).input_ids
    assert first.stats["tokens_used_fraction"] > 0.99 and first.stats["packing_efficiency"] == 1.0

    stamp = (first.cache_dir / "stats.json").stat().st_mtime_ns
    for announce in (True, False):  # rank 0 announces the hit, the other ranks load quietly
        logged = []
        again = prepare_cpt_data(cfg, tok, log=logged.append, announce_hit=announce)
        assert again.stats["cache_hit"] is True and again.cache_dir == first.cache_dir
        assert (first.cache_dir / "stats.json").stat().st_mtime_ns == stamp
        assert not any("tokenizing" in m for m in logged) and any("cache hit" in m for m in logged) == announce
    assert len(list((tmp_path / "cache" / "tokenized").glob("cpt-*[!k]"))) == 1


def test_one_process_and_two_tokenize_alike(tmp_path, tiny_data_dir, tok):
    one = prepare_cpt_data(make_cfg(tmp_path / "a", [tiny_data_dir / "corpus.txt"], tokenize_num_proc=1), tok)
    two = prepare_cpt_data(make_cfg(tmp_path / "b", [tiny_data_dir / "corpus.txt"], tokenize_num_proc=2), tok)
    assert rows(one.train) == rows(two.train)


def test_changed_data_or_tokenizer_or_seq_len_is_a_new_cache_entry(tmp_path, tiny_data_dir, tiny_tokenizer_dir, tok):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(tiny_data_dir / "corpus.txt", corpus)
    base = prepare_cpt_data(make_cfg(tmp_path, [corpus]), tok).cache_dir

    cfg = make_cfg(tmp_path, [corpus])
    cfg.cpt.seq_len = 32
    assert prepare_cpt_data(cfg, tok).cache_dir != base

    tok2_dir = tmp_path / "tok2"
    shutil.copytree(tiny_tokenizer_dir, tok2_dir)
    tok2 = AutoTokenizer.from_pretrained(tok2_dir)
    assert prepare_cpt_data(make_cfg(tmp_path, [corpus]), tok2).cache_dir == base  # same tokenizer, other path
    tok2.add_tokens(["<new-token>"])
    assert prepare_cpt_data(make_cfg(tmp_path, [corpus]), tok2).cache_dir != base

    with open(corpus, "a") as f:
        f.write("\n\n\nOne more document at the end.")
    changed = prepare_cpt_data(make_cfg(tmp_path, [corpus]), tok)
    assert changed.cache_dir != base and changed.stats["cache_hit"] is False


@pytest.mark.parametrize("strategy", ["undersample", "oversample"])
def test_mixture_weights_are_shares_of_tokens(tmp_path, two_sources, tok, strategy):
    big, small = two_sources
    plain = prepare_cpt_data(make_cfg(tmp_path / "plain", [big, small]), tok).stats["sources"]
    cfg = make_cfg(tmp_path, [big, small], cpt_weights=[1.0, 1.0], cpt_mixture_strategy=strategy)
    data = prepare_cpt_data(cfg, tok)
    mixed = data.stats["sources"]
    for s in mixed:  # whole documents are taken: within one document of the budget
        assert s["share_of_tokens"] == pytest.approx(0.5, abs=0.02)
    big_tokens, small_tokens = plain[0]["train_tokens"], plain[1]["train_tokens"]
    assert big_tokens > 2 * small_tokens
    if strategy == "undersample":  # the small source is used once, the big one cut to match
        assert mixed[1]["selected_tokens"] == pytest.approx(small_tokens, rel=0.02)
        assert mixed[0]["selected_tokens"] < big_tokens
    else:  # the big source once, the small one repeated up to it
        assert mixed[0]["selected_tokens"] == pytest.approx(big_tokens, rel=0.02)
        assert mixed[1]["selected_tokens"] > 2 * small_tokens
    # Blocks from the small source (those starting inside one of its documents), spread through the set.
    small_ids = ids_text(tokenize_records(tok, load_text_records([str(small)])))
    from_small = [ids_text([ids[:8]]) in small_ids for ids in rows(data.train)["input_ids"]]
    half = len(from_small) // 2
    assert 0.35 < sum(from_small) / len(from_small) < 0.65
    assert 0.2 < sum(from_small[:half]) / half < 0.8  # not one source after the other


def test_streaming_gives_the_cached_blocks_without_materialising(tmp_path, tiny_data_dir, tok):
    cfg = make_cfg(tmp_path, [tiny_data_dir / "corpus.txt"], streaming=True)
    streamed = prepare_streaming_cpt_data(cfg, tok)
    assert isinstance(streamed.train, StreamingBlocks) and streamed.cache_dir is None
    assert not (tmp_path / "cache").exists()
    cfg.data.streaming = False
    cached = rows(prepare_cpt_data(cfg, tok).train)
    it = iter(streamed.train)
    for i in range(30):
        block = next(it)
        assert block["input_ids"].tolist() == cached["input_ids"][i]
        assert block["position_ids"].tolist() == cached["position_ids"][i]
    assert rows(streamed.heldout)["input_ids"] == rows(prepare_cpt_data(cfg, tok).heldout)["input_ids"]


def test_streamed_mixture_follows_the_weights(tmp_path, two_sources, tok):
    big, small = two_sources
    cfg = make_cfg(tmp_path, [big, small], streaming=True, cpt_weights=[0.8, 0.2])
    stream = StreamingBlocks(cfg, tok)
    small_ids = ids_text(tokenize_records(tok, load_text_records([str(small)])))
    counts = {"big": 0, "small": 0}
    for doc in stream._documents():
        counts["small" if ids_text([doc]) in small_ids else "big"] += len(doc)
    share = counts["small"] / sum(counts.values())
    assert share == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("data, message", [
    ({"cpt_weights": [1.0]}, "data.cpt_weights: has 1 weights for 2 files"),
    ({"cpt_weights": [1.0, 0.0]}, "data.cpt_weights: .* every weight must be a positive number"),
    ({"cpt_weights": [1.0, 1.0], "cpt_mixture_strategy": "roundrobin"}, "data.cpt_mixture_strategy: unknown strategy"),
])
def test_bad_mixtures_are_refused(tmp_path, two_sources, tok, data, message):
    with pytest.raises(ConfigError, match=message):
        prepare_cpt_data(make_cfg(tmp_path, list(two_sources), **data), tok)


def test_streaming_needs_max_steps(tmp_path, tiny_data_dir, tok):
    cfg = make_cfg(tmp_path, [tiny_data_dir / "corpus.txt"], streaming=True)
    cfg.cpt.max_steps = -1
    with pytest.raises(ConfigError, match="cpt.max_steps: must be > 0 with data.streaming=true"):
        prepare_streaming_cpt_data(cfg, tok)


@pytest.mark.slow
def test_streamed_weighted_cpt_on_two_ranks_through_the_cli(tmp_path, two_sources, tiny_data_dir):
    """`data.streaming=true` with a 2-file mixture, 2 DeepSpeed ranks: each rank trains on its own
    blocks, nothing is tokenized into the cache, and the export is verified as usual."""
    from tests.test_pipeline import run_cli, tiny_overrides

    big, small = two_sources
    overrides = [o for o in tiny_overrides(tiny_data_dir, tmp_path) if not o.startswith("data.cpt_files")]
    run_cli(overrides + [f"data.cpt_files=[{big},{small}]", "data.cpt_weights=[0.7,0.3]", "data.streaming=true",
                         "sft.enabled=false", "eval.enabled=false"])
    cpt = tmp_path / "tiny" / "02_cpt"
    manifest = json.loads((cpt / "manifest.json").read_text())
    assert manifest["metrics"]["data_streaming"] is True and manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["verification"]["abs_diff"] <= 1e-5
    served = [set(json.loads((cpt / "logs" / f"rank_{r}.json").read_text())["served_indices"]) for r in (0, 1)]
    assert served[0] and served[1] and not served[0] & served[1]
    assert not (tmp_path / "cache" / "tokenized").exists()

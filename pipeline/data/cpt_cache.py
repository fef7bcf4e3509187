"""Continued-pretraining data at scale: tokenized once into an on-disk cache, or streamed.

Cached (the default): each source file is read record by record into an Arrow dataset, split
into train/held-out by content hash, tokenized with ``datasets.map`` (batched, multi-process),
mixed by weight, packed into blocks and saved under
``<cache_dir>/tokenized/cpt-<key>/``. The key hashes the data files' contents, the tokenizer,
and every setting that changes the blocks, so a re-run, another rank, or another sweep job with
the same data never tokenizes again; Arrow files are memory-mapped, so the corpus is never held
in memory.

Streamed (``data.streaming=true``): the same records, tokenized and packed on the fly in the
training processes, for corpora that should not be materialised at all.

Mixtures (``data.cpt_weights``) are weights on *tokens*: with [0.8, 0.2], 80% of the training
tokens come from the first file. Undersampling makes the mixture as large as its most
constraining source allows; oversampling repeats the smaller sources instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.data.files import is_hub_dataset_name
from pipeline.data.mistral import plain_text_encoder
from pipeline.data.packing import iter_packed_blocks, tokenize_records
from pipeline.data.records import iter_text_records
from pipeline.data.splits import HELDOUT, SELECTION, RecordSplits
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_json, file_lock, hash_path

# Bump when the cached layout or the tokenization/packing rules change: old caches are then ignored.
CACHE_FORMAT = 1
# Documents packed together per ``map`` batch. Each batch drops its incomplete last block, so
# the loss is < seq_len tokens per this many documents (logged as tokens_used_fraction).
PACK_BATCH_DOCS = 20_000
MIXTURE_STRATEGIES = ("undersample", "oversample")
BLOCK_COLUMNS = ("input_ids", "position_ids", "labels")


@dataclass(frozen=True)
class TextSource:
    name: str
    weight: float | None


def cpt_sources(cfg) -> list[TextSource]:
    files, weights = list(cfg.data.cpt_files), cfg.data.cpt_weights
    if not files:
        raise ConfigError("data.cpt_files", "is empty", "list the raw-text files for continued pretraining")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(files):
            raise ConfigError("data.cpt_weights", f"has {len(weights)} weights for {len(files)} files in data.cpt_files",
                              "give one weight per file, in the same order")
        if any(not isinstance(w, (int, float)) or w <= 0 or not math.isfinite(w) for w in weights):
            raise ConfigError("data.cpt_weights", f"{weights}: every weight must be a positive number",
                              "drop a file from data.cpt_files instead of giving it weight 0")
        total = float(sum(weights))
        weights = [w / total for w in weights]
    if cfg.data.cpt_mixture_strategy not in MIXTURE_STRATEGIES:
        raise ConfigError("data.cpt_mixture_strategy", f"unknown strategy '{cfg.data.cpt_mixture_strategy}'",
                          f"use {' or '.join(MIXTURE_STRATEGIES)}")
    return [TextSource(f, None if weights is None else weights[i]) for i, f in enumerate(files)]


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's full serialisation and its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary files
        h.update(hash_path(tokenizer.name_or_path).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         type(tokenizer).__name__]).encode())
    return h.hexdigest()


def source_fingerprint(name: str) -> str:
    # A hub dataset is identified by its name (pin a revision in the name to make it exact).
    return f"hub:{name}" if is_hub_dataset_name(name) else hash_path(name)


def cache_key(cfg, tokenizer, sources: list[TextSource]) -> str:
    d = cfg.data
    spec = {
        "format": CACHE_FORMAT,
        "sources": [[source_fingerprint(s.name), s.weight] for s in sources],
        "strategy": d.cpt_mixture_strategy if d.cpt_weights is not None else None,
        "text_column": d.text_column, "separator": d.txt_document_separator, "max_record_chars": d.max_record_chars,
        "heldout_fraction": d.heldout_fraction, "seq_len": cfg.cpt.seq_len, "seed": cfg.cpt.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        # Which encoder makes the ids (mistral-common's for a Mistral tokenizer): other encoder, other ids.
        "encoder": plain_text_encoder(tokenizer),
    }
    if d.selection_fraction:  # only when set: caches made before the selection split stay valid
        spec["selection_fraction"] = d.selection_fraction
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _num_proc(cfg) -> int:
    n = cfg.data.tokenize_num_proc
    return max(1, n if n is not None else min(8, os.cpu_count() or 1))


# --- functions run by datasets.map (module level so worker processes can pickle them) ---------

def _records(name: str, text_column: str, separator: str, max_chars: int, fraction: float,
             selection_fraction: float = 0.0) -> Iterator[dict]:
    """Train and held-out records; the selection split's (pipeline.data.splits) are left out: cpt
    neither trains on nor verifies with the records that choose (merge=auto's seam, a checkpoint)."""
    splits = RecordSplits(fraction, selection_fraction)
    for text in iter_text_records(name, text_column=text_column, txt_document_separator=separator,
                                  max_record_chars=max_chars):
        split = splits.of(text)
        if split != SELECTION:
            yield {"text": text, "heldout": split == HELDOUT}


def _tokenize(batch: dict, tokenizer) -> dict:
    docs = tokenize_records(tokenizer, batch["text"])
    return {"input_ids": docs, "length": [len(x) for x in docs]}


def _pack(batch: dict, seq_len: int) -> dict:
    out = {k: [] for k in BLOCK_COLUMNS}
    for block in iter_packed_blocks(batch["input_ids"], seq_len):
        for k, v in zip(BLOCK_COLUMNS, block):
            out[k].append(v)
    return out


# --- mixture ----------------------------------------------------------------------------------

def mixture_indices(lengths: list[list[int]], weights: list[float], strategy: str, seed: int) -> tuple[list[list[int]], list[int]]:
    """Per source, the document indices (repeats allowed) that give each source its weight's
    share of the tokens; and the token budget of each source.

    Documents are taken in a seeded random order, whole, until the source's budget is reached.
    """
    import numpy as np

    totals = [int(sum(lens)) for lens in lengths]
    if any(t == 0 for t in totals):
        empty = [i for i, t in enumerate(totals) if t == 0]
        raise ConfigError("data.cpt_files", f"source(s) {empty} have no training tokens", "remove them or fix the files")
    ratios = [t / w for t, w in zip(totals, weights)]
    mixture_tokens = min(ratios) if strategy == "undersample" else max(ratios)
    budgets = [int(round(w * mixture_tokens)) for w in weights]
    rng = np.random.default_rng(seed)
    picked = []
    for lens, budget in zip(lengths, budgets):
        lens = np.asarray(lens, dtype=np.int64)
        order = rng.permutation(len(lens))
        passes = max(1, math.ceil(budget / max(int(lens.sum()), 1)))
        tiled = np.concatenate([order] * passes) if passes > 1 else order
        cum = np.cumsum(lens[tiled])
        n = int(np.searchsorted(cum, budget, side="left")) + 1
        picked.append(tiled[: min(n, len(tiled))].tolist())
    return picked, budgets


# --- the cached path --------------------------------------------------------------------------

@dataclass
class CPTData:
    train: object  # a torch-formatted datasets.Dataset of blocks, or a StreamingBlocks
    heldout: object | None  # the held-out blocks (always materialised: they are small)
    stats: dict
    cache_dir: Path | None


def prepare_cpt_data(cfg, tokenizer, *, log=print, announce_hit: bool = True) -> CPTData:
    """The cpt blocks, from the on-disk cache (built here on a miss; any process may call this:
    a file lock makes the first one build and the others wait and load)."""
    import datasets

    sources = cpt_sources(cfg)
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer", "has no eos_token: documents cannot be separated", "set tokenizer.eos_token")
    key = cache_key(cfg, tokenizer, sources)
    final = Path(cfg.paths.cache_dir) / "tokenized" / f"cpt-{key[:16]}"
    with file_lock(final.with_name(final.name + ".lock")):
        hit = (final / "stats.json").is_file()
        if not hit:
            log(f"[cpt] tokenizing {len(sources)} source(s) into {final} (num_proc={_num_proc(cfg)})")
            _build_cache(cfg, tokenizer, sources, final)
        elif announce_hit:
            log(f"[cpt] tokenized data: cache hit {final}")
    stats = json.loads((final / "stats.json").read_text())
    stats["cache_hit"] = hit
    train = datasets.load_from_disk(str(final / "train")).with_format("torch")
    heldout_dir = final / "heldout"
    heldout = datasets.load_from_disk(str(heldout_dir)).with_format("torch") if heldout_dir.is_dir() else None
    return CPTData(train, heldout, stats, final)


def _build_cache(cfg, tokenizer, sources: list[TextSource], final: Path) -> None:
    import datasets

    d, seq_len, nproc = cfg.data, cfg.cpt.seq_len, _num_proc(cfg)
    # A name of our own: builders that do not share a working file lock (other nodes on a network
    # filesystem) never write into each other's files; the first complete rename wins.
    tmp = final.with_name(f"{final.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / "work"
    tokenized_train, tokenized_heldout, per_source = [], [], []
    for i, src in enumerate(sources):
        records = datasets.Dataset.from_generator(
            _records, cache_dir=str(work / f"src{i}"),
            gen_kwargs={"name": src.name, "text_column": d.text_column, "separator": d.txt_document_separator,
                        "max_chars": d.max_record_chars, "fraction": d.heldout_fraction,
                        "selection_fraction": d.selection_fraction},
        )
        if len(records) == 0:
            raise ConfigError("data.cpt_files", f"{src.name} contains no text", "check the file is not empty")
        tok = records.map(_tokenize, batched=True, num_proc=min(nproc, len(records)), remove_columns=["text"],
                          fn_kwargs={"tokenizer": tokenizer}, desc=f"tokenize {Path(src.name).name}")
        train = tok.filter(lambda h: [not x for x in h], input_columns="heldout", batched=True, desc="train split")
        heldout = tok.filter(lambda h: list(h), input_columns="heldout", batched=True, desc="held-out split")
        tokenized_train.append(train)
        tokenized_heldout.append(heldout)
        per_source.append({"source": src.name, "weight": src.weight, "records": len(records),
                           "train_documents": len(train), "train_tokens": int(sum(train["length"]))})

    if sources[0].weight is not None:
        picked, budgets = mixture_indices([list(t["length"]) for t in tokenized_train], [s.weight for s in sources],
                                          d.cpt_mixture_strategy, cfg.cpt.seed)
        parts = [t.select(idx) for t, idx in zip(tokenized_train, picked)]
        # Interleave the sources' documents (seeded) so every block mixes them as the weights say.
        mixed = datasets.concatenate_datasets(parts).shuffle(seed=cfg.cpt.seed)
        for info, part, budget in zip(per_source, parts, budgets):
            info.update(budget_tokens=budget, selected_documents=len(part), selected_tokens=int(sum(part["length"])))
    else:
        mixed = datasets.concatenate_datasets(tokenized_train)
    mixture_total = int(sum(mixed["length"]))
    for info in per_source:
        info["share_of_tokens"] = info.get("selected_tokens", info["train_tokens"]) / max(mixture_total, 1)

    blocks = mixed.map(_pack, batched=True, batch_size=PACK_BATCH_DOCS, remove_columns=mixed.column_names,
                       fn_kwargs={"seq_len": seq_len}, desc=f"pack {seq_len}-token blocks")
    if len(blocks) == 0:
        raise ConfigError("cpt.seq_len", f"{seq_len} is longer than the whole training corpus ({mixture_total} tokens)",
                          "lower cpt.seq_len or add data")
    tmp.mkdir(parents=True, exist_ok=True)
    blocks.save_to_disk(str(tmp / "train"))
    heldout_docs = datasets.concatenate_datasets(tokenized_heldout)
    heldout_tokens = int(sum(heldout_docs["length"])) if len(heldout_docs) else 0
    if len(heldout_docs):
        heldout_blocks = heldout_docs.map(_pack, batched=True, batch_size=PACK_BATCH_DOCS,
                                          remove_columns=heldout_docs.column_names, fn_kwargs={"seq_len": seq_len})
        if len(heldout_blocks):
            heldout_blocks.save_to_disk(str(tmp / "heldout"))
    shutil.rmtree(work)
    in_blocks = len(blocks) * seq_len
    stats = {
        "blocks": len(blocks), "seq_len": seq_len, "tokens_in_blocks": in_blocks,
        # Stream packing adds no padding: every block position is a real token.
        "packing_efficiency": 1.0,
        "tokens_used_fraction": in_blocks / max(mixture_total, 1),
        "heldout_tokens": heldout_tokens,
        "sources": per_source,
        "mixture_strategy": d.cpt_mixture_strategy if sources[0].weight is not None else None,
    }
    atomic_write_json(tmp / "stats.json", stats)
    try:
        os.rename(tmp, final)
    except OSError:  # another node finished the same cache first: identical content, keep theirs
        if not (final / "stats.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --- the streamed path ------------------------------------------------------------------------

class StreamingBlocks(torch.utils.data.IterableDataset):
    """Packed blocks made on the fly from the sources: nothing is tokenized ahead or stored.

    With weights, the next document always comes from the source furthest below its share of
    the tokens so far (deterministic, token-exact); an exhausted source ends the stream
    (undersample) or starts over (oversample). Iteration is deterministic, so a resumed run
    skipping the batches it has seen gets the same data as an uninterrupted one.
    """

    def __init__(self, cfg, tokenizer):
        self.sources = cpt_sources(cfg)
        self.data = cfg.data
        self.seq_len = cfg.cpt.seq_len
        self.tokenizer = tokenizer

    def _train_records(self, src: TextSource) -> Iterator[str]:
        d = self.data
        for row in _records(src.name, d.text_column, d.txt_document_separator, d.max_record_chars, d.heldout_fraction,
                            d.selection_fraction):
            if not row["heldout"]:
                yield row["text"]

    def _documents(self) -> Iterator[list[int]]:
        def tokenize(text):
            return _tokenize({"text": [text]}, self.tokenizer)["input_ids"][0]

        if self.sources[0].weight is None:
            for src in self.sources:
                for text in self._train_records(src):
                    yield tokenize(text)
            return
        iters = [self._train_records(s) for s in self.sources]
        seen = [0] * len(self.sources)
        while True:
            total = sum(seen) or 1
            i = max(range(len(self.sources)), key=lambda k: self.sources[k].weight - seen[k] / total)
            text = next(iters[i], None)
            if text is None:
                if self.data.cpt_mixture_strategy == "undersample":
                    return
                iters[i] = self._train_records(self.sources[i])
                text = next(iters[i], None)
                if text is None:
                    raise ConfigError("data.cpt_files", f"{self.sources[i].name} has no training text")
            doc = tokenize(text)
            seen[i] += len(doc)
            yield doc

    def __iter__(self):
        for block in iter_packed_blocks(self._documents(), self.seq_len):
            yield {k: torch.tensor(v) for k, v in zip(BLOCK_COLUMNS, block)}


def streaming_heldout(cfg, tokenizer):
    """The held-out blocks of a streamed corpus, packed in memory (a small share of it)."""
    import datasets

    d = cfg.data
    docs = []
    for src in cpt_sources(cfg):
        for row in _records(src.name, d.text_column, d.txt_document_separator, d.max_record_chars, d.heldout_fraction,
                            d.selection_fraction):
            if row["heldout"]:
                docs.append(_tokenize({"text": [row["text"]]}, tokenizer)["input_ids"][0])
    rows = _pack({"input_ids": docs}, cfg.cpt.seq_len)
    return datasets.Dataset.from_dict(rows).with_format("torch") if rows["input_ids"] else None


def prepare_streaming_cpt_data(cfg, tokenizer) -> CPTData:
    if cfg.cpt.max_steps <= 0:
        raise ConfigError("cpt.max_steps", "must be > 0 with data.streaming=true (a stream has no length to count epochs in)",
                          "set cpt.max_steps to the number of optimizer steps to train")
    stats = {"streaming": True, "seq_len": cfg.cpt.seq_len, "packing_efficiency": 1.0,
             "sources": [asdict(s) for s in cpt_sources(cfg)]}
    return CPTData(StreamingBlocks(cfg, tokenizer), streaming_heldout(cfg, tokenizer), stats, None)

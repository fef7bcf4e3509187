"""Benchmark contamination: eval docs that share a 13-gram of words with the run's training data.

A doc's text is every string in it (question, choices, answer: a copied answer counts too);
words are lowercase ``\\w+`` runs, so punctuation and spacing differences do not hide a copy.
The eval side is indexed (its size is fixed, a few million 13-grams for the whole leaderboard) and
the training files are streamed, so a corpus larger than memory is never held whole.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from pipeline.data import check_data_file, is_hub_dataset_name, iter_hub_rows, read_rows

NGRAM_WORDS = 13
_WORD = re.compile(r"\w+")
# Characters read from a .txt training file at a time.
_CHUNK_CHARS = 8 << 20


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(word_list: Sequence[str], n: int = NGRAM_WORDS) -> Iterator[str]:
    for i in range(len(word_list) - n + 1):
        yield " ".join(word_list[i:i + n])


def strings_in(value) -> Iterator[str]:
    """Every string inside a row (nested lists and dicts included), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings_in(v)


def doc_text(doc) -> str:
    return "\n".join(strings_in(doc))


def training_word_streams(files: Iterable[str], *, field: str = "data") -> Iterator[Iterator[str]]:
    """For each text unit of the training files, its words: a .txt file is one stream (read in
    chunks, words carried across chunk edges); a row of a json/jsonl/parquet/csv file or hub dataset is one."""
    for name in files:
        if is_hub_dataset_name(name):
            for row in iter_hub_rows(name, field=field):
                yield iter(words(doc_text(row)))
            continue
        path = check_data_file(name, field=field)
        if path.suffix == ".txt":
            yield _txt_words(path)
        else:
            for row in read_rows(path, field=field):
                yield iter(words(doc_text(row)))


def _txt_words(path: Path) -> Iterator[str]:
    carry = ""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(_CHUNK_CHARS):
            text = carry + chunk
            # A word may continue in the next chunk: keep the tail after the last non-word character.
            cut = max(text.rfind(" "), text.rfind("\n"))
            carry, text = (text[cut:], text[:cut]) if cut >= 0 else (text, "")
            yield from words(text)
    yield from words(carry)


def contaminated_docs(
    eval_docs: Mapping[str, Sequence], training_files: Sequence[str], *, n: int = NGRAM_WORDS,
    field: str = "data",
) -> dict[str, list[int]]:
    """``{task: [indices of its docs sharing an n-gram with any training file]}`` (every task listed,
    an empty list when clean). ``eval_docs``: task -> its docs (dicts) in eval-split order."""
    index: dict[str, list[tuple[str, int]]] = {}
    for task, docs in eval_docs.items():
        for i, doc in enumerate(docs):
            for gram in set(ngrams(words(doc_text(doc)), n)):
                index.setdefault(gram, []).append((task, i))
    hits: dict[str, set[int]] = {task: set() for task in eval_docs}
    for stream in training_word_streams(training_files, field=field):
        window: list[str] = []
        for word in stream:
            window.append(word)
            if len(window) > n:
                del window[0]
            if len(window) == n:
                for task, i in index.get(" ".join(window), ()):
                    hits[task].add(i)
    return {task: sorted(found) for task, found in hits.items()}

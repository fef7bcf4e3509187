"""The three record splits, by one content hash: train, selection and held-out.

A record's place in [0, 1) is the hash ``is_heldout`` reads (sha256 of its text), so
a record is in the same split in every run, file order and machine:

    [0, heldout_fraction)                                     held-out: the test set every stage reports
                                                              (eval, the GGUF ladder); nothing chooses on it
    [heldout_fraction, heldout_fraction + selection_fraction) selection: what *chooses* (merge=auto's seam;
                                                              a checkpoint or seam in a growth study); never
                                                              scored by eval, never trained on by cpt
    the rest                                                  train: what cpt trains on

The held-out split does not move when ``selection_fraction`` changes (it is cut first), so turning
the selection split on changes no eval number's tokens; it only takes its records out of training.
The demo base model (a stand-in for a model pretrained elsewhere) keeps its own train/held-out cut.

For code that chooses something (the growth study's engineer: use these, not the held-out records):

    from pipeline.data.splits import RecordSplits, selection_text_records
    splits = RecordSplits.from_data(cfg.data)          # data.heldout_fraction, data.selection_fraction
    texts = selection_text_records(cfg.data)           # ConfigError when data.selection_fraction is 0
    splits.of(text)                                     # "train" | "selection" | "heldout"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.data.records import iter_text_records
from pipeline.errors import ConfigError

TRAIN, SELECTION, HELDOUT = "train", "selection", "heldout"


@dataclass(frozen=True)
class Split:
    train: list
    heldout: list


def is_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records: Iterable, fraction: float, key=lambda r: r) -> Split:
    train, heldout = [], []
    for r in records:
        (heldout if is_heldout(key(r), fraction) else train).append(r)
    return Split(train, heldout)


def heldout_text_records(
    files: list[str], *, heldout_fraction: float, text_column: str = "text", txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000,
) -> list[str]:
    """The held-out records of raw-text files, in file order: what every stage scores (eval, quantize).
    Only these are kept in memory; the corpus itself may be far larger."""
    return [r for name in files
            for r in iter_text_records(name, text_column=text_column, txt_document_separator=txt_document_separator,
                                       max_record_chars=max_record_chars)
            if is_heldout(r, heldout_fraction)]


@dataclass(frozen=True)
class RecordSplits:
    """Where each record goes, at these two fractions (the rest is train)."""

    heldout_fraction: float
    selection_fraction: float = 0.0

    def __post_init__(self):
        check_split_fractions(self.heldout_fraction, self.selection_fraction)

    @classmethod
    def from_data(cls, data) -> "RecordSplits":
        """From a ``DataConfig`` (``data.heldout_fraction``, ``data.selection_fraction``)."""
        return cls(data.heldout_fraction, getattr(data, "selection_fraction", 0.0))

    def of(self, text: str) -> str:
        if is_heldout(text, self.heldout_fraction):
            return HELDOUT
        # The same hash, one interval further: selection records are never held-out ones.
        if self.selection_fraction > 0 and is_heldout(text, self.heldout_fraction + self.selection_fraction):
            return SELECTION
        return TRAIN

    def describe(self) -> str:
        h, s = self.heldout_fraction, self.selection_fraction
        return (f"the selection split (records at content-hash position [{h:g}, {h + s:g}): neither held out "
                f"for eval, the first {h:g}, nor trained on by cpt)")


def check_split_fractions(heldout_fraction: float, selection_fraction: float) -> None:
    for name, value in (("data.heldout_fraction", heldout_fraction), ("data.selection_fraction", selection_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(name, f"must be in [0, 1), got {value!r}")
    if heldout_fraction + selection_fraction >= 1.0:
        raise ConfigError("data.selection_fraction",
                          f"{selection_fraction} + data.heldout_fraction {heldout_fraction} leaves no record to train on",
                          "keep data.heldout_fraction + data.selection_fraction below 1 (e.g. 0.05 + 0.05)")


def require_selection_split(splits: RecordSplits, *, needed_by: str) -> None:
    if splits.selection_fraction <= 0:
        raise ConfigError("data.selection_fraction",
                          f"is 0, and {needed_by} chooses on the selection split (the held-out split is eval's "
                          "test set: what chooses must not be what scores)",
                          "set data.selection_fraction, e.g. 0.05 (its records are then not trained on by cpt)")


def selection_text_records(
    data, *, needed_by: str = "this step", field: str = "data.cpt_files",
) -> Iterator[str]:
    """The selection split's raw-text records of ``data.cpt_files`` (a ``DataConfig``), in file order,
    one at a time (the corpus may be far larger than memory). ConfigError when the split is off."""
    splits = RecordSplits.from_data(data)
    require_selection_split(splits, needed_by=needed_by)
    return split_text_records(list(data.cpt_files), splits, SELECTION, text_column=data.text_column,
                              txt_document_separator=data.txt_document_separator,
                              max_record_chars=data.max_record_chars, field=field)


def split_text_records(files: Iterable[str], splits: RecordSplits, which: str, *, text_column: str = "text",
                       txt_document_separator: str = "\n\n\n", max_record_chars: int = 4000,
                       field: str = "data.cpt_files") -> Iterator[str]:
    """The records of one split (``TRAIN`` / ``SELECTION`` / ``HELDOUT``) of raw-text files, in file order."""
    if which not in (TRAIN, SELECTION, HELDOUT):
        raise ValueError(f"unknown split {which!r}")
    for name in files:
        for text in iter_text_records(name, text_column=text_column, txt_document_separator=txt_document_separator,
                                      max_record_chars=max_record_chars, field=field):
            if splits.of(text) == which:
                yield text


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_disjoint(chosen_on: Iterable[str], scored_on: Iterable[str], *, what: str) -> int:
    """Raise ConfigError when a record (by content) is in both; returns how many were compared.
    For a split chosen with other fractions than the ones that score (the guard the hash cut alone
    cannot give)."""
    chosen = {content_hash(t) for t in chosen_on}
    shared = sum(1 for t in scored_on if content_hash(t) in chosen)
    if shared:
        raise ConfigError("data.selection_fraction", f"{what}: {shared} record(s) that choose are also scored",
                          "use the same data.heldout_fraction for choosing and scoring (RecordSplits.from_data(cfg.data))")
    return len(chosen)

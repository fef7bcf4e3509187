"""The selection split (pipeline/data/splits.py): disjoint from the held-out split eval scores and
from what cpt trains on, the held-out split unchanged by it, clear errors when it is off or too small."""

from __future__ import annotations

import pytest

from pipeline.config import REPO_ROOT, DataConfig
from pipeline.data import heldout_text_records, load_text_records
from pipeline.data.cpt_cache import _records
from pipeline.data.splits import (
    HELDOUT,
    SELECTION,
    TRAIN,
    RecordSplits,
    check_disjoint,
    check_split_fractions,
    selection_text_records,
)
from pipeline.errors import ConfigError

DEMO_CORPUS = REPO_ROOT / "data" / "demo" / "corpus.txt"


def test_selection_split_shares_no_record_with_heldout_or_train_on_the_demo_corpus():
    data = DataConfig(cpt_files=[str(DEMO_CORPUS)], heldout_fraction=0.05, selection_fraction=0.05)
    selection = list(selection_text_records(data))
    heldout = heldout_text_records([str(DEMO_CORPUS)], heldout_fraction=0.05)  # what eval scores
    cpt_rows = list(_records(str(DEMO_CORPUS), "text", "\n\n\n", 4000, 0.05, 0.05))  # what cpt reads
    cpt_train = [r["text"] for r in cpt_rows if not r["heldout"]]
    assert selection and heldout and cpt_train
    assert not set(selection) & set(heldout)
    assert not set(selection) & {r["text"] for r in cpt_rows}  # neither trained on nor cpt's held-out blocks
    assert check_disjoint(selection, heldout, what="demo") == len(set(selection))
    # Every record is in exactly one split; the held-out split is the same with the selection split on or off.
    records = load_text_records([str(DEMO_CORPUS)])
    splits = RecordSplits(0.05, 0.05)
    assert sorted(records) == sorted(selection + heldout + cpt_train)
    assert [r for r in records if splits.of(r) == HELDOUT] == heldout
    assert [r for r in records if RecordSplits(0.05).of(r) == HELDOUT] == heldout
    assert sorted(r for r in records if RecordSplits(0.05).of(r) == TRAIN) == sorted(selection + cpt_train)
    # Its share is what was asked for, roughly (content hash: 5% +- noise on ~800 records).
    assert 0.02 < len(selection) / len(records) < 0.09


def test_check_disjoint_refuses_a_selection_made_with_other_fractions():
    records = load_text_records([str(DEMO_CORPUS)])
    chosen = [r for r in records if RecordSplits(0.02, 0.05).of(r) == SELECTION]  # [0.02, 0.07)
    eval_heldout = [r for r in records if RecordSplits(0.05).of(r) == HELDOUT]   # [0, 0.05): overlaps
    with pytest.raises(ConfigError, match="also scored") as e:
        check_disjoint(chosen, eval_heldout, what="a growth study's checkpoint choice")
    assert e.value.where == "data.selection_fraction"


@pytest.mark.parametrize("heldout, selection, field, message", [
    (0.05, 1.0, "data.selection_fraction", "must be in \\[0, 1\\)"),
    (0.05, -0.1, "data.selection_fraction", "must be in \\[0, 1\\)"),
    (0.6, 0.4, "data.selection_fraction", "leaves no record to train on"),
    (1.0, 0.0, "data.heldout_fraction", "must be in \\[0, 1\\)"),
])
def test_bad_fractions_are_refused_naming_the_field(heldout, selection, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_split_fractions(heldout, selection)
    assert e.value.where == field


def test_selection_records_need_the_split_on():
    data = DataConfig(cpt_files=[str(DEMO_CORPUS)], heldout_fraction=0.05)  # selection_fraction 0 (default)
    with pytest.raises(ConfigError, match="growth study chooses on the selection split") as e:
        list(selection_text_records(data, needed_by="the growth study"))
    assert e.value.where == "data.selection_fraction" and "e.g. 0.05" in e.value.fix

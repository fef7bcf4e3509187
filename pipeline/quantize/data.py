"""Held-out text for the ladder: scored text and imatrix calibration text, kept apart.

Both come from the run's held-out split (``pipeline.data.is_heldout``, by content hash, so the
model never trained on them). A second salted hash divides that split in two, so the importance
matrix is never computed on the very tokens the rungs are scored on (which would flatter the
imatrix rungs).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data import is_heldout, load_text_records

CALIBRATION_SALT = "dus-pipeline/quantize/imatrix-calibration:"


@dataclass(frozen=True)
class LadderTexts:
    eval_texts: list[str]
    calibration_texts: list[str]


def split_eval_and_calibration(heldout: list[str], *, calibration_fraction: float = 0.5) -> LadderTexts:
    evals, calib = [], []
    for text in heldout:
        (calib if is_heldout(CALIBRATION_SALT + text, calibration_fraction) else evals).append(text)
    return LadderTexts(eval_texts=evals, calibration_texts=calib)


def ladder_texts_from_files(files: list[str], *, heldout_fraction: float, calibration_fraction: float = 0.5,
                            text_column: str = "text", max_record_chars: int = 4000,
                            field: str = "quantize.eval_files") -> LadderTexts:
    """Records of ``files``; the held-out share (all of them with ``heldout_fraction=1``) split in two."""
    records = load_text_records(files, text_column=text_column, max_record_chars=max_record_chars, field=field)
    heldout = records if heldout_fraction >= 1.0 else [r for r in records if is_heldout(r, heldout_fraction)]
    return split_eval_and_calibration(heldout, calibration_fraction=calibration_fraction)

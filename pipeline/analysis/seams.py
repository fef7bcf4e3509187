"""Candidate seams of a SOLAR-shaped depth up-scaling, ranked from the layer similarity, then scored.

A SOLAR-shaped merge of an ``N``-layer model to ``L`` layers stacks two slices of it,
``[0, a) + [b, N)`` with ``a - b = L - N`` (so ``N < L <= 2N``). After the merge, layer ``b`` (first
layer of the second copy) receives the output of layer ``a - 1``, i.e. ``h_a`` instead of the
``h_b`` it was trained on. The cheap *predicted damage* of a seam is therefore the angular
distance ``d(h_b, h_a)`` measured on the source model: 0 when the layers in between leave the
residual stream unchanged (the merge then computes the same function up to the duplicated layers).

SOLAR's own choice (arXiv 2312.15166, 32 -> 48 layers: ``[0, 24) + [8, 32)``) drops the same number
of layers at each side of the seam: ``a = ceil(L / 2)``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pipeline.analysis.similarity import LayerSimilarity, measure_perplexity
from pipeline.errors import ConfigError
from pipeline.merge import InputSlice, MergeConfig, OutputSlice, run_merge


@dataclass
class Candidate:
    """One seam ``[0, first_end) + [second_start, source_layers)``."""

    first_end: int  # a
    second_start: int  # b
    source_layers: int  # N
    predicted_damage: float  # d(h_b, h_a) on the source model
    is_solar: bool = False
    predicted_rank: int = 0  # 1 = least predicted damage
    measured_perplexity: Optional[float] = None  # perplexity of the merged model on the analysis tokens (None = not scored)
    measured_rank: Optional[int] = None  # 1 = lowest perplexity among the scored candidates
    merge_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None

    @property
    def slices(self) -> List[Tuple[int, int]]:
        return [(0, self.first_end), (self.second_start, self.source_layers)]

    @property
    def target_layers(self) -> int:
        return self.first_end + self.source_layers - self.second_start

    def to_dict(self) -> dict:
        return {**asdict(self), "slices": [list(s) for s in self.slices], "target_layers": self.target_layers}


def check_target_depth(source_layers: int, target_layers: int, *, where: str = "target_layers") -> None:
    if not isinstance(target_layers, int) or isinstance(target_layers, bool):
        raise ConfigError(where, f"expected an integer number of layers, got {target_layers!r}")
    if target_layers <= source_layers:
        raise ConfigError(where, f"{target_layers} is not deeper than the source model ({source_layers} layers)",
                          f"depth up-scaling needs a target above {source_layers}, e.g. {source_layers * 3 // 2}")
    if target_layers > 2 * source_layers:
        raise ConfigError(where, f"{target_layers} is more than twice the source depth ({source_layers}); a SOLAR "
                          "merge [0, a) + [b, N) holds at most 2N layers",
                          f"choose a target in ({source_layers}, {2 * source_layers}]")


def solar_seam(source_layers: int, target_layers: int) -> Tuple[int, int]:
    """(a, b) of SOLAR's symmetric seam: as many layers dropped below the seam as above it."""
    check_target_depth(source_layers, target_layers)
    a = math.ceil(target_layers / 2)
    return a, a - (target_layers - source_layers)


def enumerate_seams(source_layers: int, target_layers: int) -> List[Tuple[int, int]]:
    """Every (a, b) with 0 <= b < a <= N and a - b = L - N, in increasing a."""
    check_target_depth(source_layers, target_layers)
    overlap = target_layers - source_layers
    return [(a, a - overlap) for a in range(overlap, source_layers + 1)]


def candidate_seams(similarity: LayerSimilarity, target_layers: int) -> List[Candidate]:
    """All seams for ``target_layers``, least predicted damage first (ties: SOLAR's, then smaller a)."""
    n_layers = similarity.num_layers
    solar = solar_seam(n_layers, target_layers)
    out = [Candidate(first_end=a, second_start=b, source_layers=n_layers,
                     predicted_damage=similarity.angular_distance[b][a], is_solar=(a, b) == solar)
           for a, b in enumerate_seams(n_layers, target_layers)]
    out.sort(key=lambda c: (c.predicted_damage, not c.is_solar, c.first_end))
    for rank, cand in enumerate(out, 1):
        cand.predicted_rank = rank
    return out


def passthrough_merge_config(model: str, candidate: Candidate, *, dtype: Optional[str] = None):
    return MergeConfig(
        merge_method="passthrough",
        slices=[OutputSlice(sources=[InputSlice(model=model, layer_range=[lo, hi])]) for lo, hi in candidate.slices],
        dtype=dtype,
    )


def select_for_scoring(candidates: Sequence[Candidate], top_k: int) -> List[Candidate]:
    """The ``top_k`` least-damaging candidates, plus SOLAR's seam if it is not among them."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError("top_k", f"must be a positive integer, got {top_k!r}", "e.g. --top-k 3")
    chosen = list(candidates[:top_k])
    chosen += [c for c in candidates[top_k:] if c.is_solar]
    return chosen


def score_candidates(
    model_dir: Path | str,
    candidates: Sequence[Candidate],
    token_batches: Sequence,
    *,
    work_dir: Path | str | None = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    progress: bool = True,
) -> List[Candidate]:
    """Merge each candidate (passthrough, into a temporary directory removed afterwards) and measure
    its perplexity on ``token_batches``; fills ``measured_perplexity`` and ``measured_rank``."""
    tmp_root = Path(tempfile.mkdtemp(prefix="seams-", dir=str(work_dir) if work_dir else None))
    try:
        for cand in candidates:
            out = tmp_root / f"merge-{cand.first_end}-{cand.second_start}"
            started = time.perf_counter()
            run_merge(passthrough_merge_config(str(model_dir), cand), out, progress=False)
            cand.merge_seconds = time.perf_counter() - started
            started = time.perf_counter()
            cand.measured_perplexity = measure_perplexity(
                out, token_batches, device=device, dtype=dtype, progress=progress, total_batches=len(token_batches),
                desc=f"ppl [0,{cand.first_end})+[{cand.second_start},{cand.source_layers})")
            cand.eval_seconds = time.perf_counter() - started
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    for rank, cand in enumerate(sorted(candidates, key=lambda c: (c.measured_perplexity, c.first_end)), 1):
        cand.measured_rank = rank
    return list(candidates)


def _ranks(values: Sequence[float]) -> List[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# Below this many scored seams no rank correlation is reported: the scored seams are the few the
# prediction itself ranked best (plus SOLAR's), so rho over 3-4 of them validates little.
MIN_SPEARMAN_SEAMS = 6


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (Pearson on average ranks); None below 3 points or for a constant side."""
    if len(x) != len(y):
        raise ValueError("spearman_rho needs two sequences of the same length")
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)

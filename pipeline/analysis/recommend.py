"""``recommend_seam``: analysis pass -> ranked seams -> top k merged and scored -> report.

Every input is checked before a model is loaded: the model format (through the merge's own
validation: the recommended seam must be mergeable), the target depth, ``top_k``, the data files,
their text column and their token count.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

from pipeline.analysis.report import SeamReport, write_report
from pipeline.analysis.seams import (
    MIN_SPEARMAN_SEAMS,
    Candidate,
    candidate_seams,
    check_target_depth,
    passthrough_merge_config,
    score_candidates,
    select_for_scoring,
    solar_seam,
    spearman_rho,
)
from pipeline.analysis.similarity import analyze_layers, load_model_for_analysis, measure_perplexity
from pipeline.analysis.tokens import (
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_SELECTION_FRACTION,
    TokenBatches,
    check_analysis_data,
    split_token_batches,
)
from pipeline.config import REPO_ROOT
from pipeline.data.splits import SELECTION, RecordSplits
from pipeline.errors import ConfigError
from pipeline.merge import InputSlice, MergeConfig, OutputSlice, validate_merge

DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 256


def default_data_files() -> List[str]:
    return [str(REPO_ROOT / "data" / "demo" / "corpus.txt")]


def source_depth(model_dir: Path | str) -> int:
    """Layer count of ``model_dir``, read the way the merge reads it (ConfigError for anything the
    merge refuses: unknown architecture, missing config, pickle-only weights, ...)."""
    probe = MergeConfig(slices=[OutputSlice(sources=[InputSlice(model=str(model_dir), layer_range=[0, 1])])])
    plan = validate_merge(probe)
    return plan.sources[str(model_dir)].num_layers


def _context_length(model_dir: Path) -> Optional[int]:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 1 else None


def prepare_tokens(model_dir: Path | str, *, data_files: Sequence[str], num_tokens: int, seq_len: Optional[int],
                   batch_size: int, heldout_fraction: Optional[float],
                   selection_fraction: float = DEFAULT_SELECTION_FRACTION, text_column: str = "text",
                   txt_document_separator: str = "\n\n\n", max_record_chars: int = 4000,
                   tokens_field: str = "--tokens", fraction_field: str = "--selection-fraction") -> TokenBatches:
    """The analysis tokens: the selection split of ``data_files`` at these fractions
    (``pipeline.data.splits``; ``heldout_fraction=None``: every record)."""
    from transformers import AutoTokenizer

    check_analysis_data(data_files, text_column=text_column)
    context = _context_length(Path(model_dir))
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    elif context is not None and seq_len > context:
        raise ConfigError("--seq-len", f"{seq_len} exceeds the model's max_position_embeddings ({context})",
                          f"use --seq-len {context} or less")
    splits = None if heldout_fraction is None else RecordSplits(heldout_fraction, selection_fraction)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    return split_token_batches(tokenizer, data_files, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size,
                               splits=splits, which=SELECTION, text_column=text_column,
                               txt_document_separator=txt_document_separator, max_record_chars=max_record_chars,
                               tokens_field=tokens_field, fraction_field=fraction_field)


def recommend_seam(
    model_dir: Path | str,
    *,
    target_layers: int,
    top_k: int = 3,
    data_files: Optional[Sequence[str]] = None,
    num_tokens: int = DEFAULT_TOKENS,
    seq_len: Optional[int] = None,
    batch_size: int = 4,
    heldout_fraction: Optional[float] = DEFAULT_HELDOUT_FRACTION,
    selection_fraction: float = DEFAULT_SELECTION_FRACTION,
    text_column: str = "text",
    txt_document_separator: str = "\n\n\n",
    max_record_chars: int = 4000,
    tokens_field: str = "--tokens",
    fraction_field: str = "--selection-fraction",
    out_dir: Path | str | None = None,
    model_ref: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    time_plain_forward: bool = True,
    work_dir: Path | str | None = None,
    progress: bool = True,
) -> SeamReport:
    """Choose the seam of a SOLAR-shaped merge of ``model_dir`` to ``target_layers`` layers.

    The top ``top_k`` seams by predicted damage, plus SOLAR's own, are merged and scored by perplexity
    on the analysis tokens; the lowest wins. The tokens come from the selection split
    (``pipeline.data.splits``: records at content-hash position [heldout_fraction, heldout_fraction +
    selection_fraction), never the held-out records eval scores); ``heldout_fraction=None`` takes
    every record of ``data_files`` (data set aside for choosing). ``report.slices`` is the winner as plain
    data ``[(0, a), (b, N)]``; with ``out_dir`` the report files are written there and their paths
    are in ``report.paths`` (``merge_yaml`` is the mergekit config of the winner). ``model_ref`` is
    the model name written into that YAML (default: ``model_dir`` as given).
    """
    model_dir = str(model_dir)
    data_files = list(data_files) if data_files else default_data_files()
    # Cheap checks first, nothing loaded yet.
    n_layers = source_depth(model_dir)
    check_target_depth(n_layers, target_layers, where="target_layers")
    a, b = solar_seam(n_layers, target_layers)
    validate_merge(passthrough_merge_config(model_dir, Candidate(a, b, n_layers, 0.0)))
    select_for_scoring([], top_k)  # validates top_k
    tokens = prepare_tokens(model_dir, data_files=data_files, num_tokens=num_tokens, seq_len=seq_len,
                            batch_size=batch_size, heldout_fraction=heldout_fraction,
                            selection_fraction=selection_fraction, text_column=text_column,
                            txt_document_separator=txt_document_separator, max_record_chars=max_record_chars,
                            tokens_field=tokens_field, fraction_field=fraction_field)

    model = load_model_for_analysis(model_dir, device=device, dtype=dtype)
    similarity = analyze_layers(model=model, token_batches=tokens, progress=progress, total_batches=len(tokens))
    similarity.model_dir = model_ref or model_dir
    plain_seconds = None
    if time_plain_forward:
        started = time.perf_counter()
        measure_perplexity(model=model, token_batches=tokens, progress=progress, total_batches=len(tokens),
                           desc="plain forward")
        plain_seconds = time.perf_counter() - started
    del model
    gc.collect()

    candidates = candidate_seams(similarity, target_layers)
    to_score = select_for_scoring(candidates, top_k)
    started = time.perf_counter()
    score_candidates(model_dir, to_score, tokens.batches, work_dir=work_dir, device=device, dtype=dtype,
                     progress=progress)
    scoring_seconds = time.perf_counter() - started
    recommended = min(to_score, key=lambda c: (c.measured_perplexity, c.predicted_rank))
    solar = next(c for c in candidates if c.is_solar)
    # Over a handful of seams the prediction itself picked, a rank correlation says little: none below
    # MIN_SPEARMAN_SEAMS, and always reported with its n.
    rho = (spearman_rho([c.predicted_damage for c in to_score], [c.measured_perplexity for c in to_score])
           if len(to_score) >= MIN_SPEARMAN_SEAMS else None)
    split = ({"name": "all records"} if heldout_fraction is None else
             {"name": SELECTION, "heldout_fraction": heldout_fraction, "selection_fraction": selection_fraction})
    report = SeamReport(
        model=model_ref or model_dir, source_layers=n_layers, target_layers=target_layers,
        num_tokens=tokens.num_tokens, base_perplexity=similarity.perplexity, candidates=candidates,
        recommended=recommended, solar=solar, spearman_rho=rho, split=split,
        analysis_seconds=similarity.seconds,
        plain_forward_seconds=plain_seconds, scoring_seconds=scoring_seconds, similarity=similarity,
    )
    if out_dir is not None:
        write_report(report, similarity, out_dir)
    return report

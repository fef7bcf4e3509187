"""Choose the seam of a depth up-scaling from data: layer similarity of the source model
(Block Influence, angular distances), SOLAR-shaped candidate seams ranked by predicted damage,
the best few merged and scored by perplexity on the selection split (never the
held-out records eval scores). CLI: ``python -m pipeline.analyze``;
docs/analysis.md.
"""

from pipeline.analysis.recommend import default_data_files, prepare_tokens, recommend_seam, source_depth
from pipeline.analysis.report import SeamReport, write_report
from pipeline.analysis.seams import (
    Candidate,
    candidate_seams,
    enumerate_seams,
    passthrough_merge_config,
    score_candidates,
    select_for_scoring,
    solar_seam,
    spearman_rho,
)
from pipeline.analysis.similarity import LayerSimilarity, analyze_layers, load_model_for_analysis, measure_perplexity
from pipeline.analysis.tokens import TokenBatches, heldout_token_batches, split_token_batches

__all__ = [
    "Candidate", "LayerSimilarity", "SeamReport", "TokenBatches", "analyze_layers", "candidate_seams",
    "default_data_files", "enumerate_seams", "heldout_token_batches", "load_model_for_analysis", "measure_perplexity",
    "passthrough_merge_config", "prepare_tokens", "recommend_seam", "score_candidates", "select_for_scoring",
    "solar_seam", "source_depth", "spearman_rho", "split_token_batches", "write_report",
]

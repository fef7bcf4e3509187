"""The seam report: JSON (everything measured), markdown (for people), two plots, and the
recommended merge as a mergekit YAML usable with ``merge=from_file merge.config_file=...``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pipeline.analysis.seams import MIN_SPEARMAN_SEAMS, Candidate
from pipeline.analysis.similarity import LayerSimilarity
from pipeline.fsutil import atomic_output_dir

REPORT_JSON = "seam_report.json"
REPORT_MD = "seam_report.md"
MERGE_YAML = "recommended_merge.yml"
HEATMAP_PNG = "angular_distance.png"
BLOCK_INFLUENCE_PNG = "block_influence.png"


@dataclass
class SeamReport:
    model: str  # as written in the merge YAML (the model reference the user gave)
    source_layers: int
    target_layers: int
    num_tokens: int
    base_perplexity: float
    candidates: List[Candidate]  # all seams, by predicted rank; scored ones carry measured_perplexity
    recommended: Candidate  # lowest measured perplexity among the scored
    solar: Candidate
    spearman_rho: Optional[float]  # predicted damage vs measured perplexity over the scored; None below MIN_SPEARMAN_SEAMS
    analysis_seconds: float
    plain_forward_seconds: Optional[float] = None
    scoring_seconds: Optional[float] = None
    # Which records the tokens came from: {"name": "selection", "heldout_fraction", "selection_fraction"}
    # (pipeline.data.splits), or {"name": "all records"}.
    split: Dict[str, object] = field(default_factory=dict)
    paths: Dict[str, str] = field(default_factory=dict)  # name -> file, once written
    similarity: Optional[LayerSimilarity] = field(default=None, repr=False)

    @property
    def slices(self) -> List[Tuple[int, int]]:
        """The recommended merge as plain data: [(0, a), (b, N)]."""
        return self.recommended.slices

    @property
    def scored(self) -> List[Candidate]:
        return [c for c in self.candidates if c.measured_perplexity is not None]

    @property
    def spearman_over(self) -> str:
        """What rho's n counts: every candidate seam, or only those the prediction picked for scoring."""
        n = len(self.scored)
        return ("all candidate seams" if n == len(self.candidates)
                else f"the {n} seams picked by the prediction itself (and SOLAR's), of {len(self.candidates)}")

    def tokens_text(self) -> str:
        """Where the scored tokens came from, for people."""
        if self.split.get("name") == "selection":
            h, s = self.split["heldout_fraction"], self.split["selection_fraction"]
            return (f"{self.num_tokens} tokens of the selection split (records at content-hash position "
                    f"[{h:g}, {h + s:g}): not the held-out records eval scores)")
        return f"{self.num_tokens} tokens of every record of the data given"

    def spearman_text(self) -> str:
        n = len(self.scored)
        if self.spearman_rho is not None:
            return (f"Spearman's rho between predicted damage and measured perplexity: {self.spearman_rho:.3f} "
                    f"(n = {n}: {self.spearman_over}).")
        if n < MIN_SPEARMAN_SEAMS:
            return (f"Spearman's rho: not given (n = {n} scored seams, below {MIN_SPEARMAN_SEAMS}: a rank correlation "
                    f"over {self.spearman_over} says little; score more with --top-k / merge.auto_top_k).")
        return f"Spearman's rho: undefined (n = {n}; a constant side)."

    def to_dict(self, similarity: Optional[LayerSimilarity] = None) -> dict:
        similarity = similarity or self.similarity
        out = {
            "model": self.model,
            "source_layers": self.source_layers,
            "target_layers": self.target_layers,
            "num_tokens": self.num_tokens,
            "base_perplexity": self.base_perplexity,
            "recommended": self.recommended.to_dict(),
            "recommended_slices": [list(s) for s in self.slices],
            "solar": self.solar.to_dict(),
            "solar_measured_rank": self.solar.measured_rank,
            "num_scored": len(self.scored),
            "spearman_rho": self.spearman_rho,
            "spearman_n": len(self.scored),  # how many seams rho is (or would be) over
            "spearman_over": self.spearman_over,
            "split": self.split,
            "analysis_seconds": self.analysis_seconds,
            "plain_forward_seconds": self.plain_forward_seconds,
            "scoring_seconds": self.scoring_seconds,
            "candidates": [c.to_dict() for c in self.candidates],
            "paths": {k: Path(v).name for k, v in self.paths.items()},
        }
        if similarity is not None:
            out["block_influence"] = similarity.block_influence
            out["angular_distance"] = similarity.angular_distance
        return out


def merge_yaml_text(report: SeamReport) -> str:
    """mergekit passthrough YAML of the recommended seam (``merge.config_file`` reads it as is)."""
    (a0, a1), (b0, b1) = report.slices
    header = (f"# Seam chosen by `python -m pipeline.analyze` for {report.source_layers} -> {report.target_layers} layers:\n"
              f"# lowest perplexity on the selection split ({report.recommended.measured_perplexity:.4g}) of "
              f"{len(report.scored)} scored seams (SOLAR's [0, {report.solar.first_end}) + "
              f"[{report.solar.second_start}, {report.source_layers}): {_fmt(report.solar.measured_perplexity)}).\n"
              f"# Use: python -m pipeline merge=from_file merge.config_file=<this file>\n")
    model = json.dumps(report.model)  # quoted: a path may hold YAML-special characters
    return (header
            + "merge_method: passthrough\n"
            + "slices:\n"
            + f"  - sources:\n      - model: {model}\n        layer_range: [{a0}, {a1}]\n"
            + f"  - sources:\n      - model: {model}\n        layer_range: [{b0}, {b1}]\n")


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def markdown_text(report: SeamReport, similarity: LayerSimilarity) -> str:
    rec, solar = report.recommended, report.solar
    lines = [
        f"# Seam report: {report.model}, {report.source_layers} -> {report.target_layers} layers",
        "",
        f"Scored on {report.tokens_text()}; perplexity of the unmodified model: {report.base_perplexity:.4g}.",
        "",
        f"**Recommended:** `[0, {rec.first_end}) + [{rec.second_start}, {report.source_layers})`, "
        f"perplexity {_fmt(rec.measured_perplexity)} (predicted rank {rec.predicted_rank}).",
        f"SOLAR's seam `[0, {solar.first_end}) + [{solar.second_start}, {report.source_layers})`: perplexity "
        f"{_fmt(solar.measured_perplexity)}, rank {solar.measured_rank} of {len(report.scored)} scored "
        f"(predicted rank {solar.predicted_rank} of {len(report.candidates)}).",
        report.spearman_text(),
        "",
        f"Merge config: `{MERGE_YAML}` (`python -m pipeline merge=from_file merge.config_file=...`).",
        "",
        "## Candidates",
        "",
        "Predicted damage = angular distance d(h_b, h_a) between the hidden states that become neighbours at "
        "the seam (layer b receives h_a instead of h_b). Lower is better for both columns.",
        "",
        "| slices | predicted damage | predicted rank | measured ppl | measured rank | SOLAR |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.candidates:
        lines.append(f"| [0, {c.first_end}) + [{c.second_start}, {c.source_layers}) | {c.predicted_damage:.4f} | "
                     f"{c.predicted_rank} | {_fmt(c.measured_perplexity)} | {c.measured_rank or '-'} | "
                     f"{'yes' if c.is_solar else ''} |")
    lines += ["", "## Per layer", "",
              "Block Influence BI(l) = 1 - cos(h_l, h_{l+1}) (ShortGPT); d1 = angular distance to the next layer.", "",
              "| layer | BI | d(h_l, h_{l+1}) |", "|---|---|---|"]
    for layer, bi in enumerate(similarity.block_influence):
        lines.append(f"| {layer} | {bi:.4f} | {similarity.distance(layer, 1):.4f} |")
    cost = [f"Similarity pass: {report.analysis_seconds:.1f} s"]
    if report.plain_forward_seconds is not None:
        cost.append(f"plain forward pass over the same tokens: {report.plain_forward_seconds:.1f} s")
    if report.scoring_seconds is not None:
        cost.append(f"merging and scoring {len(report.scored)} seams: {report.scoring_seconds:.1f} s")
    lines += ["", "## Cost", "", "; ".join(cost) + " (wall time on this machine; noisy when it is shared).", "",
              f"Plots: `{HEATMAP_PNG}` (angular distance, layer l x span n), `{BLOCK_INFLUENCE_PNG}`.", ""]
    return "\n".join(lines)


def plot_heatmap(similarity: LayerSimilarity, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = np.array([[np.nan if v is None else v for v in row] for row in similarity.distance_table()])
    n_layers = similarity.num_layers
    fig, ax = plt.subplots(figsize=(1.5 + 0.25 * n_layers, 1.2 + 0.22 * n_layers))
    im = ax.imshow(table, origin="lower", aspect="auto", cmap="viridis", vmin=0.0,
                   extent=(0.5, n_layers + 0.5, -0.5, n_layers - 0.5))
    ax.set_xlabel("span n (layers)")
    ax.set_ylabel("starting layer l")
    ax.set_title("angular distance d(h_l, h_{l+n})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_block_influence(similarity: LayerSimilarity, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = similarity.num_layers
    fig, ax = plt.subplots(figsize=(2 + 0.25 * n_layers, 3))
    ax.bar(range(n_layers), similarity.block_influence, color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence (1 - cos)")
    ax.set_title("Block Influence per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: SeamReport, similarity: LayerSimilarity, out_dir: Path | str, *,
                 overwrite: bool = True) -> Dict[str, str]:
    """Write the report files into ``out_dir`` (built under a temporary name, renamed when complete)."""
    out_dir = Path(out_dir)
    names = {"report_json": REPORT_JSON, "report_md": REPORT_MD, "merge_yaml": MERGE_YAML,
             "heatmap_png": HEATMAP_PNG, "block_influence_png": BLOCK_INFLUENCE_PNG}
    report.paths = {k: str(out_dir / v) for k, v in names.items()}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / MERGE_YAML).write_text(merge_yaml_text(report))
        plot_heatmap(similarity, tmp / HEATMAP_PNG)
        plot_block_influence(similarity, tmp / BLOCK_INFLUENCE_PNG)
        (tmp / REPORT_MD).write_text(markdown_text(report, similarity))
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(similarity), indent=2) + "\n")
    return report.paths

"""The eval plots: loss across the training stages with each stage's held-out perplexity, and one
panel per metric with a bar per stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

from pipeline.evaluation.results import (
    COLUMN_LABELS,
    format_metric,
    heldout_perplexity_label,
    known_chance,
    metric_columns,
    stage_order,
    stderr_key,
)


def read_log_history(stage_dir: Path | str) -> list[dict]:
    """A training stage's HF ``log_history``: ``logs/log_history.json`` (written by cpt/sft), else
    ``trainer_state.json`` here or in its latest ``checkpoint-*``; [] if none."""
    stage_dir = Path(stage_dir)
    candidates = [stage_dir / "logs" / "log_history.json", stage_dir / "trainer_state.json"]
    checkpoints = sorted(stage_dir.glob("**/checkpoint-*/trainer_state.json"),
                         key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]) if p.parent.name.rsplit("-", 1)[-1].isdigit() else -1)
    for path in candidates + checkpoints[::-1]:
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("log_history", []) if isinstance(data, dict) else data
    return []


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


_STAGE_COLORS = {"base": "#555555", "merge": "#d62728", "cpt": "#1f77b4", "sft": "#2ca02c", "dpo": "#9467bd"}


def _perplexity_ticks(lo_nats: float, hi_nats: float, most: int = 9) -> list[float]:
    """Round perplexity values (1, 2, 5 x 10^k; 1, 2, 3, 5 when the range is narrow) between
    exp(lo) and exp(hi), for the perplexity axis of a plot drawn in nats."""
    lo, hi = math.exp(max(lo_nats, -50)), math.exp(min(hi_nats, 700))
    for mantissas in ((1, 1.5, 2, 3, 4, 5, 7), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10**k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10**k <= hi]
        if len(ticks) <= most:
            return ticks
    return ticks[:: math.ceil(len(ticks) / most)]


# Stages whose training loss is a preference loss, not a token NLL: never on the perplexity axis.
PREFERENCE_LOSS_STAGES = ("dpo",)


def _loss_points(log: list[dict]) -> list[tuple[int, float]]:
    return sorted((e["step"], e["loss"]) for e in log if "loss" in e and "step" in e)


def _preference_loss_panel(ax, stage_logs: Mapping[str, list[dict]]) -> None:
    """DPO's loss on its own axis: -log sigmoid(reward margin), ln 2 when the policy is its reference."""
    for stage in stage_order(stage_logs):
        points = _loss_points(stage_logs[stage])
        if points:
            ax.plot(*zip(*points), color=_STAGE_COLORS.get(stage), lw=1.6, label=f"{stage} training loss")
    ax.axhline(math.log(2), color="black", ls="--", lw=1, label="ln 2 = no preference learned")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss (not a perplexity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("DPO loss", pad=18)


def training_figure(stage_logs: Mapping[str, list[dict]], eval_ppl: Mapping[str, float]):
    """The figure of ``plot_training``: the language-model panel, and a panel of its own for a
    preference stage's loss when there is one."""
    import numpy as np

    preference = {s: log for s, log in stage_logs.items() if s in PREFERENCE_LOSS_STAGES and _loss_points(log)}
    stage_logs = {s: log for s, log in stage_logs.items() if s not in PREFERENCE_LOSS_STAGES}
    fig = _new_figure(13 if preference else 9, 5)
    if preference:
        grid = fig.add_gridspec(1, 2, width_ratios=[3, 1.3])
        ax = fig.add_subplot(grid[0])
        _preference_loss_panel(fig.add_subplot(grid[1]), preference)
    else:
        ax = fig.add_subplot()
    offset, stage_end = 0, {}
    for stage in stage_order(stage_logs):
        points = sorted((e["step"], e["loss"]) for e in stage_logs[stage] if "loss" in e and "step" in e)
        if not points:
            continue
        xs = [offset + s for s, _ in points]
        ax.plot(xs, [l for _, l in points], color=_STAGE_COLORS.get(stage), lw=1.6, label=f"{stage} training loss")
        if offset:
            ax.axvline(offset, color="#999999", ls=":", lw=1)
        ax.text(offset, 1.01, f" {stage} ", transform=ax.get_xaxis_transform(), ha="left", va="bottom", fontsize=9)
        stage_end[stage] = offset + points[-1][0]
        offset = stage_end[stage]

    at_step = {"base": 0, "merge": 0}
    for stage in stage_order(eval_ppl):
        if stage not in at_step:
            at_step[stage] = stage_end.get(stage, offset)
    pts = [(s, at_step[s], math.log(v)) for s, v in ((s, eval_ppl[s]) for s in stage_order(eval_ppl))
           if v is not None and 0 < v < float("inf")]
    if pts:
        path_pts = [(x, y) for s, x, y in pts if s != "base"]
        if len(path_pts) > 1:
            ax.plot(*zip(*path_pts), color="#444444", ls="--", lw=1, zorder=2)
        for i, (stage, x, y) in enumerate(pts):
            ax.scatter([x], [y], s=70, marker="D", color=_STAGE_COLORS.get(stage, f"C{i}"), edgecolor="black",
                       zorder=3, label=f"{stage} held-out ppl")
            ax.annotate(f"{stage}: {math.exp(y):,.1f}", (x, y), textcoords="offset points",
                        xytext=(8, -14) if stage == "base" else (8, 6), fontsize=9)
    ax.set_xlabel("optimizer step (cpt steps, then sft steps)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xlim(left=-0.03 * max(offset, 1), right=max(offset, 1) * 1.12)
    ax.margins(y=0.12)
    sec = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.clip(p, 1e-300, None))))
    sec.set_yticks(_perplexity_ticks(*ax.get_ylim()))
    sec.set_ylabel("perplexity = exp(loss)")
    fig.supxlabel("markers: held-out corpus perplexity of each stage's model (base and merge at step 0); "
                  "cpt trains on corpus tokens, sft on assistant tokens only", fontsize=8, color="#444444")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Training loss across stages and held-out perplexity per stage", pad=18)
    return fig


def plot_training(stage_logs: Mapping[str, list[dict]], eval_ppl: Mapping[str, float], path: Path | str) -> Path:
    """Training loss of the language-model stages on one step axis (cpt steps, then sft steps), and
    each stage's held-out perplexity as a marker at the step where that stage's model was taken (base
    and merge at step 0). Both share the left axis in nats (eval points at ln(ppl)); the right axis
    reads the same scale as perplexity = exp(loss). sft's training loss is on assistant tokens, the
    markers are on held-out corpus text. DPO's loss is a preference loss, not a token NLL: it gets
    its own panel (ln 2 marked), never the perplexity axis."""
    fig = training_figure(stage_logs, eval_ppl)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_tasks(
    results: Mapping[str, Mapping[str, float]], path: Path | str, *, chance: Mapping[str, float] | None = None
) -> Path:
    """One panel per metric (held-out ppl, assistant loss, each harness metric), one bar per stage,
    with ±1 standard error where lm-eval gives one and a dashed line at chance where known."""
    columns = metric_columns(results)
    stages = stage_order(results)
    chance = known_chance(results, chance)
    labels = {**COLUMN_LABELS, "heldout/perplexity": heldout_perplexity_label(results)}
    ncols = min(3, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig = _new_figure(4.0 * ncols, 3.1 * nrows)
    if not columns:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no metrics to plot", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shown = [s for s in stages if results[s].get(key) is not None and math.isfinite(results[s][key])]
        values = [results[s][key] for s in shown]
        errs = [results[s].get(stderr_key(key)) or 0.0 for s in shown]
        bars = ax.bar(shown, values, yerr=errs if any(errs) else None, capsize=3,
                      color=[_STAGE_COLORS.get(s, f"C{j}") for j, s in enumerate(shown)])
        ax.bar_label(bars, labels=[format_metric(key, v) for v in values], fontsize=8, padding=2)
        if chance and key in chance:
            ax.axhline(chance[key], color="black", ls="--", lw=1, label=f"chance {chance[key]:.3f}")
            ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
        if values:
            ax.set_ylim(0, max(v + e for v, e in zip(values, errs)) * (1.35 if chance and key in chance else 1.18))
        ax.set_title(labels.get(key, key), fontsize=10 if len(labels.get(key, key)) < 45 else 8)
        ax.tick_params(labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

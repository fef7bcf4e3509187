"""The growth study's sweep report (issue #21; docs/growth-study.md): which growth operator pays
against the same-token control.

``check_points`` refuses a sweep before any model loads: a grown point not at the study's depth
(±1), points planned with different cpt tokens (unless ``allow_unequal_tokens``), split fractions
that would let the selection split overlap the held-out one. ``write_sweep_report`` reads each
point's manifests and eval results and writes ``sweep_report.{md,json}`` and ``loss_vs_tokens.png``.
``GrowthStudyCallback`` is the Hydra layer (set by conf/experiment/growth_study_*.yaml); without
Hydra: ``python -m pipeline.report --sweep DIR``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback

from pipeline import metric_names as M
from pipeline.cluster.sweep import SweepSummaryCallback, read_job_records
from pipeline.config import PipelineConfig
from pipeline.data.splits import check_split_fractions
from pipeline.errors import ConfigError
from pipeline.evaluation.leaderboard import average as leaderboard_average
from pipeline.fsutil import atomic_write_json, atomic_write_text
from pipeline.log import log
from pipeline.manifest import read_manifest, resolve_model_dir, stage_dir
from pipeline.merge.plan import planned_num_layers
from pipeline.stages.merge import base_depth

REPORT_MD, REPORT_JSON, PLOT = "sweep_report.md", "sweep_report.json", "loss_vs_tokens.png"
CONTROL = "control"
DEPTH_TOLERANCE = 1


def planned_cpt_tokens(cfg: PipelineConfig) -> Optional[int]:
    """Tokens per optimizer step x max_steps (every cpt block is full: packed, no padding); None when
    the run counts epochs instead of steps (its token count is only known after the fact)."""
    c = cfg.cpt
    if not c.enabled or c.max_steps <= 0:
        return None
    return (c.max_steps * c.per_device_train_batch_size * c.gradient_accumulation_steps
            * cfg.distributed.num_processes * cfg.distributed.num_machines * c.seq_len)


def planned_depth(cfg: PipelineConfig) -> Optional[int]:
    if cfg.merge.target_layers is not None:
        return cfg.merge.target_layers
    depth = base_depth(cfg)
    return None if depth is None else planned_num_layers(cfg.merge, base_layers=depth)


def check_points(points: Sequence[tuple[str, PipelineConfig]], *, allow_unequal_tokens: bool = False) -> dict:
    """Refuse a study whose points are not comparable; returns {label: (depth, tokens)}. No model loads."""
    planned = {}
    for label, cfg in points:
        check_split_fractions(cfg.data.heldout_fraction, cfg.data.selection_fraction)
        planned[label] = (planned_depth(cfg), planned_cpt_tokens(cfg), base_depth(cfg))
    grown = {label: d for label, (d, _, base) in planned.items() if d is not None and d != base}
    if grown:
        target = max(grown.values())
        short = {label: d for label, d in grown.items() if abs(d - target) > DEPTH_TOLERANCE}
        if short:
            raise ConfigError("merge", "growth operators that do not reach the study's depth "
                              f"{target} (±{DEPTH_TOLERANCE}): " + ", ".join(f"{k} -> {v} layers" for k, v in short.items()),
                              "set their merge parameters (n_layers_removed, block_expansion_group_size, "
                              "target_layers) so every grown point has the same depth, or leave them out")
    tokens = {label: t for label, (_, t, _) in planned.items()}
    if not allow_unequal_tokens:
        unknown = [k for k, t in tokens.items() if t is None]
        if unknown:
            raise ConfigError("cpt.max_steps", f"points {', '.join(unknown)} train by epochs: their cpt tokens "
                              "cannot be made equal in advance", "set cpt.max_steps (make growth-study does)")
        if len(set(tokens.values())) > 1:
            raise ConfigError("cpt", "sweep points differ in planned cpt tokens: "
                              + "; ".join(f"{k}: {v:,}" for k, v in tokens.items()),
                              "give every point the same cpt.max_steps and batch, or allow_unequal_tokens=true")
    return {k: {"layers": d, "cpt_tokens": t} for k, (d, t, _) in planned.items()}


def point_label(overrides: Sequence[str], shared: set) -> str:
    for o in overrides:
        if o.startswith("growth="):
            return o.split("=", 1)[1].rsplit("/", 1)[-1]
    for o in overrides:
        if o.startswith("merge="):
            return o.split("=", 1)[1]
    return " ".join(o for o in overrides if o not in shared) or "point"


def _stage_ppl(results: dict, stage: str) -> Optional[float]:
    return (results.get("stages", {}).get(stage) or {}).get("heldout/perplexity")


def _leaderboard(results: dict, stage: str) -> Optional[float]:
    """The offline leaderboard average of a stage over the board tasks that ran (eval=leaderboard:
    results.json's ``leaderboard`` record names them), else None."""
    tasks = list((results.get("leaderboard") or {}).get("tasks") or {})
    avg, _ = leaderboard_average(results.get("stages", {}).get(stage) or {}, tasks)
    return avg


def read_point(record: dict, shared: set) -> dict:
    run_dir = Path(record["run_dir"])
    point: dict[str, Any] = {"job": record["num"], "operator": point_label(record.get("overrides") or [], shared),
                             "status": record.get("status"), "run_dir": str(run_dir), "overrides": record.get("overrides")}
    started, ended = record.get("started_at"), record.get("ended_at")
    point["wall_time_s"] = round(ended - started, 1) if started and ended else None
    for stage in ("merge", "cpt", "sft"):
        manifest = read_manifest(stage_dir(run_dir, stage))
        point[f"{stage}_model_dir"] = resolve_model_dir(run_dir, stage, manifest) if manifest else None
        if stage == "merge" and manifest:
            config = Path(point["merge_model_dir"]) / "config.json"
            point["layers"] = json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None
        if stage == "cpt":
            metrics = manifest.metrics if manifest else {}
            point["parameters"] = metrics.get(M.NUM_PARAMETERS)
            point["trainable_parameters"] = metrics.get(M.TRAINABLE_PARAMETERS)
            point["cpt_tokens"] = metrics.get(M.TOKENS_SEEN)
            point["curve"] = metrics.get(M.HELDOUT_CURVE) or []
    point.setdefault("layers", None)
    results_file = stage_dir(run_dir, "eval") / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for stage in ("merge", "cpt", "sft"):
        point[f"heldout_ppl_{stage}"] = _stage_ppl(results, stage)
        point[f"leaderboard_{stage}"] = _leaderboard(results, stage)
    n, t = point.get("parameters"), point.get("cpt_tokens")
    point["training_flops"] = 6 * n * t if n and t else None
    point["is_control"] = point["operator"] == CONTROL
    return point


def _interp(xs: list[float], ys: list[float], x: float) -> Optional[float]:
    """Linear interpolation inside [xs[0], xs[-1]]; None outside (no silent extrapolation)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if xs and x == xs[-1] else None


def _log_fit(xs: list[float], ys: list[float]) -> Optional[tuple[float, float]]:
    """Least squares loss = a + b ln(tokens); None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    lx = [math.log(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    var = sum((v - mx) ** 2 for v in lx)
    if var == 0:
        return None
    b = sum((v - mx) * (y - my) for v, y in zip(lx, ys)) / var
    return my - b * mx, b


def crossing(point: dict, control: dict) -> dict:
    """Where the grown curve first drops below the control's (interpolated at the grown point's
    eval tokens); else, when both log fits converge, the extrapolated crossing, labelled as such."""
    g = [(c["tokens_seen"], c["heldout_loss"]) for c in point["curve"] if c.get("tokens_seen")]
    k = [(c["tokens_seen"], c["heldout_loss"]) for c in control["curve"] if c.get("tokens_seen")]
    if not g or not k:
        return {"kind": "n/a", "text": "n/a (no held-out curve)"}
    kx, ky = [x for x, _ in k], [y for _, y in k]
    for x, y in g:
        ref = _interp(kx, ky, x)
        if ref is not None and y < ref:
            return {"kind": "measured", "tokens": x, "text": f"below the control from {x:,} tokens (measured)"}
    fg, fk = _log_fit([x for x, _ in g], [y for _, y in g]), _log_fit(kx, ky)
    budget = max(x for x, _ in g)
    if fg and fk and fg[1] < fk[1]:
        x = math.exp((fk[0] - fg[0]) / (fg[1] - fk[1]))
        if x > budget:
            fit = f"loss = a + b ln(tokens), least squares on {len(g)} and {len(k)} curve points"
            return {"kind": "extrapolated", "tokens": x, "fit": fit,
                    "text": f"does not cross within {budget:,} tokens; EXTRAPOLATED crossing at ~{x:,.0f} tokens ({fit})"}
    return {"kind": "none", "text": f"does not cross within {budget:,} tokens (its fitted curve does not converge on the control's)"}


def _winner(rows: list[tuple[str, Optional[float]]]) -> str:
    scored = [(v, name) for name, v in rows if v is not None]
    return min(scored)[1] if scored else "n/a"


def summarize(points: list[dict]) -> dict:
    control = next((p for p in points if p["is_control"]), None)
    at_tokens = _winner([(p["operator"], p["heldout_ppl_cpt"]) for p in points])
    # Equal FLOPs: every curve read at the smallest total budget (the control's, when it is cheapest):
    # a grown model has then seen fewer tokens, at 6·N FLOPs per token. The curve is read at the same
    # fraction of its own run: its token axis is the Trainer's count, which can differ from the
    # manifest's (SmolLM2: pad = eos, so the Trainer leaves out each block's end-of-document tokens),
    # and the cheapest point must be read at its last curve point, not just past it.
    budgets = [p["training_flops"] for p in points if p["training_flops"]]
    at_flops, flops_budget, at_flops_loss = "n/a", min(budgets) if budgets else None, {}
    if flops_budget:
        for p in points:
            xs = [c["tokens_seen"] for c in p["curve"] if c.get("tokens_seen")]
            ys = [c["heldout_loss"] for c in p["curve"] if c.get("tokens_seen")]
            at_flops_loss[p["operator"]] = (_interp(xs, ys, xs[-1] * flops_budget / p["training_flops"])
                                            if xs and p["training_flops"] else None)
        unread = [name for name, loss in at_flops_loss.items() if loss is None]
        # A point that cannot be read at the budget must not lose by default.
        at_flops = (f"n/a (no held-out curve at the budget for: {', '.join(unread)})" if unread
                    else _winner(list(at_flops_loss.items())))
    tokens = {p["cpt_tokens"] for p in points}
    return {"winner_at_equal_tokens": at_tokens, "winner_at_equal_flops": at_flops,
            "equal_flops_budget": flops_budget, "heldout_loss_at_equal_flops": at_flops_loss,
            "equal_cpt_tokens": len(tokens) == 1 and None not in tokens,
            "control": control["operator"] if control else None,
            "crossings": {p["operator"]: crossing(p, control) for p in points if control and p is not control}}


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if spec else str(v)


def format_report(points: list[dict], summary: dict) -> str:
    lines = ["# Growth study: sweep report", "",
             f"{len(points)} points; equal cpt tokens: {'yes' if summary['equal_cpt_tokens'] else 'NO'}; "
             f"control: {summary['control'] or 'none in this sweep'}.", "",
             "| operator | layers | parameters | cpt tokens | training FLOPs | held-out ppl merge | cpt | sft "
             "| leaderboard (sft) | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append("| " + " | ".join([
            p["operator"] + (" (control)" if p["is_control"] else ""), _fmt(p["layers"]), _fmt(p["parameters"], ","),
            _fmt(p["cpt_tokens"], ","), _fmt(p["training_flops"], ".3g"), _fmt(p["heldout_ppl_merge"], ".2f"),
            _fmt(p["heldout_ppl_cpt"], ".2f"), _fmt(p["heldout_ppl_sft"], ".2f"), _fmt(p["leaderboard_sft"], ".3f"),
            "n/a" if p["wall_time_s"] is None else f"{p['wall_time_s'] / 60:.1f} min"]) + " |")
    lines += ["", "cpt tokens: non-padding tokens the cpt stage actually trained on (its manifest). Training "
              "FLOPs: 6 · N · cpt tokens, N = all parameters (for llama_pro_new_only an upper bound: its frozen "
              "weights get no weight gradient). Held-out ppl: the eval stage's perplexity on the held-out split "
              "after each stage. Leaderboard: the offline leaderboard average over the board tasks that ran (each point's "
              "05_eval/results.md names them, with n per task) where eval=leaderboard ran, else n/a.",
              "", f"**Winner at equal cpt tokens** (lowest held-out ppl after cpt): {summary['winner_at_equal_tokens']}.",
              f"**Winner at equal training FLOPs** ({_fmt(summary['equal_flops_budget'], '.3g')} FLOPs, each "
              "point's held-out curve interpolated at the tokens that budget buys it): "
              f"{summary['winner_at_equal_flops']}.", ""]
    if summary["crossings"]:
        lines.append(f"Where a grown curve crosses the control's ({summary['control']}):")
        lines += [f"- {op}: {c['text']}" for op, c in summary["crossings"].items()]
    lines += ["", f"Plot: {PLOT} (held-out loss vs cpt tokens seen, every point on the same axes, control dashed)."]
    return "\n".join(lines) + "\n"


def plot_curves(points: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for p in points:
        xs = [c["tokens_seen"] for c in p["curve"] if c.get("tokens_seen")]
        ys = [c["heldout_loss"] for c in p["curve"] if c.get("tokens_seen")]
        if xs:
            ax.plot(xs, ys, marker="o", linestyle="--" if p["is_control"] else "-", color="black" if p["is_control"] else None,
                    label=p["operator"] + (" (control)" if p["is_control"] else "") + f", {_fmt(p['layers'])} layers")
    ax.set_xlabel("cpt tokens seen")
    ax.set_ylabel("held-out loss (nats/token, cpt eval)")
    ax.set_title("Held-out loss vs tokens: growth operators and the control")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def write_sweep_report(sweep_dir: Path | str) -> tuple[Path, Path, Path]:
    sweep_dir = Path(sweep_dir)
    records = read_job_records(sweep_dir)
    if not records:
        raise ConfigError(str(sweep_dir), "holds no sweep job records (.jobs/)", "give the multirun's sweep directory")
    shared = set.intersection(*(set(r.get("overrides") or []) for r in records)) if len(records) > 1 else set()
    points = [read_point(r, shared) for r in records]
    summary = summarize(points)
    md, js = sweep_dir / REPORT_MD, sweep_dir / REPORT_JSON
    atomic_write_json(js, {"points": points, "summary": summary})
    atomic_write_text(md, format_report(points, summary))
    return md, js, plot_curves(points, sweep_dir / PLOT)


def typed_job_config(cfg, output_dir: Path | str) -> PipelineConfig:
    """A composed job config (its ``hydra`` node included) typed as the job would see it, its
    ``${hydra:...}`` values resolved against its own Hydra node with ``output_dir`` as the run dir,
    without running it. The process's HydraConfig is restored afterwards."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from pipeline.configio import to_typed

    previous = HydraConfig.instance().cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        return to_typed(cfg)
    finally:
        HydraConfig.instance().cfg = previous


def _sweep_configs(config) -> list[tuple[str, PipelineConfig]]:
    """Every job of this multirun composed (configs only) from the sweep's overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    shared = set.intersection(*(set(j) for j in jobs)) if len(jobs) > 1 else set()
    hydra = GlobalHydra.instance().hydra
    labels = [point_label(job, shared) for job in jobs]
    if len(set(labels)) < len(labels):
        # Two jobs of one operator (another swept key): name each by all it does not share, so
        # neither hides the other from the checks.
        labels = [" ".join(o for o in job if o not in shared) for job in jobs]
    out = []
    for num, (label, job) in enumerate(zip(labels, jobs)):
        cfg = hydra.compose_config(config_name=config.hydra.job.config_name, overrides=list(job), run_mode=RunMode.RUN)
        out.append((label, typed_job_config(cfg, Path(str(config.hydra.sweep.dir)) / str(num))))
    return out


class GrowthStudyCallback(SweepSummaryCallback):
    """The sweep summary's callback plus the study: every point checked before the first job starts,
    the report rewritten after each job's record (so a failed or killed point still leaves one) and at
    the end. Set in place of ``hydra.callbacks.sweep_summary`` (Hydra calls on_job_end hooks of
    different callbacks in reverse order, so one callback keeps record-then-report in order)."""

    def __init__(self, allow_unequal_tokens: bool = False):
        self.allow_unequal_tokens = allow_unequal_tokens

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        try:
            planned = check_points(_sweep_configs(config), allow_unequal_tokens=self.allow_unequal_tokens)
        except ConfigError as e:
            # SystemExit, not the error: Hydra turns a callback's Exception into a warning and goes on.
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        log("growth study points: " + ", ".join(f"{k} ({v['layers']} layers, {v['cpt_tokens']} cpt tokens)"
                                                for k, v in planned.items()))

    def _write(self, sweep_dir: Path) -> None:
        if (sweep_dir / ".jobs").is_dir():
            md, _, _ = write_sweep_report(sweep_dir)
            log(f"growth study report: {md}")

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        super().on_job_end(config, job_return, **kwargs)
        if self._job(config):
            self._write(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        super().on_multirun_end(config, **kwargs)
        self._write(Path(str(config.hydra.sweep.dir)))

"""The results table: ``results.json`` and ``results.md`` with one row per stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

from pipeline.config import STAGES
from pipeline.evaluation.leaderboard import board_markdown
from pipeline.evaluation.metrics import AVERAGE_KEY, HELDOUT, RESULTS_JSON, RESULTS_MD, SFT_HELDOUT
from pipeline.evaluation.preference import PREFERENCE_CHANCE, REFERENCE_IS_POLICY
from pipeline.fsutil import atomic_write_json, atomic_write_text


def stage_order(stages: Iterable[str]) -> list[str]:
    stages = list(stages)
    known = [s for s in STAGES if s in stages]
    return known + [s for s in stages if s not in known]


COLUMN_LABELS = {
    f"{HELDOUT}/perplexity": "held-out ppl",
    f"{SFT_HELDOUT}/loss": "assistant-token loss",
    AVERAGE_KEY: "harness average",
    "preference/reward_accuracy": "held-out preference accuracy",
    "preference/reward_margin": "mean reward margin",
    "preference/logprob_accuracy": "chosen more likely than rejected",
}


# Shown elsewhere (stderr next to its metric), redundant (loss = ln ppl) or a marker.
_NOT_COLUMNS = {f"{HELDOUT}/loss", f"{SFT_HELDOUT}/perplexity", REFERENCE_IS_POLICY}


_COUNT_SUFFIXES = ("/tokens", "/examples", "/skipped", "/window")

# The reward columns of a model scored against itself: undefined (every reward 0 by construction).
_REWARD_KEYS = ("preference/reward_accuracy", "preference/reward_margin")
NOT_APPLICABLE_SELF_REFERENCE = "n/a (reference = itself)"


def heldout_perplexity_label(results: Mapping[str, Mapping[str, float]]) -> str:
    """The eval's perplexity column says what it is: which tokens, which windows, which engine (the
    seam analysis and the GGUF ladder report other perplexities, under their own labels)."""
    tokens = next((r.get(f"{HELDOUT}/tokens") for r in results.values() if r.get(f"{HELDOUT}/tokens")), None)
    window = next((r.get(f"{HELDOUT}/window") for r in results.values() if r.get(f"{HELDOUT}/window")), None)
    if not tokens:
        return COLUMN_LABELS[f"{HELDOUT}/perplexity"]
    return (f"held-out ppl ({int(tokens):,} tokens of the held-out records"
            + (f", {int(window)}-token windows" if window else "") + ", transformers)")


def known_chance(results: Mapping[str, Mapping[str, float]], chance: Mapping[str, float] | None) -> dict[str, float]:
    """``chance`` plus the chance level of the preference accuracies when the results have them."""
    present = {k for r in results.values() for k in r}
    return {**{k: v for k, v in PREFERENCE_CHANCE.items() if k in present}, **(chance or {})}


def cell(results: Mapping[str, Mapping[str, float]], stage: str, key: str) -> str:
    """A table cell: the value (± its standard error), or why there is none."""
    value = results[stage].get(key)
    if value is None and key in _REWARD_KEYS and results[stage].get(REFERENCE_IS_POLICY):
        return NOT_APPLICABLE_SELF_REFERENCE
    text = format_metric(key, value)
    se = results[stage].get(stderr_key(key))
    if value is not None and se is not None:
        text += f" ± {format_metric(key, se)}"
    return text


def metric_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The metrics worth a column or a panel: held-out ppl, assistant loss, then harness metrics."""
    seen: list[str] = []
    for stage in stage_order(results):
        for key in results[stage]:
            if key in seen or key in _NOT_COLUMNS or key.endswith(_COUNT_SUFFIXES) or key.endswith("_stderr"):
                continue
            seen.append(key)
    first = [k for k in COLUMN_LABELS if k in seen and k != AVERAGE_KEY]
    last = [AVERAGE_KEY] if AVERAGE_KEY in seen else []
    return first + [k for k in seen if k not in first and k not in last] + last


def stderr_key(key: str) -> str:
    task, _, metric = key.partition("/")
    name, comma, filt = metric.partition(",")
    return f"{task}/{name}_stderr{comma}{filt}"


def format_metric(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    if "perplexity" in key:
        return f"{value:,.2f}" if value < 1e6 else f"{value:.3g}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"


def summarize(results: Mapping[str, Mapping[str, float]], *, chance: Mapping[str, float] | None = None) -> list[str]:
    """Sentences on what the numbers show, computed from them."""
    order = stage_order(results)
    lines: list[str] = []

    def series(key: str) -> dict[str, float]:
        return {s: results[s][key] for s in order if results[s].get(key) is not None}

    ppl_key = f"{HELDOUT}/perplexity"
    ppl = series(ppl_key)
    if len(ppl) >= 2:
        lines.append("Held-out perplexity by stage: " + " → ".join(f"{s} {format_metric(ppl_key, v)}" for s, v in ppl.items()) + ".")
    if "base" in ppl and "merge" in ppl:
        b, m = ppl["base"], ppl["merge"]
        verb = "raised" if m > b else "lowered" if m < b else "left unchanged"
        text = f"merge {verb} held-out perplexity from {format_metric(ppl_key, b)} (base) to {format_metric(ppl_key, m)}"
        if "cpt" in ppl:
            c = ppl["cpt"]
            rel = "below" if c < b else "above" if c > b else "equal to"
            change = f"{abs(1 - c / m) * 100:.0f}% {'below' if c < m else 'above'} merge"
            text += f"; cpt brought it to {format_metric(ppl_key, c)} ({change}, {rel} the base's {format_metric(ppl_key, b)})"
        lines.append(text + ".")
    loss_key = f"{SFT_HELDOUT}/loss"
    loss = series(loss_key)
    if "sft" in loss:
        before = [s for s in loss if order.index(s) < order.index("sft")]
        if before:
            prev = before[-1]
            verb = "lowered" if loss["sft"] < loss[prev] else "raised" if loss["sft"] > loss[prev] else "left unchanged"
            lines.append(f"sft {verb} the assistant-token loss on held-out conversations from "
                         f"{loss[prev]:.4f} ({prev}) to {loss['sft']:.4f}.")
    for key, level in (chance or {}).items():
        vals = series(key)
        if not vals:
            continue
        best = max(vals, key=vals.get)
        se = results[best].get(stderr_key(key))
        above = se is not None and vals[best] - 2 * se > level
        err = f" ± {se:.3f}" if se is not None else ""
        lines.append(
            f"{key}: best stage {best} at {vals[best]:.3f}{err} vs chance {level:.3f} "
            f"({'more than 2 standard errors above chance' if above else 'not distinguishable from chance'})."
        )
    avg = series(AVERAGE_KEY)
    if avg:
        lines.append("Harness average by stage: " + " → ".join(f"{s} {v:.3f}" for s, v in avg.items()) + ".")
    return lines


def results_markdown(results: Mapping[str, Mapping[str, float]], *, chance: Mapping[str, float] | None = None,
                     leaderboard: Mapping | None = None) -> str:
    """``leaderboard``: results.json's ``leaderboard`` section (``leaderboard.board_info``): the
    seed's table goes first, and its tasks' metrics leave the general table."""
    columns = metric_columns(results)
    lines = ["# Evaluation", ""]
    if leaderboard:
        lines += ["## Open LLM Leaderboard v1 (offline)", "",
                  board_markdown({s: results[s] for s in stage_order(results)}, leaderboard), ""]
        board_tasks = set(leaderboard.get("tasks") or {})
        columns = [c for c in columns if c.partition("/")[0] not in board_tasks]
        if not columns:
            return "\n".join(lines)
        lines += ["## Other metrics", ""]
    chance = known_chance(results, chance)
    labels = {**COLUMN_LABELS, f"{HELDOUT}/perplexity": heldout_perplexity_label(results)}
    header = ["stage"] + [labels.get(c, c) + (f" (chance {chance[c]:.3g})" if c in chance else "") for c in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage in stage_order(results):
        lines.append("| " + " | ".join([stage, *(cell(results, stage, col) for col in columns)]) + " |")
    lines.append("")
    notes = summarize(results, chance=chance)
    if notes:
        lines += [*notes, ""]
    lines.append(
        "held-out ppl: per-token perplexity of the held-out corpus records under transformers (non-overlapping "
        "windows of eval.seq_len tokens, a BOS token never scored; the seam analysis scores other records and "
        "the GGUF ladder scores under llama.cpp, so their perplexities are not this one); assistant-token loss: "
        "mean NLL (nats) on assistant tokens of held-out conversations; `task/metric`: lm-evaluation-harness "
        "(± standard error)."
        + (f" Preference reward columns: {NOT_APPLICABLE_SELF_REFERENCE} for a model that is its own reference "
           "(every reward 0 by construction)." if any(r.get(REFERENCE_IS_POLICY) for r in results.values()) else "")
        + "".join(f" Chance for {k}: {v:.3f}." for k, v in (chance or {}).items())
    )
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Mapping[str, float]], out_dir: Path | str, *, chance: Mapping[str, float] | None = None,
    leaderboard: Mapping | None = None,
) -> None:
    """``results.json`` (``{"stages": {stage: metrics}, "chance": ..., "summary": [...]}``) and
    ``results.md`` (one row per stage, one column per metric, plus what the numbers show).

    ``chance``: metric key -> chance level (e.g. ``{"dus_mc/acc": mc_chance_accuracy()}``).
    ``leaderboard``: the Open LLM Leaderboard run's n, shots and contamination counts
    (``leaderboard.board_info``), kept as results.json's ``leaderboard`` and shown as the seed's table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = {s: dict(results[s]) for s in stage_order(results)}
    chance = known_chance(ordered, chance)
    payload = {"stages": ordered, "chance": dict(chance or {}), "summary": summarize(ordered, chance=chance)}
    if leaderboard:
        payload["leaderboard"] = dict(leaderboard)
    atomic_write_json(out_dir / RESULTS_JSON, payload)
    atomic_write_text(out_dir / RESULTS_MD, results_markdown(ordered, chance=chance, leaderboard=leaderboard))

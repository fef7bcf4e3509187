#!/usr/bin/env bash
# The day a GPU is there: one prepared check, under 10 minutes on one H100/H200 (issue #22).
#   1. the SmolLM2 experiment (conf/experiment/smollm2_dus.yaml: merge 30 -> 44 layers, cpt, sft,
#      eval) in bf16 with sdpa attention (flash_attention_2 when the flash-attn package imports),
#      reporting tokens/s and MFU from the training callbacks' logs;
#   2. the offline leaderboard subset on the GPU (python -m pipeline.evaluation ... --preset leaderboard);
#   3. one summary table.
# Without a GPU it runs only its CPU-safe part (the experiment's preflight: config, data, merge plan,
# disk and memory estimates) and says what it skipped.
#
#   scripts/gpu_check.sh [--out DIR] [--limit N] [--python PY] [--dry-run]
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "  --out DIR     where the runs and summary go [outputs/gpu_check]"
  echo "  --limit N     leaderboard examples per task [100]"
  echo "  --python PY   the interpreter [.venv/bin/python]"
  echo "  --dry-run     print what would run (and the table of skips), run nothing"
}

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="outputs/gpu_check"
LIMIT=100
PY="$REPO/.venv/bin/python"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --limit) [ $# -ge 2 ] || { echo "error: --limit needs a number" >&2; exit 2; }; LIMIT="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "error: --python needs an interpreter" >&2; exit 2; }; PY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$LIMIT" in
  ''|*[!0-9]*|0) echo "error: --limit must be a positive integer, got '$LIMIT'" >&2; exit 2 ;;
esac
[ -x "$PY" ] || { echo "error: --python $PY is not an executable interpreter (run make setup, or pass --python)" >&2; exit 2; }
cd "$REPO"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$SUMMARY"; }  # check, status, detail
run() {  # run (or, with --dry-run, print) a command; its output also goes to $OUT/<name>.log
  local name="$1"; shift
  echo "[gpu_check] $name: $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "[gpu_check] $name: ok in $((SECONDS - t0)) s"
  else
    echo "[gpu_check] $name: FAILED (rc $?) after $((SECONDS - t0)) s, see $OUT/$name.log"; return 1
  fi
}

ok() { if [ "$DRY" = 1 ]; then echo "not run (dry run)"; else echo ok; fi; }
GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null || true)"
ATTN=sdpa
if [ -n "$GPU" ] && "$PY" -c 'import flash_attn' 2>/dev/null; then ATTN=flash_attention_2; fi
EXP=(experiment=smollm2_dus distributed=inprocess "paths.output_root=$OUT/runs"
     cpt.bf16=true sft.bf16=true "cpt.attn_implementation=$ATTN" "sft.attn_implementation=$ATTN")
export DUS_PROGRESS=lines HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ -z "$GPU" ]; then
  echo "[gpu_check] no CUDA GPU: running only the CPU-safe part"
  if run preflight "$PY" -m pipeline preflight=true "${EXP[@]}"; then row preflight "$(ok)" "smollm2_dus, bf16, $ATTN"
  else row preflight FAILED "$OUT/preflight.log"; fi
  row smollm2_dus_train "skipped" "no GPU (a CPU run of this experiment: make smollm2, ~30 min)"
  row leaderboard "skipped" "no GPU"
else
  echo "[gpu_check] GPU: $GPU, attention: $ATTN"
  if run smollm2_dus "$PY" -m pipeline "${EXP[@]}"; then row smollm2_dus_train "$(ok)" "$GPU, bf16, $ATTN"
  else row smollm2_dus_train FAILED "$OUT/smollm2_dus.log"; fi
  if ! "$PY" -c 'import pipeline.evaluation.__main__' 2>/dev/null; then
    row leaderboard skipped "python -m pipeline.evaluation --preset leaderboard is not in this checkout yet"
  else
    MODEL="$(ls -d "$OUT"/runs/*/0*_sft 2>/dev/null | tail -1)"
    if [ -z "$MODEL" ]; then row leaderboard skipped "no trained model (the experiment failed)"
    elif run leaderboard "$PY" -m pipeline.evaluation "$MODEL" --preset leaderboard --limit "$LIMIT" \
           --device cuda --dtype bfloat16 --batch-size auto --out "$OUT/leaderboard" --overwrite; then
      row leaderboard "$(ok)" "$OUT/leaderboard/results.md (limit $LIMIT)"
    else row leaderboard FAILED "$OUT/leaderboard.log"; fi
  fi
fi

[ "$DRY" = 1 ] && echo "[gpu_check] dry run: nothing was run"
"$PY" - "$OUT" "$SUMMARY" <<'PYEOF'
"""The summary table: each check's status, and tokens/s and MFU of each training stage (the last
training log of ThroughputCallback found in the run's trainer_state.json / manifest.json files)."""
import json, sys
from pathlib import Path

out, summary = Path(sys.argv[1]), Path(sys.argv[2])
rows = [line.rstrip("\n").split("\t") for line in summary.read_text().splitlines() if line.strip()]
print("\n| check | status | detail |\n| --- | --- | --- |")
for check, status, detail in rows:
    print(f"| {check} | {status} | {detail} |")

def last_throughput(stage_dir: Path):
    found = None
    for f in sorted(stage_dir.rglob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        logs = data.get("log_history") if isinstance(data, dict) else None
        for entry in (logs or []) + ([data.get("metrics")] if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else []):
            if isinstance(entry, dict) and "tokens_per_s_total" in entry:
                found = entry
    return found

stages = sorted(p for p in (out / "runs").glob("*/0*_*") if p.is_dir() and p.name.split("_", 1)[1] in ("cpt", "sft", "dpo"))
if stages:
    print("\n| stage | tokens/s (all devices) | tokens/s per device | MFU |\n| --- | ---: | ---: | ---: |")
    for st in stages:
        t = last_throughput(st)
        mfu = t.get("mfu") if t else None
        print(f"| {st.name} | {t['tokens_per_s_total'] if t else 'n/a'} | {t['tokens_per_s_per_device'] if t else 'n/a'} | "
              f"{f'{100 * mfu:.1f} %' if mfu is not None else 'n/a'} |")
PYEOF

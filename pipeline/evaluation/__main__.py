"""``python -m pipeline.evaluation MODEL_DIR --preset leaderboard [--tasks a,b] [--limit N]
[--shots task=N,...] [--train-files F ...] [--decontaminate] --out DIR``: score any Hugging Face
model directory on the Open LLM Leaderboard v1, offline, without a run.

DIR receives lm-eval's aggregated results (``lm_eval_results.json``), its per-sample logs
(``samples/<task>.jsonl``), and our ``results.json`` / ``results.md`` (the seed's table). It is
written as ``.DIR.partial`` and renamed when complete. A user error prints one line on stderr
and exits with code 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from pipeline.errors import ConfigError

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluation", description=(
        "Open LLM Leaderboard v1 (ARC, HellaSwag, MMLU, Winogrande, GSM8K; TruthfulQA n/a offline) on a local "
        "Hugging Face model directory, offline: lm-eval's task definitions on the real benchmark data."))
    ap.add_argument("model", help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--preset", required=True, choices=["leaderboard"], help="the task set")
    ap.add_argument("--tasks", default=None, help="comma-separated subset [arc_challenge,hellaswag,mmlu,winogrande,gsm8k]")
    ap.add_argument("--limit", type=int, default=None,
                    help="score the first N docs of each task's split (MMLU: of each subject) [all]")
    ap.add_argument("--shots", default=None, help="task=N,... overriding the v1 shot counts")
    ap.add_argument("--train-files", action="append", default=None,
                    help="training data to check for 13-gram contamination (repeatable)")
    ap.add_argument("--decontaminate", action="store_true", help="drop contaminated docs from scoring")
    ap.add_argument("--out", required=True, help="output directory (must not exist, or pass --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--batch-size", default="8", help="int, or auto on a GPU [8]")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N [cuda if available]")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 [auto]")
    ap.add_argument("--gen-kwargs", default=None, help="lm-eval generation overrides for GSM8K, e.g. max_gen_toks=64")
    return ap


def check_model_dir(model: str) -> Path:
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ConfigError("MODEL_DIR", f"{model} is not a Hugging Face model directory (no config.json)",
                          "give a directory saved by save_pretrained (config.json + *.safetensors)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError("MODEL_DIR", f"{model} holds no *.safetensors weights", "only safetensors are loaded")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.evaluation import leaderboard as lb
    from pipeline.evaluation.contamination import contaminated_docs
    from pipeline.evaluation.results import write_results
    from pipeline.fsutil import atomic_output_dir

    try:
        model_dir = check_model_dir(args.model)
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ConfigError("--out", f"{out} already exists", "choose another directory or pass --overwrite")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        plan = lb.plan_board(tasks, limit=args.limit, shots=lb.parse_shots(args.shots))
        contaminated = None
        if args.train_files:
            contaminated = contaminated_docs(lb.eval_docs(plan), args.train_files, field="--train-files")
            if args.decontaminate:
                plan.exclude = contaminated
        elif args.decontaminate:
            raise ConfigError("--decontaminate", "needs the training data to check against",
                              "pass --train-files FILE (repeatable)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    start = time.monotonic()
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        run = lb.run_board(str(model_dir), plan, out_dir=tmp, batch_size=args.batch_size, device=args.device,
                           dtype=args.dtype, gen_kwargs=args.gen_kwargs)
        info = lb.board_info(plan, run, contaminated=contaminated, decontaminate=args.decontaminate)
        info["wall_s"] = round(time.monotonic() - start, 1)
        write_results({model_dir.resolve().name: run.metrics}, tmp, leaderboard=info)
    print(f"[dus] leaderboard: {out}/results.md ({info['wall_s']} s)")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

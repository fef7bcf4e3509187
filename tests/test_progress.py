"""Progress written to a file (CI logs, a SLURM job's .out): plain lines, no carriage returns, a
bounded number of lines; a terminal keeps tqdm's bars (pipeline.log.progress)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.log import LineProgress, progress, progress_mode

REPO = Path(__file__).resolve().parent.parent


def _run_to_file(code: str, tmp_path: Path, **env) -> str:
    out = tmp_path / "job.out"
    child_env = {k: v for k, v in os.environ.items() if k != "DUS_PROGRESS"}
    child_env.update(PYTHONPATH=str(REPO), **env)
    with open(out, "wb") as f:  # stdout and stderr both to a file, as SLURM's --output does
        subprocess.run([sys.executable, "-c", textwrap.dedent(code)], stdout=f, stderr=subprocess.STDOUT,
                       env=child_env, check=True, timeout=300)
    return out.read_text()


def test_loop_written_to_a_file_is_plain_bounded_lines(tmp_path):
    text = _run_to_file("""
        from pipeline.log import progress
        bar = progress(total=10_000, desc="merge", unit="step")
        for i in range(10_000):
            bar.update(1)
            bar.set_postfix(loss=f"{5 - i / 10_000:.3f}")
        bar.close()
        for _ in progress(range(3_000), desc="eval", unit="batch"):
            pass
    """, tmp_path)
    assert "\r" not in text
    lines = text.splitlines()
    merge = [ln for ln in lines if ln.startswith("[dus] merge: ")]
    evals = [ln for ln in lines if ln.startswith("[dus] eval: ")]
    # one line per 5 % at most (and one per 30 s, none here): 20 each, the last one the end
    assert 1 <= len(merge) <= 21 and 1 <= len(evals) <= 21, lines
    assert len(lines) == len(merge) + len(evals)
    assert merge[-1].startswith("[dus] merge: step 10000/10000 (100%)") and "done in" in merge[-1], merge[-1]
    assert "loss=4.000" in merge[-1]
    assert "ETA" in merge[0] and "step/s" in merge[0]
    assert evals[-1].startswith("[dus] eval: batch 3000/3000 (100%)")


def test_time_based_line_without_progress():
    clock = [0.0]
    buf = io.StringIO()
    bar = LineProgress(total=1000, desc="x", unit="step", stream=buf, clock=lambda: clock[0])
    bar.update(1)  # 0.1 %: no line
    assert buf.getvalue() == ""
    clock[0] = 31.0
    bar.update(1)  # 30 s since the last line: a line although not 5 % more
    assert buf.getvalue().count("\n") == 1 and "step 2/1000" in buf.getvalue()
    clock[0] = 32.0
    bar.update(1)
    assert buf.getvalue().count("\n") == 1


def test_bytes_are_scaled():
    buf = io.StringIO()
    bar = LineProgress(total=4 << 30, desc="merge", unit="B", unit_scale=True, unit_divisor=1024, stream=buf,
                       clock=iter(float(i) for i in range(100)).__next__)
    bar.update(1 << 30)
    assert "1.0 GiB / 4.0 GiB (25%)" in buf.getvalue(), buf.getvalue()


def test_mode_follows_the_terminal_and_the_override(monkeypatch):
    monkeypatch.delenv("DUS_PROGRESS", raising=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode(Tty()) == "bars"
    assert progress_mode(io.StringIO()) == "lines"
    monkeypatch.setenv("DUS_PROGRESS", "bars")
    assert progress_mode(io.StringIO()) == "bars"
    monkeypatch.setenv("DUS_PROGRESS", "off")
    assert isinstance(progress(range(3)), LineProgress) and progress(range(3)).disable
    monkeypatch.setenv("DUS_PROGRESS", "lines")
    assert not progress(range(3)).disable
    assert progress(range(3), disable=True).disable


def test_trainer_written_to_a_file_uses_lines(tmp_path):
    """A real Trainer (tiny Mistral, 40 steps, a log every step): the tqdm bar is replaced."""
    text = _run_to_file(f"""
        import torch
        from transformers import MistralConfig, MistralForCausalLM, Trainer, TrainingArguments
        from pipeline.training.callbacks import use_line_progress
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8))
        data = [{{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))}} for _ in range(40)]
        args = TrainingArguments(output_dir={str(tmp_path / "o")!r}, max_steps=40, per_device_train_batch_size=1,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=False)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        use_line_progress(trainer, "cpt")
        trainer.train()
    """, tmp_path)
    assert "\r" not in text
    steps = [ln for ln in text.splitlines() if ln.startswith("[dus] cpt: step ")]
    assert 2 <= len(steps) <= 22, text
    assert steps[-1].startswith("[dus] cpt: step 40/40 (100%)") and "loss=" in steps[-1], steps[-1]
    assert any("train_runtime=" in ln for ln in text.splitlines()), text  # the summary, one line
    assert "{'loss'" not in text  # not the Trainer's per-log dict printing


def _library_bars_stderr(env_overrides: dict) -> str:
    """stderr (a pipe, not a terminal) of a process that imports the pipeline, then runs the bars
    the libraries draw themselves: tqdm as transformers' GGUF loader calls it, and datasets' map."""
    code = textwrap.dedent("""
        import pipeline
        from tqdm.auto import tqdm
        for _ in tqdm(range(50), desc="library loop"):
            pass
        import datasets
        datasets.Dataset.from_dict({"a": list(range(50))}).map(lambda row: row, desc="library map")
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DUS_PROGRESS", "TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                        "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(env_overrides)
    # bytes: text mode would turn the bars' carriage returns into newlines
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr.decode()


def test_library_bars_are_off_in_a_file_and_kept_when_asked_for():
    quiet = _library_bars_stderr({})
    assert "\r" not in quiet and "library loop" not in quiet and "library map" not in quiet, quiet[-500:]
    forced_bars = _library_bars_stderr({"DUS_PROGRESS": "bars"})
    assert "library loop" in forced_bars and "library map" in forced_bars and "\r" in forced_bars

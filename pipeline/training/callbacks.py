"""Trainer callbacks and helpers every training stage adds: data fingerprints per rank, throughput
and MFU in the logs, and SIGTERM -> checkpoint on every rank at the same step.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from pipeline.log import LineProgress, progress_mode

# Dense bf16 peak FLOP/s per device, for MFU. Source: vendor datasheets (SXM parts, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def device_peak_flops() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "cpu (no published peak: MFU not reported)"
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"{name}: unknown peak (MFU not reported)"


def training_flops_per_token(config, n_params: int, seq_len: int) -> float:
    """6·N per token for the matmuls (forward + backward) plus causal attention scores:
    12 · layers · hidden · seq_len / 2 (PaLM appendix B, halved for the causal mask)."""
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6 * n_params + 6 * layers * hidden * seq_len


def token_fingerprint(token_ids) -> str:
    return hashlib.sha1(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()[:16]


def example_input_ids(example) -> list[int]:
    ids = example["input_ids"]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class RecordingCollator:
    """Wraps a data collator and remembers a fingerprint of every example this rank trained on
    (the first ones), to prove that ranks are distinct and see different data. ``token_ids`` says
    which of an example's token ids identify it (its input ids by default)."""

    def __init__(self, collate, keep_first: int = 64, token_ids=example_input_ids):
        self.collate, self.keep_first, self.token_ids = collate, keep_first, token_ids
        self.served: list[str] = []

    def __call__(self, examples):
        for ex in examples:
            if len(self.served) < self.keep_first:
                self.served.append(token_fingerprint(self.token_ids(ex)))
        return self.collate(examples)


def batch_token_counts(batch, pad_token_id: int | None = None) -> tuple[int, int]:
    """(input tokens that are not padding, tokens that carry a loss) of one collated micro-batch.

    Input: the attention mask's ones; without one, every id of a packed batch (``position_ids``: no
    padding), else every input id that is not the pad id. Loss-bearing: a preference batch's ``completion_mask`` (the chosen and rejected
    replies DPO scores); else the labels other than -100 after the causal shift (``shift_labels`` as
    given, or ``labels[..., 1:]``): the tokens the loss is averaged over."""
    ids = batch["input_ids"]
    if batch.get("attention_mask") is not None:
        inputs = int(batch["attention_mask"].sum())
    elif batch.get("position_ids") is not None:
        # Packed blocks (position_ids restart per document) hold no padding: every id is a token,
        # the end-of-document id too, which is also the pad id of tokenizers with pad = eos (SmolLM2).
        inputs = int(ids.numel())
    elif pad_token_id is not None:
        inputs = int((ids != pad_token_id).sum())
    else:
        inputs = int(ids.numel())
    if batch.get("completion_mask") is not None:
        trained = int(batch["completion_mask"].sum())
    elif batch.get("shift_labels") is not None:
        trained = int((batch["shift_labels"] != -100).sum())
    elif batch.get("labels") is not None:
        trained = int((batch["labels"][..., 1:] != -100).sum())
    else:
        trained = 0
    return inputs, trained


CONSUMED_TOKENS_FILE = "consumed_tokens.json"


class ConsumedTokens(TrainerCallback):
    """The tokens training actually consumed: counted on the micro-batches the training loop takes
    (``Trainer.get_batch_samples``; a batch the data loader prefetched but no step used is not
    counted), not batch size × max length × steps. Per rank; ``totals()`` sums over the ranks.

    Kept in each checkpoint (``consumed_tokens.json``) and read back on resume, so a resumed run's
    counts cover every step; a checkpoint without that file (written before it was kept) leaves the
    earlier steps uncounted, and ``counted_from_step`` says from which step the counts run."""

    def __init__(self, trainer, *, pad_token_id: int | None = None, resumed_from: str | None = None):
        self.input_tokens = self.trained_tokens = 0
        self.counted_from_step = 0
        self.pad_token_id = pad_token_id
        if resumed_from is not None:
            saved = Path(resumed_from) / CONSUMED_TOKENS_FILE
            if saved.is_file():
                record = json.loads(saved.read_text())
                self.carried = (int(record["input_tokens"]), int(record["trained_tokens"]))
                self.counted_from_step = int(record.get("counted_from_step", 0))
            else:
                self.carried = (0, 0)
                self.counted_from_step = int(Path(resumed_from).name.rsplit("-", 1)[-1])
        else:
            self.carried = (0, 0)
        take = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator, num_batches, device):
            batches, num_items = take(epoch_iterator, num_batches, device)
            for batch in batches:
                inputs, trained = batch_token_counts(batch, self.pad_token_id)
                self.input_tokens += inputs
                self.trained_tokens += trained
            return batches, num_items

        trainer.get_batch_samples = get_batch_samples

    def totals(self) -> dict[str, int]:
        """Over all ranks (a collective: every rank calls it), plus what a resumed checkpoint carried."""
        counts = torch.tensor([self.input_tokens, self.trained_tokens], dtype=torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                counts = counts.cuda()
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        inputs, trained = (int(v) for v in counts.tolist())
        return {"input_tokens": inputs + self.carried[0], "trained_tokens": trained + self.carried[1],
                "counted_from_step": self.counted_from_step}

    def on_save(self, args, state, control, **kw):
        totals = self.totals()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / CONSUMED_TOKENS_FILE).write_text(json.dumps(totals))


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s per device and MFU to the Trainer's logs, from the tokens this rank's training
    loop really consumed (``ConsumedTokens``: padding not counted, a DPO pair's two replies are)."""

    def __init__(self, *, consumed: ConsumedTokens, flops_per_token: float, world_size: int):
        self.consumed, self.flops_per_token, self.world_size = consumed, flops_per_token, world_size
        self.peak, self.peak_note = device_peak_flops()
        self.t0, self.step0, self.tokens0 = None, 0, 0

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.step0, self.tokens0 = time.perf_counter(), state.global_step, self.consumed.input_tokens

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or state.global_step <= self.step0:
            return
        now = time.perf_counter()
        per_device = self.consumed.input_tokens - self.tokens0
        tok_s = per_device / (now - self.t0)
        extra = {"tokens_per_s_per_device": round(tok_s, 1), "tokens_per_s_total": round(tok_s * self.world_size, 1)}
        if self.peak:
            extra["mfu"] = round(tok_s * self.flops_per_token / self.peak, 4)
        logs.update(extra)  # printed / sent to report_to
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer stored a copy before the callbacks ran
        self.t0, self.step0, self.tokens0 = now, state.global_step, self.consumed.input_tokens


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (SLURM's warning before preemption) save a checkpoint and stop.

    The signal may reach only some ranks, and a ZeRO checkpoint is a collective save, so the
    ranks agree after every step through an all-reduce of the flag: all of them stop at the same
    step. The stage then exits non-zero without exporting; re-running resumes from that checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested = True

    def on_step_end(self, args, state, control, **kw):
        flag = torch.tensor([int(self.requested)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class FileProgressCallback(TrainerCallback):
    """The Trainer's progress as plain lines (``pipeline.log.LineProgress``: each 5 % or 30 s, with
    the step, rate, ETA and the last logged loss, tokens/s and MFU) instead of tqdm's
    carriage-return bar, for output that is not a terminal. Evaluation results and the final
    summary are one line each. Rank 0 only, as the Trainer's own bar."""

    SHOWN = ("loss", "grad_norm", "learning_rate", "tokens_per_s_total", "mfu")

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar: LineProgress | None = None
        self.shown: dict = {}

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.bar = LineProgress(total=state.max_steps, desc=self.desc, unit="step", initial=state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is None or not logs:
            return
        if "loss" in logs:  # a training log: shown with the next progress line
            self.shown = {k: logs[k] for k in self.SHOWN if k in logs}
            self.bar.set_postfix({k: _short(v) for k, v in self.shown.items()})
        else:  # evaluation results, or the end-of-training summary: rare, one line each
            self.bar.write(f"at step {state.global_step}: " + ", ".join(f"{k}={_short(v)}" for k, v in logs.items()))

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def use_line_progress(trainer, desc: str) -> None:
    """Replace the Trainer's tqdm bar by ``FileProgressCallback`` when stderr is not a terminal
    (or ``DUS_PROGRESS=lines``); drop it with ``DUS_PROGRESS=off``; keep it on a terminal."""
    mode = progress_mode()
    if mode == "bars":
        return
    trainer.remove_callback(ProgressCallback)
    if mode == "lines":
        trainer.add_callback(FileProgressCallback(desc))


class EvaluateAtLastStep(TrainerCallback):
    """With step-wise evaluation on, evaluate once more after the last optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps and args.eval_strategy != "no":
            control.should_evaluate = True
        return control


def heldout_curve(log_history: list[dict]) -> list[dict]:
    """The Trainer's eval entries as (step, tokens actually seen, held-out loss): the tokens are the
    non-padding input tokens of every rank up to that step (``include_num_input_tokens_seen``)."""
    curve = {}
    for entry in log_history:
        if "eval_loss" in entry:
            curve[entry["step"]] = {"step": entry["step"], "tokens_seen": entry.get("num_input_tokens_seen"),
                                    "heldout_loss": entry["eval_loss"]}
    return [curve[s] for s in sorted(curve)]

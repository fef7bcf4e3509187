"""The verified hand-off: a trained model is exported only if a fresh process that reloads it
computes the same loss on a fixed batch as the trained (possibly ZeRO-3-sharded) model did.

``python -m pipeline.training.verify MODEL_DIR BATCH.json`` reloads a saved model and prints its
loss on the batch (JSON on stdout); the training runner starts it after saving.
With ``--merge-adapter-onto BASE`` the directory holds a LoRA adapter: it is merged into BASE
and the merged weights are saved into MODEL_DIR before the loss is computed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.errors import StageFailed
from pipeline.training.distributed import clean_child_env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("batch_file")
    ap.add_argument("--bf16", dest="bf16", action="store_true")
    ap.add_argument("--fp32", dest="bf16", action="store_false")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--merge-adapter-onto", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model_dir = Path(args.model_dir)
    if args.merge_adapter_onto:
        from peft import PeftModel

        adapter_dir = model_dir / "adapter"
        base = AutoModelForCausalLM.from_pretrained(args.merge_adapter_onto, dtype=dtype, attn_implementation=args.attn)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(model_dir, safe_serialization=True)
        shutil.rmtree(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=args.attn, use_safetensors=True)
    batch = json.loads(Path(args.batch_file).read_text())
    print(json.dumps({"loss": fixed_batch_loss(model, batch)}))



# Relative tolerance when the reloaded model's fixed-batch loss is compared with the trained one.
VERIFY_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


@torch.no_grad()
def fixed_batch_loss(model, batch: dict[str, list[list[int]]]) -> float:
    """Loss of one fixed batch. Called on every rank at once under ZeRO-3 (parameters are gathered
    collectively during forward)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tensors = {k: torch.tensor(v, device=device) for k, v in batch.items()}
    loss = model(**tensors, use_cache=False).loss.float().item()
    model.train(was_training)
    return loss


def predicted_tokens(batch: dict[str, list[list[int]]]) -> int:
    """Labels a causal LM is scored on in ``batch``: those != -100 past each row's first position
    (the model shifts labels by one, so a label at position 0 is never predicted)."""
    labels = batch.get("labels")
    if labels is None:  # the model's loss then scores every next token
        return sum(max(len(row) - 1, 0) for row in batch["input_ids"])
    return sum(1 for row in labels for label in row[1:] if label != -100)


def check_fixed_batch_loss(batch: dict[str, list[list[int]]], *, trained_loss: float) -> None:
    """Before comparing with a reload: a fixed batch with nothing to score, or a trained model whose
    loss is not finite, is reported as what it is (a reload cannot match a NaN, and calling that a
    partial ZeRO-3 save would send the user to the wrong fix)."""
    if predicted_tokens(batch) == 0:
        raise StageFailed(
            "the fixed verification batch has no trained token (every label is -100 after the shift), so its loss "
            "is NaN and the export cannot be verified: the data or the assistant masks leave nothing to train "
            "within the max length (raise max_length, or check the masks with python -m pipeline.data.chat_masking)")
    if not math.isfinite(trained_loss):
        raise StageFailed(
            f"training ended with a non-finite loss on the fixed batch ({trained_loss}): the model diverged "
            "(lower the learning rate, check the data for broken examples, or train in fp32/bf16 rather than "
            "fp16); the saved files are not a verified export")


def loss_in_fresh_process(model_dir: Path, batch_file: Path, *, bf16: bool, attn: str,
                          merge_adapter_onto: str | None = None) -> float:
    """The fixed-batch loss of the model saved in ``model_dir``, loaded by a new process."""
    cmd = [sys.executable, "-m", "pipeline.training.verify", str(model_dir), str(batch_file),
           "--bf16" if bf16 else "--fp32", "--attn", attn]
    if merge_adapter_onto:
        cmd += ["--merge-adapter-onto", merge_adapter_onto]
    proc = subprocess.run(cmd, env=clean_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"verification of {model_dir} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["loss"]


def verify_in_fresh_process(model_dir: Path, batch_file: Path, *, expected_loss: float, bf16: bool,
                            attn: str, merge_adapter_onto: str | None = None) -> dict:
    """Reload the saved model in a new process (no ZeRO state, no shared memory with training)
    and compare its fixed-batch loss with the trained model's (after ``check_fixed_batch_loss``)."""
    check_fixed_batch_loss(json.loads(Path(batch_file).read_text()), trained_loss=expected_loss)
    reloaded = loss_in_fresh_process(model_dir, batch_file, bf16=bf16, attn=attn, merge_adapter_onto=merge_adapter_onto)
    rtol = VERIFY_RTOL["bf16" if bf16 else "fp32"]
    diff = abs(reloaded - expected_loss)
    result = {"trained_fixed_batch_loss": expected_loss, "reloaded_fixed_batch_loss": reloaded,
              "abs_diff": diff, "rtol": rtol}
    if not math.isfinite(reloaded) or diff > rtol * max(abs(expected_loss), 1e-6):
        raise StageFailed(
            f"the saved model in {model_dir} does not reproduce the trained model: fixed-batch loss "
            f"{reloaded:.6f} after reload vs {expected_loss:.6f} in training (|diff| {diff:.2e} > "
            f"rtol {rtol}). With ZeRO-3 this is the known partial-save failure: keep "
            f"stage3_gather_16bit_weights_on_model_save=true in the DeepSpeed config."
        )
    return result



def padded_batch(tokenizer, rows: list[tuple[list[int], list[int]]]) -> dict[str, list[list[int]]]:
    """input_ids/attention_mask/labels of (ids, labels) rows, right-padded to the longest."""
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": [ids + [pad] * (width - len(ids)) for ids, _ in rows],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
        "labels": [lab + [-100] * (width - len(lab)) for _, lab in rows],
    }


if __name__ == "__main__":
    main()

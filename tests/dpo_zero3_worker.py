"""One rank of the 2-process DPO test (tests/test_dpo.py), started by ``accelerate launch --use_deepspeed``.

Usage: worker.py MODEL_DIR PAIRS_JSONL OUT_DIR DEEPSPEED_JSON [--lora] [--precompute]
Writes OUT_DIR/rank_<r>.json (rank, world size, fingerprints of the pairs this rank trained on);
rank 0 also saves the model into OUT_DIR/model and writes OUT_DIR/fixed_batch.json with the
in-memory model's loss on a fixed batch, for the reload check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    model_dir, pairs_file, out_dir, ds_file = sys.argv[1:5]
    flags = set(sys.argv[5:])
    out = Path(out_dir)
    torch.set_num_threads(1)
    # The accelerate + DeepSpeed on CPU trap (STACK-NOTES, pipeline/distributed.py): without a GPU,
    # accelerate's state would believe every rank is rank 0 of 1. Create it on gloo first and let
    # the Trainer use it.
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")

    from transformers import AutoTokenizer

    from pipeline.data.preference import load_preferences
    from pipeline.training.dpo import (DPOSettings, RecordingPreferenceCollator, build_dpo_trainer,
                                       preference_fixed_batch, write_rank_record)

    pairs = load_preferences([pairs_file])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = DPOSettings(beta=0.1, max_length=96, use_lora="--lora" in flags, lora_r=4, lora_alpha=8,
                           precompute_ref_log_probs="--precompute" in flags)
    trainer, collator, stats = build_dpo_trainer(
        model_dir=model_dir, tokenizer=tokenizer, train_pairs=pairs, settings=settings, bf16=False,
        shared_dataset_dir=out / "datasets",
        trainer_args=dict(output_dir=str(out / "ck"), use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                          gradient_accumulation_steps=1, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                          seed=0, data_seed=0, deepspeed=json.loads(Path(ds_file).read_text()),
                          accelerator_config={"use_configured_state": True}),
    )
    trainer.train()
    served = collator.served[: trainer.state.global_step * 2]  # accelerate prefetches one batch ahead
    write_rank_record(out / f"rank_{state.process_index}.json", rank=state.process_index,
                      world_size=state.num_processes, served=served)
    target = out / ("adapter" if settings.use_lora else "model")
    trainer.save_model(str(target))  # collective under ZeRO-3 (weights gathered on rank 0)
    batch = preference_fixed_batch(tokenizer, pairs[:4], max_length=96)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = model(**{k: torch.tensor(v) for k, v in batch.items()}, use_cache=False).loss.item()
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "fixed_batch.json").write_text(json.dumps({"batch": batch, "loss": loss, "stats": stats,
                                                          "log_history": trainer.state.log_history}))


if __name__ == "__main__":
    main()

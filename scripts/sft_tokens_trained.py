"""How many tokens an sft configuration really trains on, without training the real model.

    python scripts/sft_tokens_trained.py experiment=smollm2_dus

The tokens sft consumes depend on the data, the tokenizer, the chat template, the batch settings and
the seed, not on the weights. This composes the run's configuration, builds the sft stage's own
trainer (``pipeline.stages.sft.build_sft_trainer``: same split, masks, collator and sampler) on a
stand-in: a 1-layer random model of the same architecture family with the run's real tokenizer, trains
it for the configured steps with ``pipeline.training.callbacks.ConsumedTokens`` attached, and prints
the counts the stage's manifest records (``tokens_seen``, ``trained_tokens``) next to the split-wide
count (``data_assistant_tokens_in_train_split``). Only for runs made before the stage recorded them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.configio import to_typed


def run_tokenizer(cfg: PipelineConfig):
    """The tokenizer the run's sft sees: the GGUF's, the local directory's, or the demo base's."""
    from transformers import AutoTokenizer

    if cfg.model.gguf_file is not None:
        from pipeline.models.gguf import resolve_package_file

        gguf = resolve_package_file(cfg.model.gguf_file)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(cfg.model.name_or_path)


def main(overrides: list[str]) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from pipeline.stages.sft import build_sft_trainer
    from pipeline.training.callbacks import ConsumedTokens

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(REPO_ROOT / "conf"),
                                                                     version_base="1.3"):
        cfg = to_typed(compose("config", overrides=[*overrides, f"paths.run_dir={tmp}/run", "run_name=count"]))
        tokenizer = run_tokenizer(cfg)
        stand_in = Path(tmp) / "stand-in"
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=max(2048, cfg.sft.max_length or 0),
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        AutoModelForCausalLM.from_config(config).save_pretrained(stand_in)
        tokenizer.save_pretrained(stand_in)
        assert AutoConfig.from_pretrained(stand_in).num_hidden_layers == 1
        cfg.sft.bf16 = False
        cfg.sft.use_lora = False
        setup = build_sft_trainer(cfg, tokenizer=tokenizer, input_model=str(stand_in),
                                  checkpoint_dir=Path(tmp) / "checkpoints", ds_config=None, bf16=False, attn="sdpa")
        consumed = ConsumedTokens(setup.trainer, pad_token_id=tokenizer.pad_token_id)
        setup.trainer.add_callback(consumed)
        setup.trainer.args.save_strategy = "no"
        setup.trainer.train()
        totals = consumed.totals()
        return {"overrides": overrides, "steps": setup.trainer.state.global_step,
                "train_conversations": setup.data_stats["train_examples"],
                "tokens_seen": totals["input_tokens"], "trained_tokens": totals["trained_tokens"],
                "assistant_tokens_in_train_split": setup.data_stats.get("assistant_tokens_in_train_split")}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))

"""Training-stage pieces that run without a launcher: what trains, precision/attention choice."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from pipeline.errors import ConfigError
from pipeline.training.model import (
    attn_implementation, cpu_supports_bf16, freeze_except, layers_added_by_merge, use_bf16, weights_dtype,
)


def tiny_model():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                            num_attention_heads=2, num_key_value_heads=1, sliding_window=None))


def test_everything_trains_by_default():
    model = tiny_model()
    assert freeze_except(model, layers=None, patterns=[]) == sum(p.numel() for p in model.parameters())


def test_only_selected_layers_and_patterns_train_and_frozen_weights_do_not_move():
    model = tiny_model()
    n = freeze_except(model, layers=[1, 2], patterns=[r"^lm_head"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in t or ".layers.2." in t or t.startswith("lm_head") for t in trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])


def test_a_selection_of_nothing_is_refused():
    with pytest.raises(ConfigError, match="cpt.trainable_layers"):
        freeze_except(tiny_model(), layers=[99], patterns=[])


def test_layers_added_by_a_passthrough_merge_are_the_repeated_copies():
    # [0, 6) + [2, 8) of one model: layers 2..5 appear twice; their second copies are 6..9.
    layer_map = [["m", i] for i in range(0, 6)] + [["m", i] for i in range(2, 8)]
    assert layers_added_by_merge({"layer_map": layer_map}) == [6, 7, 8, 9]
    assert layers_added_by_merge({"layer_map": layer_map, "new_layers": [4, 9]}) == [4, 9]


def test_precision_and_attention_are_chosen_for_the_machine():
    if not torch.cuda.is_available():
        assert use_bf16(None) is False and attn_implementation(None) == "sdpa"
        with pytest.raises(ConfigError, match="without DeepSpeed"):
            use_bf16(True, deepspeed=True)
        if cpu_supports_bf16():
            assert use_bf16(True, deepspeed=False) is True
            assert weights_dtype(True) == torch.float32  # autocast over fp32 weights on a CPU
    assert attn_implementation("eager") == "eager"


@pytest.mark.skipif(torch.cuda.is_available() or not cpu_supports_bf16(), reason="CPU bf16 autocast path")
def test_cpu_bf16_autocast_cpt_trains_and_its_export_verifies(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """cpt.bf16=true without DeepSpeed on a bf16-capable CPU: the Trainer trains under bf16 autocast
    (fp32 weights), the manifest says bf16, and the export reloads with the trained loss."""
    from pipeline.config import (
        CPTConfig, DataConfig, DistributedConfig, InputSlice, MergeConfig, ModelConfig, OutputSlice, PathsConfig,
        PipelineConfig,
    )
    from pipeline.driver import run_stage
    from pipeline.stages import get_stage

    out = tmp_path / "out"
    cfg = PipelineConfig(
        model=ModelConfig(name_or_path=str(tiny_base_model_dir)),
        merge=MergeConfig(slices=[OutputSlice(sources=[InputSlice(layer_range=[0, 4])])]),
        data=DataConfig(cpt_files=[str(tiny_data_dir / "corpus.txt")]),
        cpt=CPTConfig(seq_len=64, per_device_train_batch_size=2, max_steps=2, save_steps=100, bf16=True),
        distributed=DistributedConfig(launcher="inprocess", zero_stage=0),
        paths=PathsConfig(run_dir=str(out / "run"), cache_dir=str(tmp_path / "cache"), output_root=str(out)),
    )
    for name in ("base", "merge"):
        run_stage(get_stage(name), cfg)
    manifest = run_stage(get_stage("cpt"), cfg)
    assert manifest.metrics["precision"] == "bf16"
    v = manifest.metrics["verification"]
    # The trained model is compared in fp32, without the autocast wrapper, with the fp32 weights it saved.
    assert v["rtol"] == 1e-4 and v["abs_diff"] <= 1e-6 * v["trained_fixed_batch_loss"]
    import json

    history = json.loads((out / "run" / "02_cpt" / "logs" / "log_history.json").read_text())
    assert any("loss" in row for row in history)


def test_sft_trains_on_assistant_tokens_only(tmp_path, tiny_base_model_dir, tiny_data_dir):
    """The labels TRL's SFTTrainer actually trains on (our stage's trainer, one batch from its
    collator) are exactly each assistant reply plus its end-of-turn token, on real token ids."""
    from transformers import AutoTokenizer

    from pipeline.config import DataConfig, PathsConfig, PipelineConfig, SFTConfig
    from pipeline.data import load_conversations
    from pipeline.stages.sft import build_sft_trainer

    cfg = PipelineConfig(data=DataConfig(sft_files=[str(tiny_data_dir / "instructions.jsonl")], heldout_fraction=0.0),
                         sft=SFTConfig(max_length=128, per_device_train_batch_size=4, max_steps=1),
                         paths=PathsConfig(run_dir=str(tmp_path)))
    cfg.model.name_or_path = str(tiny_base_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    setup = build_sft_trainer(cfg, tokenizer=tok, input_model=str(tiny_base_model_dir),
                                              checkpoint_dir=tmp_path / "ck", ds_config=None, bf16=False, attn="sdpa")
    trainer, collator = setup.trainer, setup.collator
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = collator(rows)
    conversations = load_conversations(cfg.data.sft_files)
    by_prompt = {}
    for conv in conversations:
        by_prompt.setdefault(conv[0]["content"], conv)
    checked = 0
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        assert trained, "no token is trained"
        text = tok.decode(ids, skip_special_tokens=True)
        conv = next(c for p, c in by_prompt.items() if text.startswith(p))
        expected = tok(conv[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # Turns are separated by special tokens only, so the reply's tokens appear unchanged in the
        # conversation; truncation at max_length can only cut the end.
        truncated = sum(1 for t in ids if t != tok.pad_token_id) >= cfg.sft.max_length
        assert trained == (expected[: len(trained)] if truncated else expected)
        checked += 1
    assert checked == 4

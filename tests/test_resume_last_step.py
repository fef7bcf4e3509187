"""Issue 18 item 4: a checkpoint saved at max_steps is exported as it is, not trained one step further."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file


def test_resume_from_a_checkpoint_at_max_steps_exports_it_without_training(tmp_path, tiny_base_model_dir, tiny_data_dir):
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
        cpt=CPTConfig(seq_len=64, per_device_train_batch_size=2, max_steps=2, save_steps=2, save_total_limit=2),
        distributed=DistributedConfig(launcher="inprocess", zero_stage=0),
        paths=PathsConfig(run_dir=str(out / "run"), cache_dir=str(tmp_path / "cache"), output_root=str(out)),
    )
    for name in ("base", "merge"):
        run_stage(get_stage(name), cfg)
    first = run_stage(get_stage("cpt"), cfg)
    assert first.metrics["global_step"] == 2
    export = out / "run" / "02_cpt"
    shutil.rmtree(export)  # e.g. an export that failed its check: the final checkpoint is all that is left
    checkpoint = next((out / "run" / "checkpoints" / "cpt").glob("*/checkpoint-2"))
    second = run_stage(get_stage("cpt"), cfg)
    m = second.metrics
    assert m["global_step"] == 2 and m["resume"]["at_last_step"] and m["resumed_from"] == str(checkpoint)
    assert m["tokens_seen"] == first.metrics["tokens_seen"]  # the steps trained, none more
    assert not list((out / "run" / "checkpoints" / "cpt").glob("*/checkpoint-3"))
    saved, exported = load_file(checkpoint / "model.safetensors"), load_file(export / "model.safetensors")
    assert saved.keys() == exported.keys() and all((saved[k] == exported[k]).all() for k in saved)
    assert m["verification"]["abs_diff"] == 0.0

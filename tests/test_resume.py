"""Resume after a crash, through the real entry point (`python -m pipeline`) on 2 processes with
DeepSpeed ZeRO-3 over gloo (docs/resume.md).

One uninterrupted cpt run is the reference. A second run with the same config loses one rank to
SIGKILL while checkpoint-4 is being saved (after checkpoint-2 is complete); the same command again
must resume from checkpoint-2 - not from the half-written checkpoint-4 - and end with exactly the
reference's fixed-batch loss. A copy of the killed run is re-run on ONE process: it must resume
through a DeepSpeed universal checkpoint and end within float rounding of the reference.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.training.resume import CHECKPOINT_INFO, KILL_ENV, complete_checkpoints
from tests.test_pipeline import run_cli, tiny_overrides

pytestmark = pytest.mark.slow

# 6 steps, a checkpoint every 2, the last 2 kept: checkpoints 2, 4, 6 are written, 4 and 6 stay.
STAGE_ARGS = ["cpt.max_steps=6", "cpt.save_steps=2", "cpt.save_total_limit=2", "cpt.gradient_accumulation_steps=1",
              "sft.enabled=false", "eval.enabled=false"]
STEP_SAMPLES = 4  # cpt.per_device_train_batch_size in tiny_overrides: samples per rank per step


def manifest_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "02_cpt" / "manifest.json").read_text())["metrics"]


def fixed_batch_loss(run_dir: Path) -> float:
    return manifest_metrics(run_dir)["verification"]["trained_fixed_batch_loss"]


def served(run_dir: Path, rank: int) -> list[str]:
    """Fingerprints of the examples a rank trained on, in order (RecordingCollator)."""
    return json.loads((run_dir / "02_cpt" / "logs" / f"rank_{rank}.json").read_text())["served_indices"]


def checkpoint_state(run_dir: Path) -> dict[str, bool]:
    """checkpoint-N -> complete (our mark present)."""
    return {p.name: (p / CHECKPOINT_INFO).is_file() for p in (run_dir / "checkpoints" / "cpt").glob("*/checkpoint-*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("resume")
    base = [*tiny_overrides(tiny_data_dir, out), *STAGE_ARGS]  # one cache dir: base and merge are built once
    r = {"out": out, "args": base}
    r["whole"] = run_cli([*base, "run_name=whole"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KILL_ENV, "1:4:save")  # rank 1 SIGKILLs itself inside the save of checkpoint-4
        r["killed"] = run_cli([*base, "run_name=killed"], check=False)
    r["after_kill"] = checkpoint_state(out / "killed")
    r["exported_after_kill"] = (out / "killed" / "02_cpt").exists()
    # The resume target; save_total_limit=2 rotates it away once checkpoints 4 and 6 exist again.
    r["ckpt2"] = next((out / "killed" / "checkpoints" / "cpt").glob("*/checkpoint-2"))
    # The same interrupted state, to be resumed on one process below.
    shutil.copytree(out / "killed", out / "killed_1proc", symlinks=True)
    r["resumed"] = run_cli([*base, "run_name=killed"])
    r["resumed_1proc"] = run_cli([*base, "run_name=killed_1proc", "distributed.num_processes=1"])
    return r


def test_kill_9_of_one_rank_fails_the_stage_and_exports_nothing(runs):
    killed, out = runs["killed"], runs["out"]
    log = killed.stdout + killed.stderr
    assert killed.returncode != 0, log[-3000:]
    assert "SIGKILL during the save" in log and "exitcode  : -9" in log  # a real SIGKILL, seen by the launcher
    ckpt2 = runs["ckpt2"]
    assert "stage 'cpt' failed" in log and f"re-run the same command to resume from its last complete checkpoint {ckpt2}" in log
    assert not runs["exported_after_kill"]
    # checkpoint-4 has every file the Trainer writes, trainer_state.json included, but no mark.
    assert runs["after_kill"] == {"checkpoint-2": True, "checkpoint-4": False}


def test_rerun_resumes_from_the_last_complete_checkpoint_with_the_same_data_and_loss(runs):
    out, resumed = runs["out"], runs["resumed"]
    assert "checkpoint-4: incomplete" in resumed.stdout
    ckpt2 = runs["ckpt2"]
    assert f"resuming from {ckpt2}" in resumed.stdout
    m = manifest_metrics(out / "killed")
    assert m["global_step"] == 6 and m["resume"]["method"] == "same world size"
    assert m["resumed_from"] == str(ckpt2)
    # Steps 3..6 of each rank saw the same examples in the same order as the uninterrupted run.
    for rank in (0, 1):
        assert served(out / "killed", rank)[:4 * STEP_SAMPLES] == served(out / "whole", rank)[2 * STEP_SAMPLES:6 * STEP_SAMPLES]
    # Same RNG, data order, optimizer and LR state: the same final weights.
    assert fixed_batch_loss(out / "killed") == pytest.approx(fixed_batch_loss(out / "whole"), rel=1e-6, abs=0)


def test_checkpoints_keep_the_last_k_and_stay_apart_from_the_export(runs):
    whole = runs["out"] / "whole"
    state = checkpoint_state(whole)
    assert state == {"checkpoint-4": True, "checkpoint-6": True}, state
    assert [step for step, _, info in complete_checkpoints(next((whole / "checkpoints" / "cpt").iterdir()))] == [4, 6]
    info = json.loads(next((whole / "checkpoints" / "cpt").glob(f"*/checkpoint-6/{CHECKPOINT_INFO}")).read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    export = {p.name for p in (whole / "02_cpt").iterdir()}
    assert "model.safetensors" in export
    assert not [n for n in export if n.startswith(("global_step", "rng_state", "trainer_state", "scheduler", "latest"))]


def test_rerun_on_one_process_resumes_through_a_universal_checkpoint(runs):
    out, resumed = runs["out"], runs["resumed_1proc"]
    assert ("checkpoint-2 was written by 2 processes, this run has 1: converting it to a DeepSpeed universal "
            "checkpoint") in resumed.stdout
    m = manifest_metrics(out / "killed_1proc")
    assert m["world_size"] == 1 and m["global_step"] == 6
    assert m["resume"]["method"] == "universal checkpoint (world size changed)"
    assert m["resume"]["written_by_world_size"] == 2 and m["resume"]["gradient_accumulation_steps"] == 2
    # Same global batch, so each remaining step saw the two ranks' examples of that step.
    whole0, whole1 = served(out / "whole", 0), served(out / "whole", 1)
    expected = []
    for step in range(2, 6):
        expected += whole0[step * STEP_SAMPLES:(step + 1) * STEP_SAMPLES] + whole1[step * STEP_SAMPLES:(step + 1) * STEP_SAMPLES]
    assert served(out / "killed_1proc", 0)[:len(expected)] == expected
    # Weights, Adam moments and LR schedule carried over; only the summation order differs
    # (2 micro-batches accumulated vs an all-reduce over 2 ranks). Measured: 3.5e-5 relative.
    assert fixed_batch_loss(out / "killed_1proc") == pytest.approx(fixed_batch_loss(out / "whole"), rel=1e-4)
    # Later checkpoints are ordinary ones of the new world size.
    info = json.loads(next((out / "killed_1proc" / "checkpoints" / "cpt").glob(f"*/checkpoint-6/{CHECKPOINT_INFO}")).read_text())
    assert info["world_size"] == 1 and info["gradient_accumulation_steps"] == 2

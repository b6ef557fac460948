"""optpo_jax/train/checkpoints.py: checksums, corrupt, mismatched and missing steps, failed saves."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from optpo_jax.train import checkpoints as checkpoints_module
from optpo_jax.train.checkpoints import Checkpointer, CheckpointError
from optpo_jax.train.loop import train
from tests.run_configs import tiny_config


def _save_two_steps(directory: Path, second_state: dict) -> Checkpointer:
    checkpointer = Checkpointer(directory)
    good = {"params": {"w": jnp.arange(6.0)}, "opt_state": {"m": jnp.ones(3)}}
    checkpointer.save(1, good, {"step": 1})
    checkpointer.save(2, second_state, {"step": 2})
    checkpointer.wait()
    return checkpointer


def test_changed_bytes_are_caught_and_the_previous_good_step_offered(tmp_path, monkeypatch):
    state = {"params": {"w": jnp.arange(6.0)}, "opt_state": {"m": jnp.ones(3)}}
    real = checkpoints_module.tree_checksums
    calls = []

    def checksums_of_other_bytes(tree):  # as if the files changed after the save wrote them
        calls.append(1)
        sums = real(tree)
        return {name: value + (len(calls) == 2) for name, value in sums.items()}

    monkeypatch.setattr(checkpoints_module, "tree_checksums", checksums_of_other_bytes)
    checkpointer = _save_two_steps(tmp_path / "checkpoints", state)
    monkeypatch.setattr(checkpoints_module, "tree_checksums", real)
    with pytest.raises(CheckpointError, match=r"step 2 .* corrupt .*differ from their checksums.*--resume_step=1"):
        checkpointer.restore(state)
    _, totals, _ = checkpointer.restore(state, step=1)
    assert totals == {"step": 1}


def test_non_finite_and_flipped_checkpoints_are_refused(tmp_path):
    state = {"params": {"w": jnp.array([0.0, jnp.nan, 1, 2, 3, 4])}, "opt_state": {"m": jnp.ones(3)}}
    checkpointer = _save_two_steps(tmp_path / "nan", state)
    with pytest.raises(CheckpointError, match="non-finite values"):
        checkpointer.restore(state)
    good = {"params": {"w": jnp.arange(6.0)}, "opt_state": {"m": jnp.ones(3)}}
    checkpointer = _save_two_steps(tmp_path / "flipped", good)
    files = [path for path in (tmp_path / "flipped" / "2").rglob("*") if path.is_file() and path.stat().st_size]
    largest = max(files, key=lambda path: path.stat().st_size)
    data = bytearray(largest.read_bytes())
    for offset in range(len(data) // 3, len(data), 7):
        data[offset] ^= 0x5A
    largest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step 2 .*corrupt.*--resume_step=1"):
        checkpointer.restore(good)


def test_a_checkpoint_of_another_layout_is_a_mismatch_and_a_missing_step_is_missing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    saved = {"params": {"a": jnp.ones((2, 3)), "b": jnp.zeros(4, jnp.bfloat16)}, "opt_state": (jnp.zeros(()),)}
    checkpointer.save(1, saved, {"step": 1})
    checkpointer.wait()
    other = {"params": {"a": jnp.ones((2, 3)), "b": jnp.zeros(4, jnp.float32)}, "opt_state": (jnp.zeros(()),)}
    for like, step, message in ((other, None, "not damaged: use the run's own config.json"),
                                (saved, 7, r"has no checkpoint at step 7; it holds steps \[1\]"),
                                (saved, -1, r"has no checkpoint at step -1")):
        with pytest.raises(CheckpointError, match=message) as error:
            checkpointer.restore(like, step)
        assert "--overwrite" not in str(error.value)


def test_a_failed_background_save_stops_the_run_at_the_next_step_and_a_failed_start_leaves_no_run(tmp_path,
                                                                                                  monkeypatch):
    """A full disk under Orbax's background save: one CheckpointError naming the cause and the intact steps at the
    next step (the run once trained on). A run that ended before its first step leaves nothing that would need
    --overwrite."""
    from optpo_jax.train import checkpoints as checkpoints_module

    calls = []

    def full_disk(self):
        calls.append(1)
        if len(calls) > 1:  # the first save's check passes; the second step finds it failed
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints_module.ocp.CheckpointManager, "check_for_errors", full_disk)
    with pytest.raises(CheckpointError, match=r"failed \(No space left on device\); the steps saved before it"):
        train(tiny_config(steps=3, **{"eval.every_steps": 0}), tmp_path / "run", progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # stopped before step 2 trained

    monkeypatch.undo()
    from optpo_jax.train import loop

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory in the first evaluation")

    monkeypatch.setattr(loop, "run_eval", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_config(steps=1), tmp_path / "fresh", progress=False)
    assert not [path.name for path in (tmp_path / "fresh").iterdir() if path.name != ".lock"]

"""Issue 15, items 1-7: runs, checkpoints, config values and updates that used to go silently wrong.

Each test names the item it covers; each failed on the code before the fix (a second
run mixed into the first, a changed config resumed, a flipped checkpoint restored,
a negative grad-norm clip reversed the gradient, a NaN in padding skipped the update...).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_loop import tiny_config

from optpo_jax.grpo import GRPOBatch, GRPOConfig, grpo_step, token_logprobs
from optpo_jax.train import checkpoints as checkpoints_module
from optpo_jax.train.checkpoints import Checkpointer, CheckpointError
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.loop import train
from optpo_jax.train.workdir import WorkdirError, WorkdirLock


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at every step (the workdir is copied by each test)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(steps=2), workdir, progress=False)
    return workdir


def copy_run(source: Path, folder: Path) -> Path:
    """A copy of the run in ``source`` at ``folder / "run"``, without its lock file."""
    copy = folder / "run"
    shutil.copytree(source, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path)


def test_item1_a_second_run_into_a_used_workdir_is_refused_unless_overwritten(run_copy):
    with pytest.raises(WorkdirError, match=r"--resume.*--overwrite"):
        train(tiny_config(steps=2), run_copy, progress=False)
    summary = train(tiny_config(steps=1), run_copy, progress=False, overwrite=True)
    assert summary["steps"] == 1
    assert Checkpointer(run_copy / "checkpoints").manager.all_steps() == [1]  # the old run's step 2 is gone
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1]


@pytest.mark.parametrize("field, value", [("seed", 1), ("data.seed", 5), ("sprt.max_samples", 16),
                                          ("prompts_per_step", 2), ("sampling.max_new_tokens", 16)])
def test_item2_resume_refuses_a_config_that_defines_another_run(run_copy, field, value):
    config = tiny_config(steps=3, **{field: value})
    with pytest.raises(WorkdirError, match=rf"config\.{field}: .* -> {value}") as error:
        train(config, run_copy, resume=True, progress=False)
    assert "Only these may change on resume: steps" in str(error.value)


def test_item2_resume_may_extend_a_run_with_a_constant_schedule(run_copy):
    summary = train(tiny_config(steps=3, **{"eval.every_steps": 0}), run_copy, resume=True, progress=False)
    assert summary["steps"] == 3
    cosine = tiny_config(steps=4, **{"optimizer.schedule": "cosine"})
    json_path = run_copy / "config.json"
    json_path.write_text(tiny_config(steps=3, **{"optimizer.schedule": "cosine"}).to_json_best_effort())
    with pytest.raises(WorkdirError, match="config.steps: 3 -> 4"):
        train(cosine, run_copy, resume=True, progress=False)


def test_item2_a_run_saved_before_a_field_existed_resumes_only_with_its_old_value(run_copy):
    """A config.json written before ``ADDED_FIELDS`` existed resumes when the new fields hold the
    values that reproduce it, and is refused when they do not."""
    from optpo_jax.train.workdir import ADDED_FIELDS, check_resumable

    saved = json.loads((run_copy / "config.json").read_text())
    for name in ADDED_FIELDS:
        *sections, field = name.split(".")
        parent = saved
        for section in sections:
            parent = parent[section]
        del parent[field]
    (run_copy / "config.json").write_text(json.dumps(saved))
    # pack_width's default has changed since it was added: an old run resumes with the old value.
    old_values = {"policy_update.pack_width": ADDED_FIELDS["policy_update.pack_width"]}
    check_resumable(run_copy, tiny_config(steps=2, **old_values))
    with pytest.raises(WorkdirError, match=r"config.policy_update.pack_width: 0 -> 128"):
        check_resumable(run_copy, tiny_config(steps=2))
    with pytest.raises(WorkdirError, match=r"config.policy_update.min_rollouts_per_prompt: 0 -> 3"):
        check_resumable(run_copy, tiny_config(steps=2, **old_values, **{"policy_update.min_rollouts_per_prompt": 3}))


def test_item3_a_second_run_in_a_locked_workdir_names_the_holder(run_copy):
    with WorkdirLock(run_copy), pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
        train(tiny_config(steps=2), run_copy, resume=True, progress=False)


def _save_two_steps(directory: Path, second_state: dict) -> Checkpointer:
    checkpointer = Checkpointer(directory)
    good = {"params": {"w": jnp.arange(6.0)}, "opt_state": {"m": jnp.ones(3)}}
    checkpointer.save(1, good, {"step": 1})
    checkpointer.save(2, second_state, {"step": 2})
    checkpointer.wait()
    return checkpointer


def test_item4_changed_bytes_are_caught_and_the_previous_good_step_offered(tmp_path, monkeypatch):
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


def test_item4_non_finite_and_flipped_checkpoints_are_refused(tmp_path):
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


def test_item4_a_cut_carry_file_is_named(run_copy):
    carry_file = run_copy / "carry" / "process0" / "1.npz"  # step 1 carries the lookahead of step 2
    assert carry_file.stat().st_size > 1000
    carry_file.write_bytes(carry_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"carry .*1\.npz is unreadable"):
        train(tiny_config(steps=2), run_copy, resume=True, resume_step=1, progress=False)


def test_item5_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(WorkdirError, match="no checkpoint"):
        train(tiny_config(steps=2), tmp_path / "empty", resume=True, progress=False)


def _events(path: Path):
    """(step, kind) of every event in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        kind = "start" if event.HasField("session_log") else "scalar" if event.HasField("summary") else "other"
        events.append((event.step, kind))
    return events


def test_item5_tensorboard_drops_the_interrupted_steps_on_resume(run_copy):
    Checkpointer(run_copy / "checkpoints").rewind(1)  # as if killed after step 2 was logged, before it was saved
    train(tiny_config(steps=2), run_copy, resume=True, progress=False)
    files = sorted((run_copy / "tb").glob("events.*"), key=lambda path: path.stat().st_mtime)
    assert ("start" in {kind for _, kind in _events(files[-1])}) and (2, "start") in _events(files[-1])
    # TensorBoard's purge: a START at step s discards earlier files' events at steps >= s.
    seen = []
    for path in files:
        events = _events(path)
        purge = min((step for step, kind in events if kind == "start"), default=None)
        if purge is not None:
            seen = [step for step in seen if step < purge]
        seen += [step for step, kind in events if kind == "scalar"]
    steps_logged = sorted(set(seen))
    assert steps_logged == [0, 1, 2]


@pytest.mark.parametrize("field, value, shown", [
    ("optimizer.max_grad_norm", -1.0, "config.optimizer.max_grad_norm"),
    ("optimizer.max_grad_norm", 0.0, "config.optimizer.max_grad_norm"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate"),
    ("checkpoint_every", 0, "config.checkpoint_every"),
    ("sprt.prior", float("inf"), "config.sprt.prior"),
    ("sprt.max_samples", 10**6, "config.sprt.max_samples"),
    ("data.num_prompts", -1, "config.data.num_prompts"),
    ("sampling.temperature", 0.0, "config.sampling.temperature"),
    ("eval.top_p", 0.0, "config.eval.top_p"),
])
def test_item6_config_values_are_checked_at_the_edge(tmp_path, field, value, shown):
    with pytest.raises(ConfigError, match=shown.replace(".", r"\.")):
        train(tiny_config(**{field: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before touching the workdir


def _cli(*args):
    # check=False: the tests read the return code and the one-line error themselves.
    return subprocess.run([sys.executable, "-m", "optpo_jax.cli", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_item6_the_cli_prints_a_config_error_as_one_line(tmp_path):
    result = _cli("train", "--config.optimizer.max_grad_norm=-1", f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("optpo-jax: error: config.optimizer.max_grad_norm")
    compare = _cli("compare", "--baseline_config.sprt.threshold=1.5", f"--workdir={tmp_path / 'cmp'}")
    assert compare.returncode != 0 and "config.sprt.threshold" in compare.stderr
    assert not (tmp_path / "cmp" / "optpo").exists()  # the baseline was checked before the first run


def _tiny_batch(num_rows=2, width=3, vocab=5):
    rng = np.random.default_rng(0)
    mask = np.zeros((num_rows, width), bool)
    mask[0] = True
    return GRPOBatch(input_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, width)), jnp.int32),
                     target_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, width)), jnp.int32),
                     loss_mask=jnp.asarray(mask), advantages=jnp.array([1.0, 0.0]),
                     old_logprobs=jnp.full((num_rows, width), -1.6))


def _apply(params, batch):
    return token_logprobs(jax.nn.one_hot(batch.input_tokens, params["w"].shape[0]) @ params["w"], batch.target_tokens)


def test_item7_a_nan_in_a_padding_row_does_not_skip_the_update():
    params = {"w": jnp.eye(5) * 0.1}
    optimizer = optax.sgd(0.5)
    clean = _tiny_batch()
    poisoned = clean.replace(advantages=clean.advantages.at[1].set(jnp.nan),
                             old_logprobs=clean.old_logprobs.at[1].set(jnp.nan))
    expected, _, _ = grpo_step(params, optimizer.init(params), clean, _apply, optimizer, GRPOConfig())
    got, _, metrics = grpo_step(params, optimizer.init(params), poisoned, _apply, optimizer, GRPOConfig())
    assert not bool(metrics["skipped"])
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(expected["w"]))


def test_item7_an_update_to_non_finite_params_is_skipped():
    params = {"w": jnp.eye(5) * 0.1}
    optimizer = optax.chain(optax.sgd(0.5), optax.scale(float("nan")))  # finite gradients, NaN params
    new_params, _, metrics = grpo_step(params, optimizer.init(params), _tiny_batch(), _apply, optimizer,
                                       GRPOConfig())
    assert bool(metrics["skipped"]) and np.isfinite(float(metrics["grad_norm"]))
    np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))

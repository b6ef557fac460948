import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax.default_config import arithmetic_config
from optpo_jax.grpo import GRPOBatch
from optpo_jax.sprt import SPRTConfig
from optpo_jax.train.loop import batch_problems, train
from optpo_jax.train.rewards import consensus_labels, consensus_rewards
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step import _fit_micro_batch, batch_logprobs, training_rows, update_rows
from optpo_jax.train.step_config import UpdateConfig


def tiny_config(method="optpo", **overrides):
    config = arithmetic_config(method)
    config.data.num_prompts = 8
    config.prompts_per_step = 4
    config.steps = 3
    config.rows_per_wave = 32
    config.sprt.max_samples = 8
    config.sprt.min_samples = 2
    config.policy_update.micro_batch_rows = 32
    config.policy_update.train_samples_per_prompt = 0 if method == "optpo" else 4
    config.eval.final_samples = 4
    config.eval.samples = 2
    config.eval.every_steps = 2
    config.checkpoint_every = 1
    # One update shape (every micro-batch padded to 32 rows at the full width), so a tiny run compiles its
    # update once: fitted micro-batches are tested on their own (test_fitted_micro_batches_train_like_padded_ones).
    config.policy_update.update(width_bucket=0, row_buckets=1)
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def setup():
    return build_setup(tiny_config())


@pytest.mark.parametrize("rule", ["dirichlet", "fixed"])
def test_collected_rollouts_match_the_votes(setup, rule):
    config = setup.learner.config
    if rule == "fixed":
        config = dataclasses.replace(config, sprt=SPRTConfig(rule="fixed", max_samples=8))
    problems = setup.train_problems[:5]
    rollouts, carry = collect_rollouts(setup.policy.params, setup.policy.config, setup.task, problems, config,
                                       jax.random.key(0))
    assert carry is None
    votes = rollouts.votes
    assert np.asarray(votes.done).all()
    per_prompt = np.bincount(rollouts.prompt_index, minlength=5)
    np.testing.assert_array_equal(per_prompt, np.asarray(votes.num_samples))
    assert rollouts.rows_used == len(rollouts.prompt_index) <= rollouts.rows_total == 32 * rollouts.waves
    if rule == "fixed":
        assert (per_prompt == 8).all()
    else:
        assert (per_prompt >= 2).all() and (per_prompt <= 8).all()
    # Vote counts are exactly the slots of the kept rollouts.
    for prompt in range(5):
        slots = rollouts.slots[rollouts.prompt_index == prompt]
        np.testing.assert_array_equal(np.bincount(slots[slots >= 0], minlength=8), np.asarray(votes.counts[prompt]))
        for slot, row in zip(slots, np.flatnonzero(rollouts.prompt_index == prompt), strict=True):
            completion = rollouts.completion_tokens[row, : rollouts.completion_lengths[row]]
            assert rollouts.answer_slots.answer(prompt, int(slot)) == setup.task.extract(completion)


def test_lookahead_prompts_use_spare_rows_and_carry_their_votes(setup):
    first, second = setup.train_problems[:3], setup.train_problems[3:6]
    args = (setup.policy.params, setup.policy.config, setup.task)
    config = setup.learner.config
    alone, _ = collect_rollouts(*args, first, config, jax.random.key(2))
    batch, carry = collect_rollouts(*args, first, config, jax.random.key(2), lookahead=second)
    # The batch gets the rows it would get alone (it is served first); spare rows went to `second`.
    np.testing.assert_array_equal(batch.prompt_index, alone.prompt_index)
    np.testing.assert_array_equal(batch.slots, alone.slots)
    assert batch.rows_used > alone.rows_used and batch.utilization > alone.utilization
    early = np.bincount(carry.kept["prompt_index"], minlength=3)
    np.testing.assert_array_equal(early, np.asarray(carry.votes.num_samples))
    assert early.sum() == batch.rows_used - len(batch.prompt_index) > 0
    later, none = collect_rollouts(*args, second, config, jax.random.key(3), carry=carry)
    assert none is None and np.asarray(later.votes.done).all()
    per_prompt = np.bincount(later.prompt_index, minlength=3)
    np.testing.assert_array_equal(per_prompt, np.asarray(later.votes.num_samples))
    assert (per_prompt >= early).all()
    for prompt in range(3):  # carried slots keep their meaning
        slots = later.slots[later.prompt_index == prompt]
        np.testing.assert_array_equal(np.bincount(slots[slots >= 0], minlength=8), np.asarray(later.votes.counts[prompt]))


def test_min_rollouts_per_prompt_draws_for_the_update_without_changing_the_vote(setup):
    """policy_update.min_rollouts_per_prompt (the paper's N): after a prompt's vote stopped it still draws
    up to N rollouts; the vote (counts, label) is exactly what it was without them."""
    args = (setup.policy.params, setup.policy.config, setup.task, setup.train_problems[:5])
    config = dataclasses.replace(setup.learner.config, sprt=SPRTConfig(threshold=0.6, min_samples=2, max_samples=8))
    plain, _ = collect_rollouts(*args, config, jax.random.key(4))
    topped_config = dataclasses.replace(config, update=dataclasses.replace(config.update, min_rollouts_per_prompt=7))
    topped, _ = collect_rollouts(*args, topped_config, jax.random.key(4), lookahead=setup.train_problems[5:8])
    votes = np.asarray(topped.votes.num_samples)
    np.testing.assert_array_equal(votes, np.asarray(plain.votes.num_samples))
    np.testing.assert_array_equal(np.asarray(topped.votes.counts), np.asarray(plain.votes.counts))
    per_prompt = np.bincount(topped.prompt_index, minlength=5)
    np.testing.assert_array_equal(per_prompt, np.maximum(votes, 7))
    assert (votes < 7).any()  # some vote stopped early, so some rollouts were drawn for the update only
    rewards, leader = consensus_rewards(topped, [], None), consensus_labels(topped)
    np.testing.assert_array_equal(leader, consensus_labels(plain))
    for row in range(len(rewards)):  # the extra rollouts are rewarded against the vote's label
        slot = topped.slots[row]
        assert rewards[row] == (slot >= 0 and slot == leader[topped.prompt_index[row]])
        completion = topped.completion_tokens[row, : topped.completion_lengths[row]]
        assert slot < 0 or topped.answer_slots.answer(int(topped.prompt_index[row]), int(slot)) == \
            setup.task.extract(completion)


def test_min_rollouts_per_prompt_above_the_budget_is_a_config_error():
    from optpo_jax.train.config_checks import ConfigError

    with pytest.raises(ConfigError, match=r"min_rollouts_per_prompt=9 must not exceed sprt.max_samples=8"):
        build_setup(tiny_config(**{"policy_update.min_rollouts_per_prompt": 9}))


def test_rewards_rows_and_old_logprobs_line_up(setup):
    problems = setup.train_problems[:4]
    rollouts, _ = collect_rollouts(setup.policy.params, setup.policy.config, setup.task, problems,
                                   setup.learner.config, jax.random.key(1))
    rewards, leader = consensus_rewards(rollouts, problems, setup.task), consensus_labels(rollouts)
    for row in range(len(rewards)):
        assert rewards[row] == (rollouts.slots[row] >= 0 and rollouts.slots[row] == leader[rollouts.prompt_index[row]])
    advantages = np.where(rewards > 0, 1.0, -1.0).astype(np.float32)
    advantages[rollouts.prompt_index == 0] = 0.0  # a unanimous prompt: dropped from the update
    rows = training_rows(rollouts, advantages, UpdateConfig(), np.random.default_rng(0))
    assert 0 not in set(rollouts.prompt_index[rows])
    # The sampler's policy log-probabilities are what the trainer recomputes at the loss-mask positions, whether
    # the rollouts are packed (each prompt once, with its completions) or one per row.
    chunk_rows = 1 << (len(rows) - 1).bit_length()
    for pack_width in (0, 32):
        update = UpdateConfig(pack_width=pack_width, micro_batch_rows=chunk_rows, width_bucket=8)
        arrays = _fit_micro_batch(update_rows(rollouts, rows, advantages), chunk_rows, update, None)
        if pack_width:
            assert (arrays["positions"] >= 0).any(axis=1).sum() < len(rows)  # several rollouts share a packed row
        recomputed = np.asarray(batch_logprobs(setup.policy.config, setup.policy.params,
                                               GRPOBatch(**{k: jnp.asarray(v) for k, v in arrays.items()}), 1.0))
        mask = arrays["loss_mask"]
        np.testing.assert_array_equal(mask.sum(axis=1)[:len(rows)], rollouts.completion_lengths[rows])
        assert not mask[len(rows):].any()
        np.testing.assert_allclose(recomputed[mask], arrays["old_logprobs"][mask], atol=2e-4)
    subsample = training_rows(rollouts, np.ones_like(advantages), UpdateConfig(train_samples_per_prompt=2),
                              np.random.default_rng(0))
    assert (np.bincount(rollouts.prompt_index[subsample]) <= 2).all()


def test_checkpoint_keeps_the_totals_of_its_step(tmp_path):
    from optpo_jax.train.checkpoints import Checkpointer

    checkpoints = Checkpointer(tmp_path)
    state = {"params": {"w": jnp.ones(3)}, "opt_state": {"m": jnp.zeros(3)}}
    totals = {"step": 1, "rollouts": 10, "before": {"pass@1": 0.5}}
    checkpoints.save(1, state, totals)
    totals.update(step=2, rollouts=20)  # the loop goes on while Orbax writes in the background
    totals["before"]["pass@1"] = 0.0
    checkpoints.wait()
    _, restored, carry = checkpoints.restore(state)
    assert restored == {"step": 1, "rollouts": 10, "before": {"pass@1": 0.5}} and carry is None


def test_batches_cover_every_prompt_once_per_epoch():
    problems = list(range(12))
    epoch = [p for step in range(3) for p in batch_problems(problems, step, 4, seed=0)]
    assert sorted(epoch) == problems
    assert batch_problems(problems, 3, 4, seed=0) != batch_problems(problems, 0, 4, seed=0)


@pytest.mark.parametrize(
    "field, value, message",
    [("sprt.threshold", 1.5, "threshold"), ("data.mode", "mixed", "data.mode"), ("steps", -1, "config.steps"),
     ("sampling.top_p", 0.0, "top_p"), ("optimizer.learning_rate", -1.0, "learning_rate"),
     ("policy_update.epochs", 0, "epochs")],
)
def test_invalid_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_setup(tiny_config(**{field: value}))


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "optpo_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_cli_overrides_and_rejects_bad_values(tmp_path):
    process = _cli("train", "--config", "configs/arith_optpo.py", "--config.sprt.threshold=1.5",
                   f"--workdir={tmp_path}")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "threshold" in output


def _final_metrics(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((workdir / "summary.json").read_text())


RESUMED_RUN = {"sprt.learn_prior": True, "policy_update.min_rollouts_per_prompt": 4, "lora.rank": 8}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    """Also with the state a run carries besides params (the learned prior, in the checkpoint's totals) and
    with LoRA (only the adapters and their optimizer state are saved; the base is reloaded). A continuous run
    stopped mid-batch: tests/test_continuous.py."""
    config = tiny_config(steps=4, **RESUMED_RUN)
    full = tmp_path / "full"
    train(config, full, progress=False)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "from tests.test_loop import RESUMED_RUN, tiny_config\n\n"
        "def get_config():\n    return tiny_config(steps=4, **RESUMED_RUN)\n"
    )
    args = ("train", f"--config={config_file}", f"--workdir={tmp_path / 'killed'}")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    process = _cli(*args, env=env)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints" / "2").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _cli(*args, "--resume", env=env)
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    full_lines, full_summary = _final_metrics(full)
    resumed_lines, resumed_summary = _final_metrics(tmp_path / "killed")
    drop_times = lambda line: {k: v for k, v in line.items() if "seconds" not in k}
    assert [drop_times(line) for line in resumed_lines] == [drop_times(line) for line in full_lines]
    assert [line.get("fitted_prior") for line in full_lines[1:4]] != [None] * 3  # the prior was learned
    for name in ("after", "before", "total_rollouts", "total_generated_tokens", "label_accuracy"):
        assert resumed_summary[name] == full_summary[name]
    # The LoRA run exported: merged, and as PEFT adapters that merge into the same model.
    from cli_in_process import run_command

    from optpo_jax.models import load_hf, load_peft_adapters, merge_adapters
    from optpo_jax.tasks.arithmetic import load_policy

    for out, extra in (("merged", ()), ("adapters", ("--adapters_only",))):  # in this process: no start-up each
        code, _, error = run_command(capsys, "export", f"--config={config_file}", f"--workdir={tmp_path / 'killed'}",
                                     f"--out={tmp_path / out}", *extra)
        assert code == 0, error
    base = load_policy()
    adapters, lora = load_peft_adapters(tmp_path / "adapters")
    tokens = np.array([[1, 5, 9, 12, 3, 7]], np.int32)
    merged = np.asarray(load_hf(tmp_path / "merged", load_tokenizer=False)(tokens))
    np.testing.assert_allclose(merged, np.asarray(type(base)(base.config, merge_adapters(base.params, adapters, lora))(
        tokens)), atol=1e-5)
    assert np.abs(merged - np.asarray(base(tokens))).max() > 1e-4  # training moved the adapters


@pytest.mark.parametrize("mode", ["grpo", "drgrpo"])
def test_padded_rollout_advantages_equal_the_unpadded_ones(mode):
    from optpo_jax.grpo import group_advantages
    from optpo_jax.train.step import rollout_advantages

    rng = np.random.default_rng(0)
    for num_rollouts in (12, 256, 513):  # inside, at and across bucket boundaries
        rewards = rng.integers(0, 2, num_rollouts).astype(np.float32)
        prompt_index = rng.integers(0, 3, num_rollouts).astype(np.int32)
        expected = group_advantages(jnp.asarray(rewards), jnp.asarray(prompt_index), jnp.ones(num_rollouts, bool), 3,
                                    mode)
        got = rollout_advantages(rewards, prompt_index, 3, mode)
        assert got.shape == (num_rollouts,) and np.any(got != 0)
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_micro_batch_shapes_follow_the_rows_and_the_longest_sequence():
    from optpo_jax.train.step import micro_batch_shape

    config = UpdateConfig(micro_batch_rows=256, width_bucket=16, row_buckets=3)
    assert micro_batch_shape(256, 40, 256, 55, config) == (256, 48)
    assert micro_batch_shape(70, 10, 256, 55, config) == (128, 16)
    assert micro_batch_shape(64, 50, 256, 55, config) == (64, 55)  # never wider than the arrays
    assert micro_batch_shape(10, 10, 256, 55, config, row_multiple=128) == (128, 16)
    assert micro_batch_shape(10, 10, 256, 55, UpdateConfig(width_bucket=0, row_buckets=1)) == (256, 55)


def test_fitted_and_packed_micro_batches_train_like_padded_ones(setup):
    """The update at fitted widths and row counts takes the same gradients as the one padded to the full
    micro-batch (float tolerance).

    Plain SGD, not Adam: SGD moves each parameter by lr x its gradient, so a rounding difference in a gradient
    stays a rounding difference in the params; Adam divides by sqrt(v) and turns the rounding of a near-zero
    gradient into a full-size step (2 of 49,152 params differed by 2.6e-5 on an AVX-512 CPU).
    """
    import dataclasses as dc

    import optax

    from optpo_jax.train.loop import init_train_state
    from optpo_jax.train.step import make_update_step, update_policy

    problems = setup.train_problems[:4]
    rollouts, _ = collect_rollouts(setup.policy.params, setup.policy.config, setup.task, problems,
                                   setup.learner.config, jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    arrays = update_rows(rollouts, np.arange(len(advantages)), advantages)
    learning_rate = 1e-2
    sgd = optax.sgd(learning_rate)
    results = []
    # One rollout per row at the full width, the same at the longest row, and packed (prompts once, the head in
    # chunks; grad_accumulation 2 splits it into two packed micro-batches): one update.
    for width_bucket, row_buckets, pack_width, accumulation in ((0, 1, 0, 1), (8, 3, 0, 1), (8, 3, 32, 2)):
        update = dc.replace(setup.learner.config.update, width_bucket=width_bucket, row_buckets=row_buckets,
                            micro_batch_rows=16, pack_width=pack_width, grad_accumulation=accumulation)
        learner = dc.replace(setup.learner, config=dc.replace(setup.learner.config, update=update),
                             update_step=make_update_step(setup.policy.config, sgd, setup.learner.config.grpo,
                                                          accumulation))
        params = jax.tree.map(jnp.copy, setup.policy.params)  # the update donates what it is given
        state = init_train_state(setup).replace(params=params, opt_state=sgd.init(params))
        state, metrics = update_policy(state, arrays, learner, np.random.default_rng(1))
        results.append((jax.tree.leaves(state.params), metrics))
    (padded, padded_metrics) = results[0]
    initial = jax.tree.leaves(setup.policy.params)
    for other, other_metrics in results[1:]:
        assert padded_metrics["optimizer_steps"] == other_metrics["optimizer_steps"] > 1
        np.testing.assert_allclose(other_metrics["loss"], padded_metrics["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other_metrics["grad_norm"], padded_metrics["grad_norm"], rtol=1e-4)
        for a, b, start in zip(padded, other, initial, strict=True):
            a, b, start = np.asarray(a), np.asarray(b), np.asarray(start)
            # The steps' moves, lr x sum(g), agree to float32 rounding: of the gradients (1e-3 of the largest move)
            # and of each param's own value (a few ulps), whatever the CPU's vector width.
            bound = 1e-3 * np.abs(a - start).max() + 4 * np.finfo(np.float32).eps * np.abs(start)
            assert np.all(np.abs(a - b) <= bound), np.abs(a - b).max()


def test_float32_master_updates_float32_params():
    """optimizer.float32_master on float32 params: the update runs (it once donated one buffer as both the params
    and the master copy) and the params follow the master copy (closed form: p + (m - p) in float32 is m up to the
    rounding of m - p, an ulp of the old p or of m)."""
    from optpo_jax.train.loop import init_train_state
    from optpo_jax.train.step import update_policy

    setup = build_setup(tiny_config(**{"optimizer.float32_master": True}))
    rollouts, _ = collect_rollouts(setup.policy.params, setup.policy.config, setup.task, setup.train_problems[:2],
                                   setup.learner.config, jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    state = init_train_state(setup)
    before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(state.params)]
    state, metrics = update_policy(state, update_rows(rollouts, np.arange(len(advantages)), advantages),
                                   setup.learner, np.random.default_rng(1))
    assert metrics["optimizer_steps"] >= 1 and metrics["skipped_steps"] == 0
    after = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    for old, param, master in zip(before, after, jax.tree.leaves(state.opt_state.master), strict=True):
        master = np.asarray(master)
        assert np.all(np.abs(param - master) <= np.finfo(np.float32).eps * (np.abs(old) + np.abs(master)))


def test_optimizer_steps_fixes_the_number_of_updates(setup):
    """policy_update.optimizer_steps = k: k updates whatever the rows (fewer only with fewer rows than k; chunks of
    micro_batch_rows when k of them cannot hold the rows); 0: one update per micro_batch_rows."""
    from optpo_jax.train.loop import init_train_state
    from optpo_jax.train.step import _step_cuts, update_policy

    # Cuts at ceil(i M / k): k = 4 over 9 rows is 3 + 2 + 2 + 2 (steps of ceil(9 / 4) = 3 rows would make only 3).
    assert _step_cuts(9, 16, 4) == [0, 3, 5, 7, 9]
    for num_rows, chunk_rows, steps in ((799, 256, 4), (30, 16, 10), (5, 16, 4), (17, 16, 16)):
        cuts = _step_cuts(num_rows, chunk_rows, steps)
        sizes = np.diff(cuts)
        assert cuts[0] == 0 and cuts[-1] == num_rows and len(sizes) == steps and sizes.max() - sizes.min() <= 1
    assert _step_cuts(3, 16, 4) == [0, 1, 2, 3]  # fewer rows than steps: one row each
    assert _step_cuts(40, 16, 0) == [0, 16, 32, 48]  # 0: micro-batches of 16 (the last padded)
    assert _step_cuts(40, 8, 2) == [0, 8, 16, 24, 32, 40]  # 2 steps of 20 rows exceed 8: micro-batches again
    assert _step_cuts(0, 16, 4) == [0] and _step_cuts(0, 16, 0) == [0]  # no rows, no step

    # The update takes those steps.
    rollouts, _ = collect_rollouts(setup.policy.params, setup.policy.config, setup.task, setup.train_problems[:4],
                                   setup.learner.config, jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    assert len(advantages) > 24
    arrays = update_rows(rollouts, np.arange(len(advantages)), advantages)
    update = dataclasses.replace(setup.learner.config.update, optimizer_steps=3, micro_batch_rows=16)
    learner = dataclasses.replace(setup.learner, config=dataclasses.replace(setup.learner.config, update=update))
    state = init_train_state(setup)
    state = state.replace(params=jax.tree.map(jnp.copy, state.params))
    _, metrics = update_policy(state, arrays, learner, np.random.default_rng(1))
    assert metrics["optimizer_steps"] == 3
    with pytest.raises(ValueError, match="optimizer_steps must be >= 0, got -1"):
        UpdateConfig(optimizer_steps=-1)

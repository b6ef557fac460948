"""optpo_jax/train/step.py: training_step's rewards, rollout advantages and training rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.rewards import REWARDS, consensus_labels, consensus_rewards, ground_truth_rewards
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step import training_rows
from optpo_jax.train.step_config import UpdateConfig
from optpo_jax.train.update import batch_logprobs, fit_micro_batch, update_rows
from tests.run_configs import small_config


def test_rewards_rows_and_old_logprobs_line_up(setup):
    problems = setup.train_problems[:4]
    rollouts, _ = collect_rollouts(setup.policy.params, setup.learner, problems, jax.random.key(1))
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
        batch = fit_micro_batch(update_rows(rollouts, rows, advantages), chunk_rows, update, None)
        if pack_width:
            assert (batch.positions >= 0).any(axis=1).sum() < len(rows)  # several rollouts share a packed row
        recomputed = np.asarray(batch_logprobs(setup.policy.config, setup.policy.params,
                                               jax.tree.map(jnp.asarray, batch), 1.0))
        mask = batch.loss_mask
        np.testing.assert_array_equal(mask.sum(axis=1)[:len(rows)], rollouts.completion_lengths[rows])
        assert not mask[len(rows):].any()
        np.testing.assert_allclose(recomputed[mask], batch.old_logprobs[mask], atol=2e-4)
    subsample = training_rows(rollouts, np.ones_like(advantages), UpdateConfig(train_samples_per_prompt=2),
                              np.random.default_rng(0))
    assert (np.bincount(rollouts.prompt_index[subsample]) <= 2).all()


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
def test_padded_rollout_advantages_equal_the_unpadded_ones(estimator):
    from optpo_jax.grpo import group_advantages
    from optpo_jax.train.step import rollout_advantages

    rng = np.random.default_rng(0)
    for num_rollouts in (12, 256, 513):  # inside, at and across bucket boundaries
        rewards = rng.integers(0, 2, num_rollouts).astype(np.float32)
        prompt_index = rng.integers(0, 3, num_rollouts).astype(np.int32)
        expected = group_advantages(jnp.asarray(rewards), jnp.asarray(prompt_index), jnp.ones(num_rollouts, bool), 3,
                                    estimator)
        got = rollout_advantages(rewards, prompt_index, 3, estimator)
        assert got.shape == (num_rollouts,) and np.any(got != 0)
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_ground_truth_reward_runs_in_training_and_an_unknown_reward_is_named(monkeypatch):
    """A training step rewards by the configured registry entry (spied on): ground truth, not the vote."""
    import jax

    from optpo_jax.train.step import training_step

    with pytest.raises(ConfigError, match=r"config.reward must be one of \('consensus', 'ground_truth'\), got 'gt'"):
        build_setup(small_config(reward="gt"))
    setup = build_setup(small_config(reward="ground_truth"))
    graded = []

    def spy(rollouts, problems, task):
        graded.append(ground_truth_rewards(rollouts, problems, task))
        return graded[-1]

    monkeypatch.setitem(REWARDS, "ground_truth", spy)
    problems = setup.train_problems[:4]
    _, output = training_step(setup.initial_state(), setup.learner, problems, jax.random.key(0),
                              np.random.default_rng(0))
    assert len(graded) == 1 and np.array_equal(output.rewards, graded[0])
    answers = [output.rollouts.answer_slots.answer(int(p), int(s))
               for p, s in zip(output.rollouts.prompt_index, output.rollouts.slots, strict=True)]
    truth = [float(a is not None and a == problems[p].answer) for a, p in zip(answers, output.rollouts.prompt_index,
                                                                              strict=True)]
    np.testing.assert_array_equal(output.rewards, truth)  # reference: the sums' exact answers

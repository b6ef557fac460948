"""optpo_jax/train/step.py: training_step's rewards, rollout advantages and training rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax.sprt import SPRTConfig
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
    rewards = np.where(np.arange(len(rewards)) % 2, 1.0, 0.0).astype(np.float32)  # every group mixed...
    rewards[rollouts.prompt_index == 0] = 1.0  # ...but prompt 0's, unanimous: dropped from the update
    rows, advantages = training_rows(rollouts, rewards, len(problems), UpdateConfig(), SPRTConfig(),
                                     np.random.default_rng(0))
    assert 0 not in set(rollouts.prompt_index[rows]) and len(rows) > 0
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
    subsample, _ = training_rows(rollouts, rewards, len(problems), UpdateConfig(train_samples_per_prompt=2),
                                 SPRTConfig(), np.random.default_rng(0))
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


def _voted_rollouts(prompt_index, confidence=None, num_samples=None):
    """Rollouts of the given prompts in draw order, with only what the training rows read filled in."""
    from optpo_jax.sprt import VoteState
    from optpo_jax.train.rollouts import Rollouts

    num_rollouts, num_prompts = len(prompt_index), int(prompt_index.max()) + 1
    zeros = np.zeros(num_rollouts, np.int32)
    confidence = np.ones(num_prompts, np.float32) if confidence is None else np.asarray(confidence, np.float32)
    num_samples = np.bincount(prompt_index) if num_samples is None else num_samples
    votes = VoteState(counts=np.zeros((num_prompts, 2), np.int32), num_samples=num_samples,
                      done=np.ones(num_prompts, bool), confidence=confidence, run_slot=np.zeros(num_prompts, np.int32),
                      run_length=np.zeros(num_prompts, np.int32))
    return Rollouts(prompt_index=prompt_index.astype(np.int32), prompt_tokens=zeros[:, None], prompt_lengths=zeros,
                    completion_tokens=zeros[:, None], completion_lengths=zeros, policy_logprobs=zeros[:, None] * 0.0,
                    slots=zeros, votes=votes, answer_slots=None, rows_total=0, rows_used=0, waves=0,
                    sampling_seconds=0.0)


def _hand_grpo(rewards):
    """GRPO's advantages of one group by hand: (r - mean) / (sample std with n - 1 + 1e-6)."""
    rewards = np.asarray(rewards, np.float64)
    return (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)


def test_faithful_ttrl_trains_the_first_32_with_advantages_over_them():
    """TTRL's recipe (PRIME-RL/TTRL select_top_k_per_prompt): of 64 votes per prompt the first 32 drawn are
    trained on, with GRPO advantages over those 32 (reference: a hand computation); "random" keeps the
    previous baseline: advantages over all 64, a random 32 trained on."""
    from optpo_jax.train.step import training_rows

    rng = np.random.default_rng(0)
    prompt_index = rng.permutation(np.repeat(np.arange(3), 64))  # prompts interleaved in draw order
    rewards = (rng.random(192) < np.array([0.3, 0.6, 0.9])[prompt_index]).astype(np.float32)
    rollouts = _voted_rollouts(prompt_index)
    first = UpdateConfig(train_samples_per_prompt=32, subsample="first")
    rows, advantages = training_rows(rollouts, rewards, 3, first, SPRTConfig(rule="fixed"), np.random.default_rng(1))
    expected = np.zeros(192)
    for prompt in range(3):
        members = np.flatnonzero(prompt_index == prompt)[:32]
        expected[members] = _hand_grpo(rewards[members])
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(expected != 0))
    assert (np.bincount(prompt_index[rows], minlength=3) <= 32).all()

    randomly = UpdateConfig(train_samples_per_prompt=32, subsample="random")
    rows, advantages = training_rows(rollouts, rewards, 3, randomly, SPRTConfig(rule="fixed"),
                                     np.random.default_rng(1))
    over_all = np.zeros(192)
    for prompt in range(3):
        members = np.flatnonzero(prompt_index == prompt)
        over_all[members] = _hand_grpo(rewards[members])
    np.testing.assert_allclose(advantages[rows], over_all[rows], rtol=1e-5, atol=1e-6)
    assert (np.bincount(prompt_index[rows], minlength=3) <= 32).all()
    assert not np.array_equal(np.sort(rows), np.flatnonzero(expected != 0))  # not the first 32


@pytest.mark.parametrize("rule", ["all", "decided", "per_prompt", "confidence"])
def test_vote_weights_scale_the_trained_advantages(rule):
    """Each rule's weights by hand (prompt 1 undecided at confidence 0.5, prompt 2 drew twice the votes),
    scaled to mean 1 over the trained rollouts, multiply their GRPO advantages."""
    from optpo_jax.train.step import training_rows

    prompt_index = np.repeat([0, 1, 2], [8, 8, 16])
    rewards = np.tile([1.0, 0.0, 1.0, 1.0], 8).astype(np.float32)
    confidence = np.array([0.99, 0.5, 0.97])
    rollouts = _voted_rollouts(prompt_index, confidence)
    config = UpdateConfig(vote_weights=rule)
    rows, advantages = training_rows(rollouts, rewards, 3, config, SPRTConfig(threshold=0.95),
                                     np.random.default_rng(0))
    base = np.concatenate([_hand_grpo(rewards[prompt_index == p]) for p in range(3)])
    raw = {"all": np.ones(3), "decided": np.array([1.0, 0.0, 1.0]), "per_prompt": 1.0 / np.array([8, 8, 16]),
           "confidence": confidence}[rule][prompt_index]
    weights = raw / raw[raw > 0].mean()  # mean 1 over the rollouts that stay in the update
    expected = base * weights
    np.testing.assert_allclose(advantages[rows], expected[rows], rtol=1e-5)
    np.testing.assert_array_equal(rows, np.flatnonzero(expected != 0))
    if rule == "decided":
        assert 1 not in prompt_index[rows]
    if rule == "per_prompt":  # each prompt's rollouts weigh the same in all
        totals = np.bincount(prompt_index[rows], weights[rows])
        np.testing.assert_allclose(totals, totals[0])


def test_vote_weights_are_checked():
    from optpo_jax.train.vote_weights import normalized_weights

    with pytest.raises(ValueError, match="vote_weights must be one of .*'confidence'.*got 'votes'"):
        UpdateConfig(vote_weights="votes")
    with pytest.raises(ValueError, match="subsample must be one of \\('first', 'random'\\), got 'last'"):
        UpdateConfig(subsample="last")
    with pytest.raises(ValueError, match="finite and >= 0"):
        normalized_weights(np.array([1.0, -0.5]))
    np.testing.assert_array_equal(normalized_weights(np.zeros(3)), np.zeros(3))

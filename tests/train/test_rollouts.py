"""optpo_jax/train/rollouts.py: collect_rollouts' votes, lookahead, extra rollouts and carry files."""

import dataclasses

import jax
import numpy as np
import pytest

from optpo_jax.sprt import SPRTConfig
from optpo_jax.train.checkpoints import CheckpointError
from optpo_jax.train.loop import train
from optpo_jax.train.rewards import consensus_labels, consensus_rewards
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from tests.run_configs import small_config, tiny_config


def test_a_cut_lookahead_carry_file_is_named(run_copy):
    carry_file = run_copy / "carry" / "process0" / "1.npz"  # step 1 carries the lookahead of step 2
    assert carry_file.stat().st_size > 1000
    carry_file.write_bytes(carry_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"carry .*1\.npz is unreadable"):
        train(tiny_config(steps=2), run_copy, resume=True, resume_step=1, progress=False)


@pytest.mark.parametrize("rule", ["dirichlet", "fixed"])
def test_collected_rollouts_match_the_votes(setup, rule):
    config = setup.learner.config
    if rule == "fixed":
        config = dataclasses.replace(config, sprt=SPRTConfig(rule="fixed", max_samples=8))
    problems = setup.train_problems[:5]
    rollouts, carry = collect_rollouts(setup.policy.params, dataclasses.replace(setup.learner, config=config), problems,
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
    args = (setup.policy.params, setup.learner)
    alone, _ = collect_rollouts(*args, first, jax.random.key(2))
    batch, carry = collect_rollouts(*args, first, jax.random.key(2), lookahead=second)
    # The batch gets the rows it would get alone (it is served first); spare rows went to `second`.
    np.testing.assert_array_equal(batch.prompt_index, alone.prompt_index)
    np.testing.assert_array_equal(batch.slots, alone.slots)
    assert batch.rows_used > alone.rows_used and batch.utilization > alone.utilization
    early = np.bincount(carry.kept["prompt_index"], minlength=3)
    np.testing.assert_array_equal(early, np.asarray(carry.votes.num_samples))
    assert early.sum() == batch.rows_used - len(batch.prompt_index) > 0
    later, none = collect_rollouts(*args, second, jax.random.key(3), carry=carry)
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
    problems = setup.train_problems[:5]
    config = dataclasses.replace(setup.learner.config, sprt=SPRTConfig(threshold=0.6, min_samples=2, max_samples=8))
    learner = lambda config: dataclasses.replace(setup.learner, config=config)
    plain, _ = collect_rollouts(setup.policy.params, learner(config), problems, jax.random.key(4))
    topped_config = dataclasses.replace(config, update=dataclasses.replace(config.update, min_rollouts_per_prompt=7))
    topped, _ = collect_rollouts(setup.policy.params, learner(topped_config), problems, jax.random.key(4),
                                 lookahead=setup.train_problems[5:8])
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


def test_a_wave_that_loses_votes_is_an_error_even_under_python_O(monkeypatch):
    """The votes-counted check in the wave loop is a RuntimeError, not an assert (removed by -O)."""
    import jax

    from optpo_jax.train import rollouts as rollouts_module

    setup = build_setup(small_config())
    real_count = rollouts_module.count_votes

    def losing_count(votes, answer_slots, wave, sprt, prior_state=None):
        wave.valid = wave.valid.copy()
        wave.valid[np.flatnonzero(wave.valid)[0]] = False  # one row's vote goes missing
        return real_count(votes, answer_slots, wave, sprt, prior_state)

    monkeypatch.setattr(rollouts_module, "count_votes", losing_count)
    with pytest.raises(RuntimeError, match="voting rows added"):
        rollouts_module.collect_rollouts(setup.policy.params, setup.learner, setup.train_problems[:4],
                                         jax.random.key(0))

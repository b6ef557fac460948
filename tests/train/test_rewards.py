"""optpo_jax/train/rewards.py: the ground-truth and consensus rewards."""

import numpy as np

from optpo_jax.sprt import SPRTConfig, init_vote_state, sprt_update
from optpo_jax.tasks.arithmetic import ArithmeticTask
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.rewards import REWARDS, consensus_rewards, ground_truth_rewards
from optpo_jax.train.rollouts import Rollouts


def _rollouts(prompt_index, answers, num_slots=8):
    """Rollouts with only what rewards read: prompts, slots of ``answers``, the votes over them."""
    prompt_index = np.array(prompt_index, np.int32)
    answer_slots = AnswerSlots(int(prompt_index.max()) + 1, num_slots)
    slots = answer_slots.assign(prompt_index, answers)
    votes = sprt_update(init_vote_state(int(prompt_index.max()) + 1, num_slots), prompt_index, slots,
                        np.ones(len(slots), bool), SPRTConfig(max_samples=num_slots))
    empty = np.zeros((len(slots), 1), np.int32)
    return Rollouts(prompt_index, empty, np.ones(len(slots), np.int32), empty, np.ones(len(slots), np.int32),
                    empty.astype(np.float32), slots, votes, answer_slots, len(slots), len(slots), 1, 0.0)


def test_ground_truth_reward_grades_each_rollout_and_consensus_rewards_the_majority():
    """Hand-computed: prompt 0's majority (7) is wrong (the truth is 5), prompt 1's majority (9) is right."""
    problems = [type("P", (), {"answer": 5})(), type("P", (), {"answer": 9})()]
    rollouts = _rollouts([0, 0, 0, 0, 1, 1, 1], [7, 7, 5, None, 9, 9, 4])
    task = ArithmeticTask()
    np.testing.assert_array_equal(ground_truth_rewards(rollouts, problems, task), [0, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(consensus_rewards(rollouts, problems, task), [1, 1, 0, 0, 1, 1, 0])
    assert set(REWARDS) == {"consensus", "ground_truth"}

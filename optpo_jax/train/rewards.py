"""Rewards of a batch's rollouts: a registry of ``reward(rollouts, problems, task) -> [N] float32``.

``consensus`` is test-time RL (TTRL, OptPO): 1 where a rollout's answer is its prompt's
majority vote, no label read. ``ground_truth`` is RL with the true labels (the upper bound
TTRL reports beside its own numbers): 1 where ``task.is_correct`` says the answer is right.
A new reward is one function and one line in ``REWARDS``.
"""

from __future__ import annotations

import numpy as np

from optpo_jax.sprt import consensus
from optpo_jax.train.rollouts import Rollouts


def consensus_labels(rollouts: Rollouts) -> np.ndarray:
    """[P] int32 consensus slot of each prompt (-1 without a vote)."""
    return np.asarray(consensus(rollouts.votes))


def consensus_rewards(rollouts: Rollouts, problems: list, task) -> np.ndarray:
    """[N] float32: 1 where a rollout's answer is its prompt's consensus (no ground truth read)."""
    del problems, task  # the vote is the label
    leader = consensus_labels(rollouts)
    rewards = (rollouts.slots >= 0) & (rollouts.slots == leader[rollouts.prompt_index])
    return rewards.astype(np.float32)


def ground_truth_rewards(rollouts: Rollouts, problems: list, task) -> np.ndarray:
    """[N] float32: 1 where ``task.is_correct(answer, problem)``; each distinct (prompt, answer slot) graded once."""
    verdicts: dict[tuple[int, int], bool] = {}
    rewards = np.zeros(len(rollouts.slots), np.float32)
    for row, (prompt, slot) in enumerate(zip(rollouts.prompt_index.tolist(), rollouts.slots.tolist(), strict=True)):
        if slot < 0:
            continue
        if (prompt, slot) not in verdicts:
            verdicts[prompt, slot] = bool(task.is_correct(rollouts.answer_slots.answer(prompt, slot), problems[prompt]))
        rewards[row] = verdicts[prompt, slot]
    return rewards


REWARDS = {"consensus": consensus_rewards, "ground_truth": ground_truth_rewards}

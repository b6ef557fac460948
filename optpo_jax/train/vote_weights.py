"""How much each rollout counts in the update, from its prompt's final vote (``policy_update.vote_weights``).

A registry next to the advantage estimators (``grpo.ADVANTAGE_ESTIMATORS``): each entry is a
pure function ``(prompt_index [n], rewards [n], votes, sprt) -> [n]`` non-negative weights of
the n rollouts the update trains on (``step.training_rows``), where ``votes`` is the batch's
final ``sprt.VoteState`` (host arrays, [P] per prompt) and ``sprt`` the ``SPRTConfig`` that
stopped it. ``normalized_weights`` scales the weights of the rollouts that stay in the update
to mean 1 (a rule moves the step's gradient between prompts, not its size), and the step
multiplies each rollout's advantage by its weight: the clipped loss is linear in a
non-negative scale of the advantage, so this weights the rollout's loss. A weight of 0 drops
the rollout from the update. The paper's N, the other training-aware use of the votes, is
``policy_update.min_rollouts_per_prompt`` (rollouts drawn after a vote stopped).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from optpo_jax.sprt import SPRTConfig, VoteState


def all_weights(prompt_index: np.ndarray, rewards: np.ndarray, votes: VoteState, sprt: SPRTConfig) -> np.ndarray:
    """Every rollout counts the same (the default): a prompt weighs as many rollouts as it drew."""
    del rewards, votes, sprt
    return np.ones(len(prompt_index), np.float32)


def decided_weights(prompt_index: np.ndarray, rewards: np.ndarray, votes: VoteState,
                    sprt: SPRTConfig) -> np.ndarray:
    """1 on prompts whose vote reached the rule's threshold, 0 on those that ran out of budget undecided
    (their pseudo-label is the least reliable)."""
    del rewards
    decided = np.asarray(votes.confidence) >= sprt.threshold
    return decided[prompt_index].astype(np.float32)


def per_prompt_weights(prompt_index: np.ndarray, rewards: np.ndarray, votes: VoteState,
                       sprt: SPRTConfig) -> np.ndarray:
    """1 / (the prompt's trained rollouts): every prompt weighs the same whatever the number of votes it took."""
    del rewards, sprt
    counts = np.bincount(prompt_index, minlength=len(np.asarray(votes.num_samples)))
    return (1.0 / counts[prompt_index]).astype(np.float32)


def confidence_weights(prompt_index: np.ndarray, rewards: np.ndarray, votes: VoteState,
                       sprt: SPRTConfig) -> np.ndarray:
    """The rule's final confidence that the prompt's label is the policy's mode (``VoteState.confidence``)."""
    del rewards, sprt
    return np.asarray(votes.confidence, np.float32)[prompt_index]


VoteWeights = Callable[[np.ndarray, np.ndarray, VoteState, SPRTConfig], np.ndarray]
VOTE_WEIGHTS: dict[str, VoteWeights] = {
    "all": all_weights,
    "decided": decided_weights,
    "per_prompt": per_prompt_weights,
    "confidence": confidence_weights,
}


def normalized_weights(weights: np.ndarray, total: Callable = lambda sums: sums) -> np.ndarray:
    """[n] ``weights`` of the trained rollouts scaled to mean 1 over those with a weight > 0 (the rollouts that
    stay in the update); all-zero weights stay zero.

    ``total`` sums (weight sum, weighted rollouts) over processes (``distributed.process_sum``),
    so every process scales by the same factor.
    """
    weights = np.asarray(weights, np.float64)
    if weights.size and (not np.all(np.isfinite(weights)) or weights.min() < 0):
        raise ValueError(f"vote weights must be finite and >= 0, got {weights[~(weights >= 0)][:4]} among "
                         f"{weights.size} rollouts")
    weight_sum, count = total(np.array([weights.sum(), np.count_nonzero(weights)], np.float64))
    return (weights * (count / weight_sum) if weight_sum > 0 else np.zeros_like(weights)).astype(np.float32)

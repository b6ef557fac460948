"""One OptPO / TTRL training step: rollouts -> rewards -> advantages -> GRPO or PPO update (``update.py``).

The step is the same for both methods; the stopping rule and the training rows differ
(OptPO: the Dirichlet posterior test, every rollout trained on; TTRL: the ``fixed`` rule
with 64 votes, GRPO on the first 32 with advantages over those 32).
Ground truth is read here only by the ``ground_truth`` reward (``rewards.REWARDS``);
``metrics.step_metrics`` reads it for metrics.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from optpo_jax.grpo import group_advantages
from optpo_jax.prior import update_prior
from optpo_jax.sprt import SPRTConfig
from optpo_jax.train.distributed import process_sum
from optpo_jax.train.learner import Learner
from optpo_jax.train.rewards import REWARDS, consensus_labels
from optpo_jax.train.rollouts import LookaheadCarry, Rollouts, collect_rollouts
from optpo_jax.train.state import TrainState
from optpo_jax.train.step_config import UpdateConfig
from optpo_jax.train.update import update_policy, update_rows
from optpo_jax.train.vote_weights import VOTE_WEIGHTS, normalized_weights


@dataclasses.dataclass
class StepOutput:
    """One step's results besides the new TrainState.

    Attributes:
      rollouts: the batch's retained rollouts and votes.
      rewards: [N] float32, 1 where a rollout's answer is its prompt's consensus.
      labels: [P] int32 consensus slot of each prompt (-1 without a vote).
      update_metrics: the update's means (loss, kl, ...), optimizer_steps, trained_rollouts, update_seconds.
      carry: the lookahead prompts' early votes, for the next step.
    """

    rollouts: Rollouts
    rewards: np.ndarray
    labels: np.ndarray
    update_metrics: dict
    carry: LookaheadCarry | None


_group_advantages_jit = jax.jit(group_advantages, static_argnames=("num_groups", "estimator"))


def rollout_advantages(rewards: np.ndarray, prompt_index: np.ndarray, num_prompts: int, estimator: str,
                       bucket: int = 256) -> np.ndarray:
    """[N] group advantages of N rollouts, computed jitted on N padded up to a multiple of ``bucket``.

    OptPO's N changes every step; unpadded, every step would compile group_advantages anew
    (measured: 0.7 s a step on the embedded task, against 0.01 s once compiled).
    """
    num_rollouts = len(rewards)
    padded = max(-(-num_rollouts // bucket), 1) * bucket
    mask = np.arange(padded) < num_rollouts
    pad = lambda values: np.pad(values, (0, padded - num_rollouts))
    advantages = _group_advantages_jit(pad(rewards), pad(prompt_index.astype(np.int32)), mask, num_prompts, estimator)
    return np.asarray(advantages)[:num_rollouts]


def subsample_rows(rollouts: Rollouts, config: UpdateConfig, rng: np.random.Generator) -> np.ndarray:
    """Indices of the rollouts each prompt trains on: all, or ``config.train_samples_per_prompt`` of them.

    ``subsample="first"``: each prompt's first k rollouts in draw order (TTRL's
    ``select_top_k_per_prompt``); ``"random"``: k chosen at random.
    """
    rows = np.arange(len(rollouts.prompt_index))
    if not config.train_samples_per_prompt:
        return rows
    chosen = []
    for prompt in np.unique(rollouts.prompt_index):
        members = rows[rollouts.prompt_index == prompt]  # in draw order
        take = min(config.train_samples_per_prompt, len(members))
        chosen.append(members[:take] if config.subsample == "first" else
                      np.sort(rng.choice(members, size=take, replace=False)))
    return np.concatenate(chosen)


def step_advantages(rewards: np.ndarray, rollouts: Rollouts, rows: np.ndarray, num_prompts: int,
                    config: UpdateConfig) -> np.ndarray:
    """[N] advantages of the batch's rollouts (0 outside ``rows``), each relative to its prompt's group.

    The group is the trained ``rows`` with ``subsample="first"`` (TTRL: advantages over the
    k it trains on) and every rollout of the prompt with ``"random"`` (all votes' mean and
    spread, then k trained on).
    """
    pool = rows if config.subsample == "first" else np.arange(len(rewards))
    group = np.zeros(len(rewards), np.float32)
    group[pool] = rollout_advantages(rewards[pool], rollouts.prompt_index[pool], num_prompts,
                                     config.advantage_estimator)
    advantages = np.zeros(len(rewards), np.float32)
    advantages[rows] = group[rows]
    return advantages


def training_rows(rollouts: Rollouts, rewards: np.ndarray, num_prompts: int, config: UpdateConfig,
                  sprt: SPRTConfig, rng: np.random.Generator, algorithm: str = "grpo") -> tuple[np.ndarray, np.ndarray]:
    """(rows the update trains on, [N] their weighted advantages): the per-prompt subsample, its group
    advantages times the vote weights (``vote_weights``), minus rows whose weighted advantage is 0.

    A group whose rewards are all equal has advantage 0 everywhere and no policy gradient,
    so it costs compute without moving the policy; a vote weight of 0 drops its rollouts too.
    With ``algorithm = "ppo"`` the critic, not the group, is the baseline, so every rollout of
    the subsample trains (but those of vote weight 0), and the [N] values are the vote weights
    its per-token GAE advantages are scaled by (``update.with_gae``).
    """
    rows = subsample_rows(rollouts, config, rng)
    if algorithm == "ppo":
        advantages = np.zeros(len(rewards), np.float32)
        advantages[rows] = 1.0
    else:
        advantages = step_advantages(rewards, rollouts, rows, num_prompts, config)
        rows = rows[advantages[rows] != 0]
    weights = VOTE_WEIGHTS[config.vote_weights](rollouts.prompt_index[rows], rewards[rows], rollouts.votes, sprt)
    advantages[rows] *= normalized_weights(weights, process_sum)
    return rows[advantages[rows] != 0], advantages


def training_step(state: TrainState, learner: Learner, problems: list, key: jax.Array, rng: np.random.Generator,
                  lookahead: list = (), carry: LookaheadCarry | None = None, progress: bool = False,
                  stage_seconds: dict | None = None) -> tuple[TrainState, StepOutput]:
    """One step on a batch of unlabeled ``problems``: rollouts, consensus rewards, advantages, update.

    ``lookahead`` / ``carry`` as in ``collect_rollouts``; ``key`` drives sampling and
    ``rng`` the update's row subsample and order. ``stage_seconds``: a dict to profile the
    step into: it waits for the device after each stage and adds the stage's seconds under
    "collect", "rewards", "advantages" (the rows and their weighted advantages), "rows" (their arrays) and
    "update" (a profile, not a training run:
    the waits cost time).
    """
    clock = _StageClock(stage_seconds)
    rollouts, next_carry = collect_rollouts(state.policy_params(), learner, problems, key, lookahead, carry,
                                            prior_state=state.prior_state, progress=progress)
    if state.prior_state is not None:
        state = state.replace(prior_state=update_prior(state.prior_state, rollouts.votes.counts, reduce=process_sum))
    clock.lap("collect", state.prior_state)
    start = time.perf_counter()
    rewards = REWARDS[learner.config.reward](rollouts, problems, learner.task)
    labels = consensus_labels(rollouts)
    clock.lap("rewards")
    rows, advantages = training_rows(rollouts, rewards, len(problems), learner.config.update, learner.config.sprt,
                                     rng, learner.config.algorithm)
    clock.lap("advantages")
    batch_rows = update_rows(rollouts, rows, advantages, rewards)
    clock.lap("rows")
    state, update_metrics = update_policy(state, batch_rows, learner, rng)
    clock.lap("update", state.params)
    update_metrics["update_seconds"] = time.perf_counter() - start
    trained = process_sum(np.array([len(rows), rollouts.completion_lengths[rows].sum()], np.int64))  # one exchange
    update_metrics["trained_rollouts"], update_metrics["trained_tokens"] = int(trained[0]), int(trained[1])
    return state, StepOutput(rollouts, rewards, labels, update_metrics, next_carry)


class _StageClock:
    """Adds the seconds since the last lap to ``stage_seconds[name]``, after waiting for ``pending`` device
    work; does nothing without a dict."""

    def __init__(self, stage_seconds: dict | None):
        self.stage_seconds, self.last = stage_seconds, time.perf_counter()

    def lap(self, name: str, pending=None) -> None:
        if self.stage_seconds is None:
            return
        jax.block_until_ready(pending)
        now = time.perf_counter()
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + now - self.last
        self.last = now

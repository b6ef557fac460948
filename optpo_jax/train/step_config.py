"""The static settings of one training step, built once from the experiment config (``setup.py``)."""

from __future__ import annotations

import dataclasses

from optpo_jax.field_ranges import INT, check_ranges, ranged
from optpo_jax.grpo import ADVANTAGE_ESTIMATORS, GRPOConfig
from optpo_jax.ppo import PPOConfig
from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig
from optpo_jax.train.vote_weights import VOTE_WEIGHTS

SUBSAMPLES = ("first", "random")
# "grpo": group advantages (``policy_update.advantage_estimator``); "ppo": a critic and GAE (``train.critic``).
ALGORITHMS = ("grpo", "ppo")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How retained rollouts become optimizer steps.

    Attributes:
      train_samples_per_prompt: rollouts of each prompt used for the update, after labelling
        with all of them (TTRL: 32 of 64); 0 uses every one.
      subsample: which ``train_samples_per_prompt`` (``SUBSAMPLES``): ``"first"``, the first
        k drawn, with advantages over those k (TTRL's recipe); ``"random"``, k at random, with
        advantages over all the prompt's rollouts (a lower-variance baseline than TTRL's).
      vote_weights: a key of ``train.vote_weights.VOTE_WEIGHTS``: how much each trained
        rollout counts, from its prompt's final vote (``all``: the same).
      min_rollouts_per_prompt: rollouts each prompt draws for the update even after its
        vote has stopped (the OptPO paper's N). The extra ones are rewarded against the
        vote's label and do not change it; 0: a prompt trains on its votes only.
      micro_batch_rows: rows per optimizer step (fixed shape; the last is padded).
      optimizer_steps: 0: as many optimizer steps as micro_batch_rows-sized chunks of the
        rows (so a stopping rule that draws fewer rollouts also takes fewer steps); k > 0:
        each epoch splits the rows into k near-equal optimizer steps whatever their number
        (fewer only with fewer rows than k; chunks of micro_batch_rows where k steps of
        micro_batch_rows cannot hold them).
      grad_accumulation: splits each optimizer step's rows into this many micro-batches
        whose gradients are summed exactly (memory: one micro-batch of activations).
      epochs: passes over the rollouts per training step.
      advantage_estimator: a key of ``grpo.ADVANTAGE_ESTIMATORS``.
      width_bucket: a micro-batch trains at the width of its longest sequence rounded up
        to a multiple of this (0: always prompt bucket + max_new_tokens).
      row_buckets: micro-batch row counts allowed: micro_batch_rows, its half, ... (this
        many sizes; 1: every micro-batch is padded to micro_batch_rows). Packed micro-batches
        always hold micro_batch_rows rollouts: their cost is the packed rows, whose count
        comes from ``packing.row_ladder``.
      pack_width: tokens per packed row (``train.packing``): each prompt once, followed by
        its completions, several prompts per row, log-probabilities from the head in chunks
        (``models.logprobs``); rows widen to the longest sequence if it is longer. 0: one
        rollout per row with full-vocabulary logits (the reference path; same update up to
        float rounding).
    """

    train_samples_per_prompt: int = ranged(0, INT, 0, 1024)
    subsample: str = "first"
    vote_weights: str = "all"
    min_rollouts_per_prompt: int = ranged(0, INT, 0, 1024)
    micro_batch_rows: int = ranged(256, INT, 1, 65536)
    optimizer_steps: int = ranged(0, INT, 0, 65536)
    grad_accumulation: int = ranged(1, INT, 1, 65536)
    epochs: int = ranged(1, INT, 1, 1000)
    advantage_estimator: str = "grpo"
    width_bucket: int = ranged(16, INT, 0, 65536)
    row_buckets: int = ranged(3, INT, 1, 16)
    pack_width: int = ranged(128, INT, 0, 1 << 20)

    def __post_init__(self):
        check_ranges(self)
        if self.micro_batch_rows % self.grad_accumulation:
            raise ValueError(f"grad_accumulation={self.grad_accumulation} must divide "
                             f"micro_batch_rows={self.micro_batch_rows}")
        if self.subsample not in SUBSAMPLES:
            raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {self.subsample!r}")
        if self.vote_weights not in VOTE_WEIGHTS:
            raise ValueError(f"vote_weights must be one of {tuple(VOTE_WEIGHTS)}, got {self.vote_weights!r}")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {tuple(ADVANTAGE_ESTIMATORS)}, got "
                             f"{self.advantage_estimator!r}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static a training step reads (hashable).

    Attributes:
      sprt: the stopping rule and vote budget.
      sampling: how rollouts are sampled.
      update: how rollouts become optimizer steps.
      grpo: the policy loss.
      rows_per_wave: rows of every sampler call, over all processes.
      reward: a key of ``train.rewards.REWARDS`` (``consensus``: test-time RL; ``ground_truth``: true labels).
      algorithm: one of ``ALGORITHMS``: ``grpo`` or ``ppo`` (a critic, GAE advantages: ``ppo``).
      ppo: the critic's settings, read with ``algorithm = "ppo"``.
    """

    sprt: SPRTConfig
    sampling: SamplingConfig
    update: UpdateConfig
    grpo: GRPOConfig
    rows_per_wave: int = ranged(dataclasses.MISSING, INT, 1, 65536)
    reward: str = "consensus"
    algorithm: str = "grpo"
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)

    def __post_init__(self):
        check_ranges(self)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        # A prompt's rollouts share its answer table, max_samples slots wide.
        if self.update.min_rollouts_per_prompt > self.sprt.max_samples:
            raise ValueError(f"policy_update.min_rollouts_per_prompt={self.update.min_rollouts_per_prompt} must not "
                             f"exceed sprt.max_samples={self.sprt.max_samples}")

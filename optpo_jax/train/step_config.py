"""The static settings of one training step, built once from the experiment config (``setup.py``)."""

from __future__ import annotations

import dataclasses

from optpo_jax.grpo import ADVANTAGE_ESTIMATORS, GRPOConfig
from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How retained rollouts become optimizer steps.

    Attributes:
      train_samples_per_prompt: rollouts of each prompt used for the update, chosen at
        random after labelling with all of them (TTRL: 32 of 64); 0 uses every one.
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
      advantage_mode: a key of ``grpo.ADVANTAGE_ESTIMATORS``.
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

    train_samples_per_prompt: int = 0
    min_rollouts_per_prompt: int = 0
    micro_batch_rows: int = 256
    optimizer_steps: int = 0
    grad_accumulation: int = 1
    epochs: int = 1
    advantage_mode: str = "grpo"
    width_bucket: int = 16
    row_buckets: int = 3
    pack_width: int = 128

    def __post_init__(self):
        if self.train_samples_per_prompt < 0:
            raise ValueError(f"train_samples_per_prompt must be >= 0, got {self.train_samples_per_prompt}")
        if self.min_rollouts_per_prompt < 0:
            raise ValueError(f"min_rollouts_per_prompt must be >= 0, got {self.min_rollouts_per_prompt}")
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {self.micro_batch_rows}")
        if self.optimizer_steps < 0:
            raise ValueError(f"optimizer_steps must be >= 0, got {self.optimizer_steps}")
        if self.grad_accumulation < 1 or self.micro_batch_rows % self.grad_accumulation:
            raise ValueError(f"grad_accumulation={self.grad_accumulation} must be >= 1 and divide "
                             f"micro_batch_rows={self.micro_batch_rows}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.width_bucket < 0 or self.row_buckets < 1:
            raise ValueError(f"width_bucket must be >= 0 and row_buckets >= 1, got {self.width_bucket}, "
                             f"{self.row_buckets}")
        if self.pack_width < 0:
            raise ValueError(f"pack_width must be >= 0, got {self.pack_width}")
        if self.advantage_mode not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_mode must be one of {tuple(ADVANTAGE_ESTIMATORS)}, got {self.advantage_mode!r}")


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
    """

    sprt: SPRTConfig
    sampling: SamplingConfig
    update: UpdateConfig
    grpo: GRPOConfig
    rows_per_wave: int
    reward: str = "consensus"

    def __post_init__(self):
        if self.rows_per_wave < 1:
            raise ValueError(f"rows_per_wave must be >= 1, got {self.rows_per_wave!r}")
        # A prompt's rollouts share its answer table, max_samples slots wide.
        if self.update.min_rollouts_per_prompt > self.sprt.max_samples:
            raise ValueError(f"policy_update.min_rollouts_per_prompt={self.update.min_rollouts_per_prompt} must not "
                             f"exceed sprt.max_samples={self.sprt.max_samples}")

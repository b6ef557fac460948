"""Which prompts each training step takes: seeded epochs of the training problems."""

from __future__ import annotations

import numpy as np


def batch_problems(problems: list, step: int, prompts_per_step: int, seed: int) -> list:
    """The prompts of ``step``: epochs of seeded permutations of ``problems`` (a pure function of step)."""
    per_epoch = len(problems) // prompts_per_step
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(problems))
    return [problems[i] for i in order[index * prompts_per_step : (index + 1) * prompts_per_step]]

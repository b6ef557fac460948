"""The fixed parts of training that every step reads: task, architecture, settings and the jitted update."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from optpo_jax.models.config import ModelConfig
from optpo_jax.tasks.base import Task
from optpo_jax.train.step_config import StepConfig


@dataclasses.dataclass(frozen=True)
class Learner:
    """The fixed parts of training, built once by ``setup.load_setup``.

    Attributes:
      task: prompts, answer extraction (and, for metrics only, grading).
      model_config: the policy's architecture.
      config: the step's static settings.
      update_step: ``update.make_update_step(model_config, optimizer, config.grpo, ...)``:
        ``(trained, opt_state, batch, base_params) -> (trained, opt_state, metrics)``; None for
        a learner that only collects rollouts (``rollouts.collect_rollouts``). Whether it trains LoRA
        adapters is the state's (``TrainState.lora``).
    """

    task: Task
    model_config: ModelConfig
    config: StepConfig
    update_step: Callable[..., tuple] | None = None

"""What training carries from step to step: ``TrainState``, its initial value and its restore from a checkpoint."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from optpo_jax.models.lora import LoRAConfig, init_adapters, merge_adapters_jit
from optpo_jax.prior import PriorState, init_prior_state, prior_from_json
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.critic import init_critic
from optpo_jax.train.distributed import mesh_of, replicate_unplaced
from optpo_jax.train.rollouts import LookaheadCarry
from optpo_jax.train.step_config import StepConfig


@struct.dataclass
class TrainState:
    """What a training step changes, and the fixed params it trains over and against.

    Attributes:
      params: what the optimizer trains: the policy's parameters (``nnx.State``, possibly
        sharded over a mesh) or, with ``lora``, the LoRA adapters (``models.lora``).
      opt_state: the optimizer's state (of ``params`` only).
      base_params: with LoRA, the frozen base weights under the adapters; None for full fine-tuning.
      reference_params: the KL term's reference policy, None when ``grpo.kl_coef`` is 0: a copy
        of the initial params (the update donates ``params``) or, with LoRA, ``base_params``
        itself (adapters off = the initial policy).
      prior_state: the stopping rule's learned prior (``sprt.learn_prior``), else None.
      lora: the LoRAConfig of the adapters, or None for full fine-tuning (static).
      critic: PPO's critic (``train.critic``: a copy of the policy or, with LoRA, its own adapters over
        ``base_params``, and a value head), None for GRPO.
      critic_opt_state: the critic's own optimizer state, None for GRPO.
    """

    params: Any
    opt_state: Any
    base_params: Any = None
    reference_params: Any = None
    prior_state: PriorState | None = None
    lora: LoRAConfig | None = struct.field(pytree_node=False, default=None)
    critic: Any = None
    critic_opt_state: Any = None

    def policy_params(self):
        """The current policy's full params: ``params``, or the base with the adapters merged in."""
        return self.params if self.lora is None else merge_adapters_jit(self.base_params, self.params, self.lora)

    def checkpointed(self) -> dict:
        """The arrays a checkpoint holds: ``{"params", "opt_state"}``, and with a critic ``"critic"`` and
        ``"critic_opt_state"`` (the rest is fixed or saved in the totals)."""
        arrays = {"params": self.params, "opt_state": self.opt_state}
        if self.critic is not None:
            arrays.update(critic=self.critic, critic_opt_state=self.critic_opt_state)
        return arrays


def init_train_state(params, optimizer: optax.GradientTransformation, step_config: StepConfig,
                     lora: LoRAConfig | None, seed: int,
                     critic_optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """The initial policy ``params``, the optimizer's state and, where the loss needs one, the KL reference.

    Full fine-tuning (``lora`` None) trains the params (against a copy of them when
    ``step_config.grpo.kl_coef`` > 0); with ``lora`` the optimizer trains fresh adapters
    (B = 0, drawn from ``seed``) over the frozen ``params``, which are also the reference.
    With ``step_config.algorithm = "ppo"``, a critic of the same params (``critic.init_critic``)
    and its ``critic_optimizer`` state.
    """
    with_reference = step_config.grpo.kl_coef > 0
    if lora is None:
        trained, base = params, None
        reference = jax.tree.map(jnp.copy, params) if with_reference else None  # a copy: the update donates params
    else:
        trained, base = replicate_unplaced(init_adapters(params, lora, seed=seed), mesh_of(params)), params
        reference = params if with_reference else None
    opt_state = replicate_unplaced(optimizer.init(trained), mesh_of(params))
    prior_state = init_prior_state() if step_config.sprt.learn_prior else None
    critic = critic_opt_state = None
    if step_config.algorithm == "ppo":
        if critic_optimizer is None:
            raise ValueError("algorithm 'ppo' needs the critic's optimizer (critic_optimizer), got None")
        critic = init_critic(params, lora, seed + 1)  # its adapters differ from the policy's
        critic_opt_state = replicate_unplaced(critic_optimizer.init(critic), mesh_of(params))
    return TrainState(params=trained, opt_state=opt_state, base_params=base, reference_params=reference,
                      prior_state=prior_state, lora=lora, critic=critic, critic_opt_state=critic_opt_state)


def restore_state(checkpointer: Checkpointer, state: TrainState,
                  step: int | None = None) -> tuple[TrainState, dict, LookaheadCarry | None]:
    """``state`` with the trained params (or adapters), optimizer state and prior of a checkpoint
    (the latest, or ``step``); also the saved totals (JSON) and lookahead carry."""
    saved, totals, carry = checkpointer.restore(state.checkpointed(), step)
    prior_state = prior_from_json(totals["prior"]) if state.prior_state is not None else None
    state = state.replace(params=saved["params"], opt_state=saved["opt_state"], prior_state=prior_state,
                          critic=saved.get("critic"), critic_opt_state=saved.get("critic_opt_state"))
    return state, totals, carry

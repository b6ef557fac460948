"""PPO with a learned critic: GAE advantages, the clipped value loss and a pure Optax PPO step.

References: PPO (arXiv 1707.06347), GAE (arXiv 1506.02438), and verl's recipe for LLMs
(``compute_gae_advantage_return``: the reward at a rollout's last token, the value after
it 0, advantages whitened over the batch; the value loss clipped around the sampling-time
values at ``cliprange_value``). The policy loss is ``grpo.policy_loss`` with per-token
advantages and ``grpo.value_loss``; the gradients of both come from ``grpo.accumulate_gradients``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optpo_jax.field_ranges import REAL, check_ranges, ranged
from optpo_jax.grpo import GRPOBatch, GRPOConfig, accumulate_gradients, apply_update


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static configuration of PPO's critic and advantages; validates itself on construction.

    Attributes:
      gamma: discount per token.
      lam: GAE's lambda (1: the discounted return minus the value, 0: the one-step TD error).
      value_clip: the new value is kept within ``value_clip`` of the sampling-time value in the
        clipped term of the value loss (verl's ``cliprange_value``).
      whiten_advantages: advantages scaled to mean 0 and standard deviation 1 over the batch's
        completion tokens (verl does); False keeps GAE's values.
    """

    gamma: float = ranged(1.0, REAL, 0.0, 1.0)
    lam: float = ranged(1.0, REAL, 0.0, 1.0)
    value_clip: float = ranged(0.5, REAL, 0.0, 1e6, low_inclusive=False)
    whiten_advantages: bool = True

    def __post_init__(self):
        check_ranges(self)
        if not isinstance(self.whiten_advantages, bool):
            raise TypeError(f"whiten_advantages must be True or False, got {self.whiten_advantages!r}")


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                   lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns of each rollout's masked tokens.

    Over the masked tokens t of a row, in order (unmasked tokens are skipped, and the value
    after the last masked token is 0):

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        G_t     = A_t + V_t

    where next(t) is the row's next masked token. Computed as a reverse ``lax.scan`` over
    the token axis; jits and vmaps.

    Args:
      rewards: [R, T] float32, the reward of each token (a consensus reward sits at each
        rollout's last completion token, 0 elsewhere).
      values: [R, T] float32, the critic's value of the state before each token.
      mask: [R, T] bool, the completion tokens.
      gamma, lam: the discount and GAE's lambda, in [0, 1].

    Returns:
      (advantages [R, T], returns [R, T]), float32, 0 where ``mask`` is False.
    """
    if rewards.ndim != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards, values, mask must all be [R, T]; got {rewards.shape}, {values.shape}, "
                         f"{mask.shape}")
    rewards = jnp.where(mask, rewards, 0.0).astype(jnp.float32)
    values = jnp.where(mask, values, 0.0).astype(jnp.float32)

    def backward(carry, column):
        next_value, next_advantage = carry
        reward, value, masked = column
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(masked, value, next_value), jnp.where(masked, advantage, next_advantage))
        return carry, jnp.where(masked, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(backward, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(mask, advantages + values, 0.0)


def whiten(values: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``values`` shifted and scaled to mean 0, standard deviation 1 over ``mask`` (0 off it)."""
    weight = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    mean = jnp.sum(values * weight) / count
    variance = jnp.sum(jnp.square(values - mean) * weight) / count
    return jnp.where(mask, (values - mean) * jax.lax.rsqrt(variance + eps), 0.0)


def ppo_step(
    params: dict,
    opt_state: optax.OptState,
    batch: GRPOBatch,
    logprob_fn: Callable[[Any, GRPOBatch], jax.Array],
    value_fn: Callable[[Any, GRPOBatch], jax.Array],
    optimizer: optax.GradientTransformation,
    config: GRPOConfig,
    ppo_config: PPOConfig,
    num_micro_batches: int = 1,
) -> tuple[dict, optax.OptState, dict[str, jax.Array]]:
    """One pure PPO update of a policy and its critic: ``accumulate_gradients`` then ``apply_update``.

    The same shape as ``grpo.grpo_step``, over ``params = {"policy": ..., "critic": ...}``:
    the policy's clipped loss (per-token ``batch.advantages``, from ``gae_advantages``)
    differentiates the policy only and the value loss the critic only, each divided by its
    own denominator.

    Args:
      params: ``{"policy": policy params, "critic": critic params}``.
      opt_state: ``optimizer.init(params)`` or a later state.
      batch: a GRPOBatch with [R, T] ``advantages``, ``old_values`` and ``returns``.
      logprob_fn: ``logprob_fn(policy params, batch) -> [R, T]`` log-probabilities of the targets.
      value_fn: ``value_fn(critic params, batch) -> [R, T]`` the value before each target.
      optimizer: an Optax transformation of the whole dict (``optax.multi_transform`` gives
        the critic its own learning rate).
      config: the policy loss.
      ppo_config: the value loss' clip.
      num_micro_batches: static M dividing R.

    Returns:
      (params, opt_state, metrics): as ``grpo_step``, plus value_loss and value_clip_fraction;
      skipped (nothing changed) when anything is not finite.
    """
    grads, loss, metrics = accumulate_gradients(params, batch, logprob_fn, config, num_micro_batches,
                                                value_fn=value_fn, value_clip=ppo_config.value_clip)
    grad_norm = optax.tree.norm(grads)
    new_params, new_opt_state, finite = apply_update(params, opt_state, grads, loss, optimizer)
    return new_params, new_opt_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite)

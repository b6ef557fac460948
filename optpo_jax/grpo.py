"""Group-relative advantages, the clipped policy and value losses and a pure Optax GRPO step.

References: GRPO (DeepSeekMath, arXiv 2402.03300), Dr.GRPO (arXiv 2503.20783) for
the unnormalised advantage and the sequence-mean-token-scale aggregation, DAPO
(arXiv 2503.14476) for the decoupled upper clip ``clip_eps_high``, and Schulman's
k3 estimator of KL(pi || pi_ref) (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from optpo_jax.field_ranges import INT, REAL, check_ranges, ranged


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Static configuration of the policy loss; validates itself on construction.

    Attributes:
      clip_eps: lower clip, the ratio is kept >= 1 - clip_eps.
      clip_eps_high: upper clip, the ratio is kept <= 1 + clip_eps_high.
      kl_coef: weight of the k3 KL penalty to the reference policy; 0 disables it and
        then no reference log-probabilities are needed.
      loss_aggregation: one of ``LOSS_AGGREGATIONS``.
      temperature: sampling temperature; a ``logprob_fn`` divides the logits by it so the
        recomputed log-probabilities match those of the sampler.
      token_scale: the constant T of ``seq-mean-token-scale`` (the generation budget,
        max_new_tokens); 0 uses the batch's token width, which changes with padding.
    """

    clip_eps: float = ranged(0.2, REAL, 0.0, 1.0, False, False)
    clip_eps_high: float = ranged(0.2, REAL, 0.0, 100.0, low_inclusive=False)
    kl_coef: float = ranged(0.0, REAL, 0.0, 1e6)
    loss_aggregation: str = "token-mean"
    # Training divides logits by it and trains on the sampled distribution: greedy (0) cannot be trained on.
    temperature: float = ranged(1.0, REAL, 0.0, 100.0, low_inclusive=False)
    token_scale: int = ranged(0, INT, 0, 1 << 30)

    def __post_init__(self):
        check_ranges(self)
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"GRPOConfig.loss_aggregation must be one of {tuple(LOSS_AGGREGATIONS)}, "
                f"got {self.loss_aggregation!r}"
            )


@struct.dataclass
class GRPOBatch:
    """R rollouts with T trained tokens each, and the model's input rows.

    Two layouts of the input rows. One rollout per row (``target_index`` None): the rows
    are the rollouts, [R, T], and position t's logits predict target_tokens[:, t]. Packed
    (``train.packing``): [P, L] rows each holding prompts once and their completions,
    and target_index[r, t] names the row token (row * L + column) predicting target t.

    Attributes:
      input_tokens: [R, T] or [P, L] int32 fed to the model.
      target_tokens: [R, T] int32 tokens whose log-probability is trained.
      loss_mask: [R, T] bool, True on completion tokens (not prompt, not padding).
      advantages: [R] float32 one advantage per rollout, or [R, T] one per token (PPO's GAE).
      old_logprobs: [R, T] float32 log-probabilities under the sampling policy.
      ref_logprobs: [R, T] float32 under the reference policy, or None if kl_coef = 0.
      positions: like input_tokens, int32 positions for the model (-1 on padding), or None for 0..T-1.
      groups, branches: [P, L] int32 of packed rows (``decoder.attention_mask``), else None.
      target_index: [R, T] int32 of packed rows, else None.
      old_values, returns: [R, T] float32 the critic's values at sampling time and the GAE
        returns (PPO, ``ppo.gae_advantages``), else None.
    """

    input_tokens: jax.Array
    target_tokens: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array | None = None
    positions: jax.Array | None = None
    groups: jax.Array | None = None
    branches: jax.Array | None = None
    target_index: jax.Array | None = None
    old_values: jax.Array | None = None
    returns: jax.Array | None = None


class GroupStats(NamedTuple):
    """What an advantage estimator reads, per rollout [R] (masked rows: 0 / False).

    Attributes:
      rewards: the rewards.
      centered: reward minus the mean of its group.
      variance: its group's unbiased (n - 1) variance.
      size: its group's number of rollouts n.
      mask: which rows are real rollouts.
      informative: a real rollout of a group of more than one whose rewards are not all equal.
    """

    rewards: jax.Array
    centered: jax.Array
    variance: jax.Array
    size: jax.Array
    mask: jax.Array
    informative: jax.Array


def grpo_advantage(stats: GroupStats, eps: float) -> jax.Array:
    """GRPO: (r - mean) / (std + eps), with the unbiased (n - 1) standard deviation (as verl)."""
    return jnp.where(stats.informative, stats.centered / (jnp.sqrt(stats.variance) + eps), 0.0)


def drgrpo_advantage(stats: GroupStats, eps: float) -> jax.Array:
    """Dr.GRPO: r - mean, no division by the group's spread."""
    del eps
    return jnp.where(stats.informative, stats.centered, 0.0)


def rloo_advantage(stats: GroupStats, eps: float) -> jax.Array:
    """RLOO (arXiv 2402.14740): r minus the mean of the group's other n - 1 rewards, n / (n - 1) (r - mean)."""
    del eps
    return jnp.where(stats.informative, stats.centered * stats.size / jnp.maximum(stats.size - 1.0, 1.0), 0.0)


def reinforce_pp_advantage(stats: GroupStats, eps: float) -> jax.Array:
    """REINFORCE++ (arXiv 2501.03262): the reward normalised over the batch, (r - mean) / (std + eps).

    No group baseline, so a group whose rewards all agree still gets a signal. The
    statistics are over the rollouts given (one per rollout, where OpenRLHF weighs each by
    its tokens; on several processes, over this process's rollouts); a batch whose rewards
    are all equal gives 0.
    """
    weight = stats.mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    mean = jnp.sum(stats.rewards * weight) / count
    std = jnp.sqrt(jnp.sum(jnp.square(stats.rewards - mean) * weight) / jnp.maximum(count - 1.0, 1.0))
    spread = jnp.max(jnp.where(stats.mask, stats.rewards, -jnp.inf)) > jnp.min(jnp.where(stats.mask, stats.rewards,
                                                                                             jnp.inf))
    return jnp.where(stats.mask & spread, (stats.rewards - mean) / (std + eps), 0.0)


# Advantage estimators: (GroupStats of R rollouts, eps) -> [R] advantages, 0 on masked rows.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[GroupStats, float], jax.Array]] = {
    "grpo": grpo_advantage,
    "drgrpo": drgrpo_advantage,
    "rloo": rloo_advantage,
    "reinforce_pp": reinforce_pp_advantage,
}


def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    mask: jax.Array,
    num_groups: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> jax.Array:
    """Advantages relative to each rollout's group, for groups of different sizes.

    ``estimator`` names one of ``ADVANTAGE_ESTIMATORS`` (``grpo``, ``drgrpo``, ``rloo``,
    ``reinforce_pp``). Masked rows give 0; so does, for the group-relative estimators
    (all but ``reinforce_pp``), a group of one rollout or one whose rewards are all equal.

    Args:
      rewards: [R] rewards.
      group_ids: [R] int32 group (prompt) of each rollout, in [0, num_groups).
      mask: [R] bool, which rows are real rollouts.
      num_groups: static number of groups G.
      estimator: a key of ``ADVANTAGE_ESTIMATORS``.
      eps: added to the standard deviation.

    Returns:
      [R] float32 advantages.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards, group_ids, mask must all be [R]; got {rewards.shape}, {group_ids.shape}, {mask.shape}")
    rewards = jnp.where(mask, rewards.astype(jnp.float32), 0.0)  # a NaN in a masked row stays out
    weight = mask.astype(jnp.float32)
    group_sum = lambda values: jax.ops.segment_sum(values, group_ids, num_segments=num_groups)
    size = group_sum(weight)
    mean = group_sum(rewards * weight) / jnp.maximum(size, 1.0)
    centered = rewards - mean[group_ids]
    highest = jax.ops.segment_max(jnp.where(mask, rewards, -jnp.inf), group_ids, num_segments=num_groups)
    lowest = jax.ops.segment_min(jnp.where(mask, rewards, jnp.inf), group_ids, num_segments=num_groups)
    # Spread tested exactly, so equal rewards give exactly 0 whatever the rounding of the mean.
    informative = mask & (size[group_ids] > 1) & (highest > lowest)[group_ids]
    variance = group_sum(weight * centered**2) / jnp.maximum(size - 1.0, 1.0)
    stats = GroupStats(rewards=rewards, centered=jnp.where(mask, centered, 0.0), variance=variance[group_ids],
                       size=size[group_ids], mask=mask, informative=informative)
    return jnp.where(mask, ADVANTAGE_ESTIMATORS[estimator](stats, eps), 0.0)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature) at the targets, in float32. [R, T, V] -> [R, T]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_mean_aggregation(token_sums, tokens, token_scale):
    """Every completion token weighs the same."""
    del token_scale
    return jnp.sum(token_sums), jnp.sum(tokens)


def seq_mean_token_mean_aggregation(token_sums, tokens, token_scale):
    """Mean over rollouts (with at least one token) of each rollout's token mean."""
    del token_scale
    return jnp.sum(token_sums / jnp.maximum(tokens, 1.0)), jnp.sum((tokens > 0).astype(jnp.float32))


def seq_mean_token_scale_aggregation(token_sums, tokens, token_scale):
    """Dr.GRPO: token sum over rollouts x T, a constant that favours neither short nor long answers."""
    return jnp.sum(token_sums), jnp.sum((tokens > 0).astype(jnp.float32)) * token_scale


# Loss aggregations: (per-rollout loss sums [R], per-rollout tokens [R], T) -> (sum, denominator).
LOSS_AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]] = {
    "token-mean": token_mean_aggregation,
    "seq-mean-token-mean": seq_mean_token_mean_aggregation,
    "seq-mean-token-scale": seq_mean_token_scale_aggregation,
}


def aggregate_loss(
    per_token_loss: jax.Array, loss_mask: jax.Array, mode: str, token_scale: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Sum and denominator of the loss, so micro-batches combine exactly.

    The loss is sum / denominator; over micro-batches it is sum(sums) / sum(denominators).
    ``mode`` names one of ``LOSS_AGGREGATIONS``; ``token_scale`` is the T of
    ``seq-mean-token-scale`` (0: the width of ``per_token_loss``, which moves with padding).

    Args:
      per_token_loss: [R, T] float32.
      loss_mask: [R, T] bool.
      mode: one of ``LOSS_AGGREGATIONS``.
      token_scale: T of ``seq-mean-token-scale``; 0 for the width.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {tuple(LOSS_AGGREGATIONS)}, got {mode!r}")
    token_sums = jnp.sum(jnp.where(loss_mask, per_token_loss, 0.0), axis=-1)
    tokens = jnp.sum(loss_mask.astype(jnp.float32), axis=-1)
    return LOSS_AGGREGATIONS[mode](token_sums, tokens, token_scale or per_token_loss.shape[-1])


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    config: GRPOConfig,
    ref_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-ratio policy loss with an optional k3 KL penalty.

    per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + kl_coef * k3,
    ratio = exp(logprobs - old_logprobs), k3 = exp(ref - logp) - (ref - logp) - 1.

    Args:
      logprobs: [R, T] under the policy being trained (differentiated).
      old_logprobs: [R, T] under the sampling policy.
      advantages: [R] one per rollout, or [R, T] one per token.
      loss_mask: [R, T] bool.
      config: clip range, KL weight and aggregation.
      ref_logprobs: [R, T] under the reference policy; required when kl_coef > 0.

    Returns:
      The scalar loss and metrics: loss_sum, loss_denominator, clip_fraction, kl,
      mean_advantage, mean_ratio (token means over the mask).
    """
    if logprobs.ndim != 2 or old_logprobs.shape != logprobs.shape or loss_mask.shape != logprobs.shape:
        raise ValueError(f"logprobs, old_logprobs, loss_mask must be [R, T]; got {logprobs.shape}, {old_logprobs.shape}, {loss_mask.shape}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [R] = {logprobs.shape[:1]} or [R, T] = {logprobs.shape}, got "
                         f"{advantages.shape}")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"GRPOConfig.kl_coef = {config.kl_coef} needs ref_logprobs, got None")
    # Masked entries are replaced, not multiplied by 0: a NaN in padding (NaN * 0 = NaN) must not
    # poison the loss or its gradient.
    rows = jnp.any(loss_mask, axis=-1)
    on_mask = lambda values: jnp.where(loss_mask, values, 0.0)
    logprobs, old_logprobs = on_mask(logprobs), on_mask(old_logprobs)
    token_advantages = advantages if advantages.ndim == 2 else advantages[:, None]
    advantage = jnp.where(loss_mask, token_advantages, 0.0).astype(jnp.float32)
    # A rollout's mean token advantage: its advantage, or the mean of its per-token ones.
    rollout_advantage = jnp.sum(advantage, axis=-1) / jnp.maximum(jnp.sum(loss_mask, axis=-1), 1)
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = ratio * advantage
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps_high) * advantage
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_token)
    if ref_logprobs is not None:
        log_ratio_ref = on_mask(ref_logprobs) - logprobs
        kl = jnp.exp(log_ratio_ref) - log_ratio_ref - 1.0
        per_token = per_token + config.kl_coef * kl
    loss_sum, denominator = aggregate_loss(per_token, loss_mask, config.loss_aggregation, config.token_scale)
    num_tokens = jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
    token_mean = lambda values: jnp.sum(on_mask(values)) / num_tokens
    metrics = {
        "loss_sum": loss_sum,
        "loss_denominator": denominator,
        "clip_fraction": token_mean((clipped < unclipped).astype(jnp.float32)),
        "kl": token_mean(kl),
        "mean_ratio": token_mean(ratio),
        "mean_advantage": jnp.sum(rollout_advantage) / jnp.maximum(jnp.sum(rows), 1),
    }
    return loss_sum / jnp.maximum(denominator, 1e-9), metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, loss_mask: jax.Array,
               value_clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped value loss: 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2), token-summed.

    Args:
      values: [R, T] the critic's values being trained.
      old_values: [R, T] its values when the rollouts were collected.
      returns: [R, T] GAE returns, the regression targets.
      loss_mask: [R, T] bool.
      value_clip: c.

    Returns:
      (loss sum over the masked tokens, metrics: value_loss_sum, value_tokens,
      value_clip_fraction (summed: divide by value_tokens)).
    """
    on_mask = lambda array: jnp.where(loss_mask, array, 0.0)
    values, old_values, returns = on_mask(values), on_mask(old_values), on_mask(returns)
    clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    unclipped_loss, clipped_loss = jnp.square(values - returns), jnp.square(clipped - returns)
    loss_sum = 0.5 * jnp.sum(on_mask(jnp.maximum(unclipped_loss, clipped_loss)))
    metrics = {"value_loss_sum": loss_sum, "value_tokens": jnp.sum(loss_mask.astype(jnp.float32)),
               "value_clip_fraction": jnp.sum(on_mask((clipped_loss > unclipped_loss).astype(jnp.float32)))}
    return loss_sum, metrics


def strided_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """Every leaf [N, ...] as [M, N / M, ...], micro-batch m holding rows m, m + M, m + 2M, ...

    Strided, not contiguous: rows sharded over devices stay spread over all of them in every
    micro-batch, and packed rows (``train.packing``) interleave their pieces the same way.
    """
    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"num_micro_batches={num_micro_batches} must divide every leading dimension, got {x.shape}")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(
    params: Any,
    batch: GRPOBatch,
    logprob_fn: Callable[[Any, GRPOBatch], jax.Array],
    config: GRPOConfig,
    num_micro_batches: int = 1,
    pullback: Callable[[Any], Any] | None = None,
    value_fn: Callable[[Any, GRPOBatch], jax.Array] | None = None,
    value_clip: float = 0.5,
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """Gradient of the batch's loss, accumulated exactly over ``num_micro_batches``.

    The micro-batches (``strided_micro_batches``) run in a ``lax.scan`` (activations of one
    at a time) and add up the loss numerator's gradient and the denominator, which divides
    at the end: the same gradient as the full batch, not a mean of means.

    With ``value_fn`` (PPO), ``params`` is ``{"policy": ..., "critic": ...}``: the policy loss
    differentiates the policy, ``value_loss`` (a token mean) the critic, and the loss is
    their sum.

    Args:
      params: what ``logprob_fn`` differentiates (with ``value_fn``: a dict of both models).
      batch: the rollouts; every leaf's leading dimension divisible by ``num_micro_batches``.
      logprob_fn: ``logprob_fn(params, micro_batch) -> [R, T]`` float32 log-probabilities of
        ``micro_batch.target_tokens`` (at ``config.temperature``); with ``value_fn`` it gets
        ``params["policy"]``.
      config: the loss.
      num_micro_batches: M.
      pullback: a linear map applied to each micro-batch's gradient before it is summed,
        so the sum lives in its (smaller) space: LoRA's gradient of the adapters from the
        gradient of the merged kernels. None: the gradient of ``params``.
      value_fn: ``value_fn(params["critic"], micro_batch) -> [R, T]`` the critic's values, trained
        towards ``batch.returns`` (clipped around ``batch.old_values`` at ``value_clip``); None: no critic.
      value_clip: the value loss' clip.

    Returns:
      (grads, loss, metrics): token-mean metrics (clip_fraction, kl, mean_ratio) and
      mean_advantage of the whole batch, plus loss_sum and loss_denominator; with a critic
      also value_loss and value_clip_fraction.
    """
    num_rows = batch.target_tokens.shape[0]
    if num_micro_batches < 1 or num_rows % num_micro_batches:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1 and divide the {num_rows} rows")
    if value_fn is not None and (batch.old_values is None or batch.returns is None):
        raise ValueError("a critic (value_fn) needs batch.old_values and batch.returns, got None")
    pullback = pullback or (lambda grads: grads)
    policy_of = (lambda trained: trained["policy"]) if value_fn is not None else (lambda trained: trained)

    def summed_loss(trained_params, micro_batch):
        logprobs = logprob_fn(policy_of(trained_params), micro_batch)
        _, metrics = policy_loss(logprobs, micro_batch.old_logprobs, micro_batch.advantages, micro_batch.loss_mask,
                                 config, micro_batch.ref_logprobs)
        if value_fn is None:
            return metrics["loss_sum"], metrics
        values = value_fn(trained_params["critic"], micro_batch)
        value_sum, value_metrics = value_loss(values, micro_batch.old_values, micro_batch.returns,
                                              micro_batch.loss_mask, value_clip)
        # The models share no parameter: each one's gradient is its own loss' (sums, divided at the end).
        return metrics["loss_sum"] + value_sum, dict(metrics, **value_metrics)

    def accumulate(carry, micro_batch):
        grads_sum, metric_sums = carry
        (_, metrics), grads = jax.value_and_grad(summed_loss, has_aux=True)(params, micro_batch)
        # Token-mean metrics are summed weighted by tokens (rows for the advantage), so padding
        # micro-batches count for nothing and the result is the full batch's mean.
        tokens = jnp.sum(micro_batch.loss_mask.astype(jnp.float32))
        rows = jnp.sum(jnp.any(micro_batch.loss_mask, axis=-1).astype(jnp.float32))
        weighted = {name: value * (rows if name == "mean_advantage" else tokens) for name, value in metrics.items()
                    if name in _TOKEN_MEAN_METRICS}
        weighted.update({name: value for name, value in metrics.items() if name not in _TOKEN_MEAN_METRICS},
                        tokens=tokens, rows=rows)
        return (jax.tree.map(jnp.add, grads_sum, pullback(grads)), jax.tree.map(jnp.add, metric_sums, weighted)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(pullback, params))
    metric_names = _TOKEN_MEAN_METRICS + ("loss_sum", "loss_denominator", "tokens", "rows")
    if value_fn is not None:
        metric_names += ("value_loss_sum", "value_tokens", "value_clip_fraction")
    metric_zeros = {name: jnp.zeros((), jnp.float32) for name in metric_names}
    (grads_sum, sums), _ = jax.lax.scan(accumulate, (zeros, metric_zeros),
                                        strided_micro_batches(batch, num_micro_batches))
    denominator = jnp.maximum(sums["loss_denominator"], 1e-9)
    metrics = {name: sums[name] / jnp.maximum(sums["rows" if name == "mean_advantage" else "tokens"], 1.0)
               for name in _TOKEN_MEAN_METRICS}
    metrics.update(loss_sum=sums["loss_sum"], loss_denominator=sums["loss_denominator"])
    if value_fn is None:
        return jax.tree.map(lambda g: g / denominator, grads_sum), sums["loss_sum"] / denominator, metrics
    value_tokens = jnp.maximum(sums["value_tokens"], 1.0)
    grads = {"policy": jax.tree.map(lambda g: g / denominator, grads_sum["policy"]),
             "critic": jax.tree.map(lambda g: g / value_tokens, grads_sum["critic"])}
    metrics.update(value_loss=sums["value_loss_sum"] / value_tokens,
                   value_clip_fraction=sums["value_clip_fraction"] / value_tokens)
    return grads, sums["loss_sum"] / denominator + metrics["value_loss"], metrics


_TOKEN_MEAN_METRICS = ("clip_fraction", "kl", "mean_ratio", "mean_advantage")


def apply_update(
    params: Any, opt_state: optax.OptState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation
) -> tuple[Any, optax.OptState, jax.Array]:
    """One optimizer update, skipped (params and state unchanged) unless the loss, every gradient
    and the new params and optimizer state are all finite.

    Written out rather than ``optax.apply_if_finite``: that checks the gradients only (an
    optimizer can still turn finite gradients into non-finite params, e.g. a NaN learning
    rate), adds its counters to the optimizer state (so to every checkpoint), and hides the
    skip from the step's metrics. Returns (params, opt_state, finite).
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves((grads, new_params, new_opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(leaf))
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep_if_finite(new_params, params), keep_if_finite(new_opt_state, opt_state), finite


def grpo_step(
    params: Any,
    opt_state: optax.OptState,
    batch: GRPOBatch,
    logprob_fn: Callable[[Any, GRPOBatch], jax.Array],
    optimizer: optax.GradientTransformation,
    config: GRPOConfig,
    num_micro_batches: int = 1,
) -> tuple[Any, optax.OptState, dict[str, jax.Array]]:
    """One pure GRPO update: ``accumulate_gradients`` then ``apply_update``.

    Args:
      params: parameter pytree (for example a Flax NNX ``nnx.State``).
      opt_state: ``optimizer.init(params)`` or a later state.
      batch: the rollouts, advantages and old log-probabilities.
      logprob_fn: ``logprob_fn(params, batch) -> [R, T]`` float32 log-probabilities of
        ``batch.target_tokens`` at the sampling temperature; from logits [R, T, V] that is
        ``token_logprobs(logits, batch.target_tokens, config.temperature)``.
      optimizer: an Optax gradient transformation.
      config: the loss configuration.
      num_micro_batches: static M dividing R; gradients are accumulated exactly over M
        micro-batches (memory: one micro-batch of activations).

    Returns:
      (params, opt_state, metrics). When the loss, any gradient or the updated params or
      optimizer state is not finite the update is skipped, params and opt_state come back
      unchanged and ``metrics["skipped"]`` is True. Token-mean metrics (clip_fraction, kl,
      mean_ratio) and mean_advantage are those of the whole batch.
    """
    grads, loss, metrics = accumulate_gradients(params, batch, logprob_fn, config, num_micro_batches)
    grad_norm = optax.tree.norm(grads)
    new_params, new_opt_state, finite = apply_update(params, opt_state, grads, loss, optimizer)
    return new_params, new_opt_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite)

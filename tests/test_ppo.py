"""optpo_jax/ppo.py and the critic's side of grpo.py: GAE, whitening, the clipped value loss, ppo_step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optpo_jax.grpo import GRPOBatch, GRPOConfig, accumulate_gradients, value_loss
from optpo_jax.ppo import PPOConfig, gae_advantages, ppo_step, whiten


def gae_numpy_loop(rewards, values, mask, gamma, lam):
    """The reference: GAE written as a plain loop over each row's masked tokens, last to first."""
    advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        next_value = next_advantage = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[row, t]:
                continue
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[row, t]
            advantages[row, t], returns[row, t] = next_advantage, next_advantage + values[row, t]
    return advantages, returns


def _random_case(seed, rows, tokens, contiguous):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, tokens)).astype(np.float32)
    if contiguous:  # completions: a prompt part, then the completion's tokens, then padding
        start = rng.integers(0, tokens, rows)
        length = rng.integers(0, tokens + 1, rows)
        columns = np.arange(tokens)[None]
        mask = (columns >= start[:, None]) & (columns < (start + length)[:, None])
    else:
        mask = rng.random((rows, tokens)) < 0.6
    rewards = np.where(mask, rng.normal(size=(rows, tokens)), 0.0).astype(np.float32)
    return rewards, values, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("contiguous", [True, False])
def test_gae_matches_a_numpy_loop_on_random_shapes_and_masks(seed, contiguous):
    rng = np.random.default_rng(100 + seed)
    rows, tokens = int(rng.integers(1, 7)), int(rng.integers(1, 13))
    gamma, lam = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.0, 1.0))
    rewards, values, mask = _random_case(seed, rows, tokens, contiguous)
    expected = gae_numpy_loop(rewards, values, mask, gamma, lam)
    eager = gae_advantages(rewards, values, mask, gamma, lam)
    jitted = jax.jit(gae_advantages, static_argnames=("gamma", "lam"))(rewards, values, mask, gamma=gamma, lam=lam)
    for got in (eager, jitted):
        for array, reference in zip(got, expected, strict=True):
            np.testing.assert_allclose(np.asarray(array), reference, rtol=1e-5, atol=1e-5)


def test_gae_vmaps_over_a_batch_of_batches():
    cases = [_random_case(seed, 3, 5, True) for seed in range(4)]
    rewards, values, mask = (np.stack(parts) for parts in zip(*cases, strict=True))
    advantages, returns = jax.vmap(lambda r, v, m: gae_advantages(r, v, m, 0.9, 0.8))(rewards, values, mask)
    for index, case in enumerate(cases):
        expected_advantages, expected_returns = gae_numpy_loop(*case, 0.9, 0.8)
        np.testing.assert_allclose(np.asarray(advantages[index]), expected_advantages, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(returns[index]), expected_returns, rtol=1e-5, atol=1e-5)


def test_with_zero_values_and_gamma_lam_one_every_token_gets_its_rollouts_reward():
    # The consensus reward sits at each completion's last token; the critic says 0 everywhere.
    mask = np.array([[False, True, True, True, False], [True, True, False, False, False]])
    rewards = np.zeros((2, 5), np.float32)
    rewards[0, 3], rewards[1, 1] = 1.0, 0.0
    advantages, returns = gae_advantages(rewards, np.zeros((2, 5), np.float32), mask, 1.0, 1.0)
    expected = np.where(mask, np.array([[1.0], [0.0]]), 0.0)
    np.testing.assert_array_equal(np.asarray(advantages), expected)
    np.testing.assert_array_equal(np.asarray(returns), expected)


def test_gae_by_hand_one_step_td_and_monte_carlo():
    rewards = np.array([[0.0, 0.0, 2.0]], np.float32)
    values = np.array([[0.5, 1.0, 1.5]], np.float32)
    mask = np.ones((1, 3), bool)
    td, _ = gae_advantages(rewards, values, mask, 0.9, 0.0)  # lam 0: r + gamma V' - V
    np.testing.assert_allclose(np.asarray(td), [[0.9 * 1.0 - 0.5, 0.9 * 1.5 - 1.0, 2.0 - 1.5]], rtol=1e-6)
    monte_carlo, returns = gae_advantages(rewards, values, mask, 0.9, 1.0)  # lam 1: discounted return - V
    np.testing.assert_allclose(np.asarray(returns), [[0.81 * 2.0, 0.9 * 2.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(monte_carlo), [[1.62 - 0.5, 1.8 - 1.0, 2.0 - 1.5]], rtol=1e-6)


def test_whiten_gives_mean_zero_unit_variance_on_the_mask_only():
    values = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[True, True, True, False]])
    whitened = np.asarray(whiten(values, mask))
    np.testing.assert_allclose(whitened[0, :3], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2.0 / 3.0), rtol=1e-4)
    assert whitened[0, 3] == 0.0


def test_value_loss_by_hand():
    values = jnp.array([[1.0, 0.0, 5.0]])
    old_values = jnp.array([[0.0, 0.0, 0.0]])
    returns = jnp.array([[2.0, 1.0, 9.0]])
    mask = jnp.array([[True, True, False]])
    loss_sum, metrics = value_loss(values, old_values, returns, mask, value_clip=0.5)
    # token 0: unclipped (1 - 2)^2 = 1, clipped (0.5 - 2)^2 = 2.25 -> 2.25; token 1: 1 and 1 -> 1; token 2 masked.
    assert float(loss_sum) == pytest.approx(0.5 * (2.25 + 1.0))
    assert float(metrics["value_tokens"]) == 2 and float(metrics["value_clip_fraction"]) == 1


def _tiny_models(seed=0):
    """A linear 'policy' (logits = embedding[token] @ w) and 'critic' (value = embedding[token] @ v)."""
    rng = np.random.default_rng(seed)
    policy = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
    critic = {"v": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    embedding = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def logprob_fn(params, batch):
        logits = embedding[batch.input_tokens] @ params["w"]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), batch.target_tokens[..., None], -1)[..., 0]

    value_fn = lambda params, batch: embedding[batch.input_tokens] @ params["v"]
    rows, tokens = 4, 5
    batch = GRPOBatch(
        input_tokens=jnp.asarray(rng.integers(0, 6, (rows, tokens)), jnp.int32),
        target_tokens=jnp.asarray(rng.integers(0, 6, (rows, tokens)), jnp.int32),
        loss_mask=jnp.asarray(np.arange(tokens)[None] < np.array([[5], [3], [4], [2]])),
        advantages=jnp.asarray(rng.normal(size=(rows, tokens)), jnp.float32),
        old_logprobs=jnp.full((rows, tokens), -1.5, jnp.float32),
        old_values=jnp.asarray(rng.normal(size=(rows, tokens)), jnp.float32),
        returns=jnp.asarray(rng.normal(size=(rows, tokens)), jnp.float32))
    return {"policy": policy, "critic": critic}, batch, logprob_fn, value_fn


def test_the_value_loss_gradient_reaches_the_critic_only_and_the_policy_loss_the_policy_only():
    params, batch, logprob_fn, value_fn = _tiny_models()
    config = GRPOConfig()
    grads, _, metrics = accumulate_gradients(params, batch, logprob_fn, config, value_fn=value_fn, value_clip=0.5)
    # The critic's gradient is the value loss' alone (its token mean), the policy's the policy loss' alone.
    value_only = jax.grad(lambda critic: value_loss(value_fn(critic, batch), batch.old_values, batch.returns,
                                                    batch.loss_mask, 0.5)[0] / jnp.sum(batch.loss_mask))(
        params["critic"])
    policy_only, _, _ = accumulate_gradients(params["policy"], batch, logprob_fn, config)
    np.testing.assert_allclose(np.asarray(grads["critic"]["v"]), np.asarray(value_only["v"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["policy"]["w"]), np.asarray(policy_only["w"]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(grads["critic"]["v"])).max() > 0 and float(metrics["value_loss"]) > 0
    # Dropping the value loss' targets changes the critic's gradient and not the policy's.
    moved = batch.replace(returns=batch.returns + 1.0)
    grads_moved, _, _ = accumulate_gradients(params, moved, logprob_fn, config, value_fn=value_fn)
    np.testing.assert_array_equal(np.asarray(grads_moved["policy"]["w"]), np.asarray(grads["policy"]["w"]))
    assert not np.allclose(np.asarray(grads_moved["critic"]["v"]), np.asarray(grads["critic"]["v"]))


def test_micro_batches_accumulate_the_critic_exactly():
    params, batch, logprob_fn, value_fn = _tiny_models(1)
    whole = accumulate_gradients(params, batch, logprob_fn, GRPOConfig(), 1, value_fn=value_fn)
    split = accumulate_gradients(params, batch, logprob_fn, GRPOConfig(), 2, value_fn=value_fn)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole[0], split[0])
    assert float(whole[1]) == pytest.approx(float(split[1]), rel=1e-5)


def test_ppo_step_lowers_the_value_loss_and_skips_a_non_finite_update():
    params, batch, logprob_fn, value_fn = _tiny_models(2)
    optimizer = optax.multi_transform({"policy": optax.sgd(0.01), "critic": optax.sgd(0.1)},
                                      {"policy": "policy", "critic": "critic"})
    opt_state = optimizer.init(params)
    step = jax.jit(lambda p, s, b: ppo_step(p, s, b, logprob_fn, value_fn, optimizer, GRPOConfig(), PPOConfig()))
    new_params, _, metrics = step(params, opt_state, batch)
    _, _, after = step(new_params, opt_state, batch)
    assert float(after["value_loss"]) < float(metrics["value_loss"]) and not bool(metrics["skipped"])
    broken = batch.replace(returns=batch.returns.at[0, 0].set(jnp.nan))
    same, _, skipped = step(params, opt_state, broken)
    assert bool(skipped["skipped"])
    jax.tree.map(np.testing.assert_array_equal, same, params)


def test_a_critic_without_values_or_returns_is_an_error():
    params, batch, logprob_fn, value_fn = _tiny_models()
    with pytest.raises(ValueError, match="old_values and batch.returns"):
        accumulate_gradients(params, batch.replace(returns=None), logprob_fn, GRPOConfig(), value_fn=value_fn)


@pytest.mark.parametrize(("field", "value"), [("gamma", 1.5), ("lam", -0.1), ("value_clip", 0.0)])
def test_ppo_config_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})

"""optpo_jax/grpo.py: advantages, loss aggregation, grpo_step's gradients and skipped updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optpo_jax import GRPOBatch, GRPOConfig, group_advantages, grpo_step, policy_loss
from optpo_jax.grpo import ADVANTAGE_ESTIMATORS, aggregate_loss, token_logprobs

REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32)


GROUPS = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)


def test_grpo_advantages_for_unequal_groups_by_hand(maybe_jit):
    # Group 0 = (1, 0, 0): mean 1/3, unbiased std sqrt(1/3). Group 1 = (1, 1, 0, 0): mean 1/2, std sqrt(1/3).
    advantages = maybe_jit(group_advantages, static_argnums=(3, 4))(
        jnp.asarray(REWARDS), jnp.asarray(GROUPS), jnp.ones(7, bool), 2, "grpo"
    )
    std = np.sqrt(1 / 3) + 1e-6
    want = np.array([2 / 3, -1 / 3, -1 / 3, 0.5, 0.5, -0.5, -0.5]) / std
    np.testing.assert_allclose(advantages, want, rtol=1e-5)


def test_drgrpo_singletons_zero_spread_and_masked_rows_give_zero():
    rewards = jnp.array([1.0, 0.0, 0.3, 0.3, 0.3, 1.0, 5.0, 0.0])
    groups = jnp.array([0, 0, 1, 1, 1, 2, 3, 3])
    mask = jnp.array([True, True, True, True, True, True, True, False])
    got = group_advantages(rewards, groups, mask, 4, "drgrpo")
    # group 0 -> +-0.5; group 1 all equal -> 0; group 2 and group 3 (one real row) -> 0.
    np.testing.assert_array_equal(np.asarray(got), [0.5, -0.5, 0, 0, 0, 0, 0, 0])


def test_advantage_estimator_is_validated():
    with pytest.raises(ValueError, match="estimator must be one of .*'reinforce_pp'.*got 'ppo'"):
        group_advantages(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2, bool), 1, "ppo")


def _variable_groups(seed=0, sizes=(4, 7, 64, 1, 5)):
    """Rewards of groups as OptPO draws them (4 to 64 rollouts; a singleton; an all-agreeing group), interleaved,
    with two masked rows."""
    rng = np.random.default_rng(seed)
    groups = np.concatenate([np.full(size, group) for group, size in enumerate(sizes)])
    rewards = (rng.random(len(groups)) < 0.6).astype(np.float32)
    rewards[groups == 4] = 1.0  # every vote agrees
    order = rng.permutation(len(groups))
    groups, rewards = groups[order], rewards[order]
    mask = np.ones(len(groups), bool)
    mask[[3, 11]] = False
    return rewards, groups.astype(np.int32), mask, len(sizes)


def test_rloo_is_each_reward_minus_the_mean_of_the_others_by_hand(maybe_jit):
    rewards, groups, mask, num_groups = _variable_groups()
    got = np.asarray(maybe_jit(group_advantages, static_argnums=(3, 4))(rewards, groups, mask, num_groups, "rloo"))
    want = np.zeros(len(rewards))
    for row in np.flatnonzero(mask):
        others = [r for other, (r, g) in enumerate(zip(rewards, groups, strict=True))
                  if g == groups[row] and other != row and mask[other]]
        if others:  # a singleton has no leave-one-out baseline: 0
            want[row] = rewards[row] - np.mean(others)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got[groups == 2]).max() > 0  # the 64-rollout group got its signal


def test_reinforce_pp_normalises_over_the_batch_by_hand(maybe_jit):
    rewards, groups, mask, num_groups = _variable_groups(1)
    got = np.asarray(maybe_jit(group_advantages, static_argnums=(3, 4))(rewards, groups, mask, num_groups,
                                                                        "reinforce_pp"))
    real = rewards[mask]
    want = np.where(mask, (rewards - real.mean()) / (real.std(ddof=1) + 1e-6), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[(groups == 4) & mask] > 0)  # no group baseline: an all-agreeing group still gets a signal
    # A batch whose rewards all agree carries no signal.
    agreeing = group_advantages(jnp.ones(5), jnp.array([0, 0, 1, 1, 1]), jnp.ones(5, bool), 2, "reinforce_pp")
    np.testing.assert_array_equal(np.asarray(agreeing), np.zeros(5))


@pytest.mark.parametrize(
    "mode, want",
    [
        ("token-mean", (1 + 2 + 3 + 10) / 4),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 10 / 1) / 2),
        ("seq-mean-token-scale", (1 + 2 + 3 + 10) / (2 * 4)),
    ],
)
def test_loss_aggregation_by_hand(mode, want):
    per_token = jnp.array([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    total, denominator = aggregate_loss(per_token, mask, mode)
    assert float(total / denominator) == pytest.approx(want)


def test_token_scale_makes_the_dr_grpo_denominator_independent_of_padding():
    per_token = jnp.array([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    wider = (jnp.pad(per_token, ((0, 0), (0, 5))), jnp.pad(mask, ((0, 0), (0, 5))))
    for scale, same in ((0, False), (16, True)):
        narrow_loss = aggregate_loss(per_token, mask, "seq-mean-token-scale", scale)
        wide_loss = aggregate_loss(*wider, "seq-mean-token-scale", scale)
        ratio = lambda pair: float(pair[0] / pair[1])
        assert (ratio(narrow_loss) == pytest.approx(ratio(wide_loss))) == same
    assert ratio(aggregate_loss(per_token, mask, "seq-mean-token-scale", 16)) == pytest.approx(16 / (2 * 16))


def _toy_batch(rng, advantages, num_tokens=3, vocab=5):
    rows = advantages.shape[0]
    logits = jnp.asarray(rng.normal(size=(rows, num_tokens, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, num_tokens)), jnp.int32)
    mask = jnp.asarray(rng.random((rows, num_tokens)) < 0.8).at[:, 0].set(True)
    old = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    batch = GRPOBatch(
        input_tokens=targets, target_tokens=targets, loss_mask=mask, advantages=advantages, old_logprobs=old
    )
    return {"logits": logits}, batch


def _apply_table(params, batch):
    """The toy policy's logits are its parameters."""
    return token_logprobs(params["logits"], batch.target_tokens)


def test_gradient_on_two_group_toy_matches_hand_computation():
    rng = np.random.default_rng(0)
    advantages = group_advantages(jnp.asarray(REWARDS), jnp.asarray(GROUPS), jnp.ones(7, bool), 2)
    params, batch = _toy_batch(rng, advantages)
    config = GRPOConfig(loss_aggregation="token-mean")
    def loss(p):
        logprobs = token_logprobs(p["logits"], batch.target_tokens)
        return policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.loss_mask, config)[0]

    grad = jax.grad(loss)(params)["logits"]
    # By hand: at ratio 1, d(-A * ratio)/d logits = -A * (onehot(target) - softmax), over N tokens.
    probs = np.asarray(jax.nn.softmax(params["logits"]))
    onehot = np.eye(5)[np.asarray(batch.target_tokens)]
    mask = np.asarray(batch.loss_mask, np.float64)
    hand = -np.asarray(advantages)[:, None, None] * (onehot - probs) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), hand, atol=1e-6)


def test_clipped_tokens_carry_no_gradient_and_are_counted():
    logp = jnp.log(jnp.array([[0.5, 0.5]]))
    old = logp - jnp.log(1.5)  # ratio 1.5, outside [0.8, 1.2]
    mask = jnp.ones((1, 2), bool)
    config = GRPOConfig(clip_eps=0.2, clip_eps_high=0.2)
    for advantage, clip_fraction, grad_is_zero in [(1.0, 1.0, True), (-1.0, 0.0, False)]:
        advantages = jnp.array([advantage])
        _, metrics = policy_loss(logp, old, advantages, mask, config)
        grad = jax.grad(lambda lp, a=advantages: policy_loss(lp, old, a, mask, config)[0])(logp)
        assert float(metrics["clip_fraction"]) == clip_fraction
        assert bool(jnp.all(grad == 0)) == grad_is_zero


def test_k3_kl_value_and_its_zero_gradient_at_the_reference():
    logp = jnp.array([[-1.0, -2.0]])
    mask = jnp.ones((1, 2), bool)
    config = GRPOConfig(kl_coef=0.5)
    ref = logp + jnp.array([[0.3, -0.2]])
    _, metrics = policy_loss(logp, logp, jnp.zeros(1), mask, config, ref)
    d = np.array([0.3, -0.2])
    assert float(metrics["kl"]) == pytest.approx(np.mean(np.exp(d) - d - 1), rel=1e-5)
    grad = jax.grad(lambda lp: policy_loss(lp, logp, jnp.zeros(1), mask, config, logp)[0])(logp)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp, jnp.zeros(1), mask, config)


def test_zero_advantage_group_gets_zero_gradient_and_sgd_step_matches(maybe_jit):
    rng = np.random.default_rng(1)
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])  # group 0 unanimous, group 1 mixed
    advantages = group_advantages(rewards, jnp.array([0, 0, 0, 1, 1]), jnp.ones(5, bool), 2)
    params, batch = _toy_batch(rng, advantages)
    config = GRPOConfig()
    optimizer = optax.sgd(0.1)
    step = maybe_jit(functools.partial(grpo_step, logprob_fn=_apply_table, optimizer=optimizer, config=config))
    new_params, _, metrics = step(params, optimizer.init(params), batch)
    change = np.asarray(new_params["logits"] - params["logits"])
    np.testing.assert_array_equal(change[:3], 0.0)
    assert np.abs(change[3:]).max() > 1e-4 and not bool(metrics["skipped"])
    grad = jax.grad(lambda p: grpo_step(p, optimizer.init(p), batch, _apply_table, optimizer, config)[2]["loss"])
    np.testing.assert_allclose(change, -0.1 * np.asarray(grad(params)["logits"]), atol=1e-6)


def test_jit_and_eager_steps_agree():
    rng = np.random.default_rng(2)
    params, batch = _toy_batch(rng, jnp.array([1.0, -0.5, 0.25]))
    optimizer, config = optax.adam(1e-2), GRPOConfig(loss_aggregation="seq-mean-token-scale")
    step = functools.partial(grpo_step, logprob_fn=_apply_table, optimizer=optimizer, config=config)
    eager = step(params, optimizer.init(params), batch)
    jitted = jax.jit(step)(params, optimizer.init(params), batch)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    rng = np.random.default_rng(3)
    params, batch = _toy_batch(rng, jnp.array([1.0, -1.0]))
    batch = batch.replace(old_logprobs=batch.old_logprobs.at[0, 0].set(jnp.nan))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    new_params, new_state, metrics = jax.jit(
        functools.partial(grpo_step, logprob_fn=_apply_table, optimizer=optimizer, config=GRPOConfig())
    )(params, opt_state, batch)
    assert bool(metrics["skipped"])
    for got, want in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_micro_batches_combine_exactly_through_sum_and_denominator():
    rng = np.random.default_rng(4)
    per_token = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((6, 5)) < 0.6)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-scale"):
        total, denominator = aggregate_loss(per_token, mask, mode)
        parts = [aggregate_loss(per_token[i : i + 2], mask[i : i + 2], mode) for i in (0, 2, 4)]
        combined = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert float(combined) == pytest.approx(float(total / denominator), rel=1e-5)


def test_config_names_field_and_value():
    with pytest.raises(ValueError, match="GRPOConfig.loss_aggregation.*'mean'"):
        GRPOConfig(loss_aggregation="mean")
    with pytest.raises(ValueError, match="GRPOConfig.kl_coef.*-0.1"):
        GRPOConfig(kl_coef=-0.1)


def _tiny_batch(num_rows=2, width=3, vocab=5):
    rng = np.random.default_rng(0)
    mask = np.zeros((num_rows, width), bool)
    mask[0] = True
    return GRPOBatch(input_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, width)), jnp.int32),
                     target_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, width)), jnp.int32),
                     loss_mask=jnp.asarray(mask), advantages=jnp.array([1.0, 0.0]),
                     old_logprobs=jnp.full((num_rows, width), -1.6))


def _apply(params, batch):
    return token_logprobs(jax.nn.one_hot(batch.input_tokens, params["w"].shape[0]) @ params["w"], batch.target_tokens)


def test_a_nan_in_a_padding_row_does_not_skip_the_update():
    params = {"w": jnp.eye(5) * 0.1}
    optimizer = optax.sgd(0.5)
    clean = _tiny_batch()
    poisoned = clean.replace(advantages=clean.advantages.at[1].set(jnp.nan),
                             old_logprobs=clean.old_logprobs.at[1].set(jnp.nan))
    expected, _, _ = grpo_step(params, optimizer.init(params), clean, _apply, optimizer, GRPOConfig())
    got, _, metrics = grpo_step(params, optimizer.init(params), poisoned, _apply, optimizer, GRPOConfig())
    assert not bool(metrics["skipped"])
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(expected["w"]))


def test_an_update_to_non_finite_params_is_skipped():
    params = {"w": jnp.eye(5) * 0.1}
    optimizer = optax.chain(optax.sgd(0.5), optax.scale(float("nan")))  # finite gradients, NaN params
    new_params, _, metrics = grpo_step(params, optimizer.init(params), _tiny_batch(), _apply, optimizer,
                                       GRPOConfig())
    assert bool(metrics["skipped"]) and np.isfinite(float(metrics["grad_norm"]))
    np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))


def test_a_new_advantage_estimator_is_one_function_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(ADVANTAGE_ESTIMATORS, "sign", lambda stats, eps: jnp.sign(stats.centered))
    advantages = group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 1.0]), jnp.array([0, 0, 0, 1, 1]),
                                  jnp.ones(5, bool), 2, estimator="sign")
    np.testing.assert_array_equal(np.asarray(advantages), [1.0, -1.0, -1.0, 0.0, 0.0])

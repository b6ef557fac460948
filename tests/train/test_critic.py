"""optpo_jax/train/critic.py and PPO's path through the update: the critic, GAE of real rollouts, layouts, state."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optpo_jax.models.lora import LoRAConfig
from optpo_jax.sprt import SPRTConfig
from optpo_jax.train.critic import batch_values, init_critic
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.state import init_train_state
from optpo_jax.train.step import training_rows
from optpo_jax.train.step_config import UpdateConfig
from optpo_jax.train.update import fit_micro_batch, make_update_step, update_policy, update_rows, with_gae
from tests.run_configs import tiny_config


@pytest.fixture(scope="module")
def ppo_setup():
    return build_setup(tiny_config(algorithm="ppo"))


@pytest.fixture(scope="module")
def ppo_rollouts(ppo_setup):
    rollouts, _ = collect_rollouts(ppo_setup.policy.params, ppo_setup.learner, ppo_setup.train_problems[:4],
                                   jax.random.key(3))
    rewards = (np.arange(len(rollouts.prompt_index)) % 3 == 0).astype(np.float32)
    return rollouts, rewards


def _rows(rollouts, rewards, factors=None):
    factors = np.ones(len(rewards), np.float32) if factors is None else factors
    return update_rows(rollouts, np.arange(len(rewards)), factors, rewards)


def test_the_critic_starts_as_a_copy_of_the_policy_with_a_zero_value_head(ppo_setup):
    params = ppo_setup.policy.params
    hidden = ppo_setup.policy.config.hidden_size
    critic = init_critic(params, None, seed=1)
    copies, originals = jax.tree.leaves(critic["trunk"]), jax.tree.leaves(params)
    assert all(a is not b for a, b in zip(copies, originals, strict=True))  # a copy: the update donates it
    jax.tree.map(np.testing.assert_array_equal, critic["trunk"], params)
    assert critic["value_head"]["kernel"].shape == (hidden,) and not np.any(critic["value_head"]["kernel"])
    lora = LoRAConfig(rank=2)
    lora_critic = init_critic(params, lora, seed=1)
    assert set(lora_critic) == {"adapters", "value_head"}


def test_ppo_state_holds_a_critic_and_its_own_optimizer_state(ppo_setup):
    state = ppo_setup.initial_state()
    assert state.critic is not None and state.critic_opt_state is not None
    assert state.checkpointed().keys() == {"params", "opt_state", "critic", "critic_opt_state"}
    with pytest.raises(ValueError, match="critic_optimizer"):
        init_train_state(ppo_setup.policy.params, ppo_setup.optimizer, ppo_setup.learner.config, None, seed=0)
    grpo = build_setup(tiny_config())
    assert grpo.initial_state().critic is None and grpo.critic_optimizer is None


def test_zero_values_and_gamma_lam_one_make_every_tokens_advantage_its_rollouts_reward(ppo_setup, ppo_rollouts):
    """The acceptance check through the real path: a fresh critic's values are 0 (its head starts at 0), so with
    gamma = lam = 1 and no whitening every completion token's advantage is its rollout's reward (times its
    vote weight), and the returns are the rewards too."""
    rollouts, rewards = ppo_rollouts
    ppo = dataclasses.replace(ppo_setup.learner.config.ppo, gamma=1.0, lam=1.0, whiten_advantages=False)
    learner = dataclasses.replace(ppo_setup.learner, config=dataclasses.replace(ppo_setup.learner.config, ppo=ppo))
    state = ppo_setup.initial_state()
    factors = np.where(np.arange(len(rewards)) % 2, 2.0, 1.0).astype(np.float32)
    rows = with_gae(_rows(rollouts, rewards, factors), state.critic, state.base_params, learner, state.lora)
    completion = np.arange(rows.old_values.shape[1])[None] < rollouts.completion_lengths[:, None]
    np.testing.assert_array_equal(rows.old_values, 0.0)
    np.testing.assert_array_equal(rows.token_advantages, np.where(completion, (rewards * factors)[:, None], 0.0))
    np.testing.assert_array_equal(rows.returns, np.where(completion, rewards[:, None], 0.0))


def test_with_gae_reads_the_critics_values_per_completion_token(ppo_setup, ppo_rollouts):
    """A critic with a non-zero head: the values ``with_gae`` stores for each completion token are the ones the
    critic gives that rollout alone, in the reference (one rollout per row) layout."""
    rollouts, rewards = ppo_rollouts
    state = ppo_setup.initial_state()
    critic = dict(state.critic, value_head={"kernel": jnp.linspace(-1.0, 1.0, ppo_setup.policy.config.hidden_size),
                                            "bias": jnp.asarray(0.25)})
    learner = ppo_setup.learner
    rows = with_gae(_rows(rollouts, rewards), critic, None, learner, None)
    update = dataclasses.replace(learner.config.update, pack_width=0, width_bucket=0, row_buckets=1)
    for row in (0, len(rewards) - 1):
        single = fit_micro_batch(_rows(rollouts, rewards).take(np.array([row])), 1, update, None)
        values = np.asarray(batch_values(ppo_setup.policy.config, critic, None, None, single))[0]
        start, length = rollouts.prompt_lengths[row], rollouts.completion_lengths[row]
        np.testing.assert_allclose(rows.old_values[row, :length], values[start - 1 : start - 1 + length], rtol=1e-5,
                                   atol=1e-5)
        assert np.all(rows.old_values[row, length:] == 0)


def test_packed_and_padded_layouts_take_the_same_ppo_update(ppo_setup, ppo_rollouts):
    """Policy and critic after one PPO update agree between one rollout per row and packed rows (plain SGD, so
    rounding stays rounding; see test_fitted_and_packed_micro_batches_train_like_padded_ones)."""
    rollouts, rewards = ppo_rollouts
    sgd = optax.sgd(1e-2)
    results = []
    for pack_width, accumulation in ((0, 1), (32, 2)):
        update = dataclasses.replace(ppo_setup.learner.config.update, micro_batch_rows=16, pack_width=pack_width,
                                     grad_accumulation=accumulation, width_bucket=0, row_buckets=1)
        config = dataclasses.replace(ppo_setup.learner.config, update=update)
        learner = dataclasses.replace(ppo_setup.learner, config=config, update_step=make_update_step(
            ppo_setup.policy.config, sgd, config.grpo, accumulation, None, sgd, config.ppo))
        params = jax.tree.map(jnp.copy, ppo_setup.policy.params)
        state = init_train_state(params, sgd, config, None, 0, sgd)
        state, metrics = update_policy(state, _rows(rollouts, rewards), learner, np.random.default_rng(1))
        results.append((state, metrics))
    (padded, padded_metrics), (packed, packed_metrics) = results
    assert padded_metrics["optimizer_steps"] == packed_metrics["optimizer_steps"] > 1
    np.testing.assert_allclose(packed_metrics["value_loss"], padded_metrics["value_loss"], rtol=1e-4)
    np.testing.assert_allclose(packed_metrics["loss"], padded_metrics["loss"], rtol=1e-4, atol=1e-6)
    for trained in ("params", "critic"):
        moved = False
        for a, b, start in zip(jax.tree.leaves(getattr(padded, trained)), jax.tree.leaves(getattr(packed, trained)),
                               jax.tree.leaves({"params": ppo_setup.policy.params,
                                                "critic": init_critic(ppo_setup.policy.params, None, 1)}[
                                                   trained]), strict=True):
            a, b, start = np.asarray(a), np.asarray(b), np.asarray(start)
            scale = max(np.abs(a - start).max(), 1e-12)
            np.testing.assert_allclose(b - start, a - start, atol=1e-3 * scale + 1e-6)
            moved |= bool(np.abs(a - start).max() > 0)
        assert moved, f"the update did not move the {trained}"


def test_ppo_trains_every_subsampled_rollout_even_where_the_group_agrees(ppo_rollouts):
    """GRPO drops a group whose rewards all agree (advantage 0); PPO's baseline is the critic, so it keeps it."""
    rollouts, _ = ppo_rollouts
    rewards = np.ones(len(rollouts.prompt_index), np.float32)
    config, sprt, rng = UpdateConfig(), SPRTConfig(), np.random.default_rng(0)
    grpo_rows, _ = training_rows(rollouts, rewards, 4, config, sprt, rng)
    ppo_rows, factors = training_rows(rollouts, rewards, 4, config, sprt, rng, algorithm="ppo")
    assert len(grpo_rows) == 0 and len(ppo_rows) == len(rewards)
    np.testing.assert_array_equal(factors, 1.0)


def test_the_critic_is_sharded_like_the_policy_and_trains_on_a_mesh(ppo_rollouts):
    """On a (2, 2, 2) mesh of the 8 host devices: the critic's trunk has the policy's partition specs, its value
    head is replicated, and one PPO update runs there with finite losses."""
    config = tiny_config(algorithm="ppo")
    config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    setup = build_setup(config)
    state = setup.initial_state()
    for policy_leaf, critic_leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.critic["trunk"]),
                                        strict=True):
        assert critic_leaf.sharding == policy_leaf.sharding
    assert state.critic["value_head"]["kernel"].sharding.is_fully_replicated
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.critic["trunk"]))
    rollouts, rewards = ppo_rollouts
    state, metrics = update_policy(state, _rows(rollouts, rewards), setup.learner, np.random.default_rng(0))
    assert np.isfinite(metrics["value_loss"]) and np.isfinite(metrics["loss"]) and metrics["skipped_steps"] == 0


def test_a_full_fine_tuning_ppo_run_resumes_to_the_same_metrics(tmp_path):
    """The critic's own copy of the weights, its value head and its optimizer state are checkpointed and restored:
    a run stopped after step 1 and resumed to step 2 logs what an uninterrupted run logs (value loss included).
    With LoRA and after a SIGKILL: tests/train/test_loop.py."""
    from optpo_jax.train.loop import train

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(tiny_config(algorithm="ppo", steps=2), full, progress=False)
    train(tiny_config(algorithm="ppo", steps=1), stopped, progress=False)
    train(tiny_config(algorithm="ppo", steps=2), stopped, resume=True, progress=False)
    read = lambda workdir: [{name: value for name, value in json.loads(line).items() if "seconds" not in name}
                            for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    full_lines, resumed_lines = read(full), read(stopped)
    assert [line for line in resumed_lines if line.get("step") == 2] == [line for line in full_lines
                                                                        if line.get("step") == 2]
    assert any("value_loss" in line and line["step"] == 2 for line in full_lines)

"""optpo_jax/train/update.py: micro-batch layouts and update_policy's updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step_config import UpdateConfig
from optpo_jax.train.update import update_rows
from tests.run_configs import tiny_config


def test_micro_batch_shapes_follow_the_rows_and_the_longest_sequence():
    from optpo_jax.train.update import micro_batch_shape

    config = UpdateConfig(micro_batch_rows=256, width_bucket=16, row_buckets=3)
    assert micro_batch_shape(256, 40, 256, 55, config) == (256, 48)
    assert micro_batch_shape(70, 10, 256, 55, config) == (128, 16)
    assert micro_batch_shape(64, 50, 256, 55, config) == (64, 55)  # never wider than the arrays
    assert micro_batch_shape(10, 10, 256, 55, config, row_multiple=128) == (128, 16)
    assert micro_batch_shape(10, 10, 256, 55, UpdateConfig(width_bucket=0, row_buckets=1)) == (256, 55)


def test_fitted_and_packed_micro_batches_train_like_padded_ones(setup):
    """The update at fitted widths and row counts takes the same gradients as the one padded to the full
    micro-batch (float tolerance).

    Plain SGD, not Adam: SGD moves each parameter by lr x its gradient, so a rounding difference in a gradient
    stays a rounding difference in the params; Adam divides by sqrt(v) and turns the rounding of a near-zero
    gradient into a full-size step (2 of 49,152 params differed by 2.6e-5 on an AVX-512 CPU).
    """
    import dataclasses as dc

    import optax

    from optpo_jax.train.update import make_update_step, update_policy

    problems = setup.train_problems[:4]
    rollouts, _ = collect_rollouts(setup.policy.params, setup.learner, problems, jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    arrays = update_rows(rollouts, np.arange(len(advantages)), advantages)
    learning_rate = 1e-2
    sgd = optax.sgd(learning_rate)
    results = []
    # One rollout per row at the full width, the same at the longest row, and packed (prompts once, the head in
    # chunks; grad_accumulation 2 splits it into two packed micro-batches): one update.
    for width_bucket, row_buckets, pack_width, accumulation in ((0, 1, 0, 1), (8, 3, 0, 1), (8, 3, 32, 2)):
        update = dc.replace(setup.learner.config.update, width_bucket=width_bucket, row_buckets=row_buckets,
                            micro_batch_rows=16, pack_width=pack_width, grad_accumulation=accumulation)
        learner = dc.replace(setup.learner, config=dc.replace(setup.learner.config, update=update),
                             update_step=make_update_step(setup.policy.config, sgd, setup.learner.config.grpo,
                                                          accumulation))
        params = jax.tree.map(jnp.copy, setup.policy.params)  # the update donates what it is given
        state = setup.initial_state().replace(params=params, opt_state=sgd.init(params))
        state, metrics = update_policy(state, arrays, learner, np.random.default_rng(1))
        results.append((jax.tree.leaves(state.params), metrics))
    (padded, padded_metrics) = results[0]
    initial = jax.tree.leaves(setup.policy.params)
    for other, other_metrics in results[1:]:
        assert padded_metrics["optimizer_steps"] == other_metrics["optimizer_steps"] > 1
        np.testing.assert_allclose(other_metrics["loss"], padded_metrics["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other_metrics["grad_norm"], padded_metrics["grad_norm"], rtol=1e-4)
        for a, b, start in zip(padded, other, initial, strict=True):
            a, b, start = np.asarray(a), np.asarray(b), np.asarray(start)
            # The steps' moves, lr x sum(g), agree to float32 rounding: of the gradients (1e-3 of the largest move)
            # and of each param's own value (a few ulps), whatever the CPU's vector width.
            bound = 1e-3 * np.abs(a - start).max() + 4 * np.finfo(np.float32).eps * np.abs(start)
            assert np.all(np.abs(a - b) <= bound), np.abs(a - b).max()


def test_float32_master_updates_float32_params():
    """optimizer.float32_master on float32 params: the update runs (it once donated one buffer as both the params
    and the master copy) and the params follow the master copy (closed form: p + (m - p) in float32 is m up to the
    rounding of m - p, an ulp of the old p or of m)."""
    from optpo_jax.train.update import update_policy

    setup = build_setup(tiny_config(**{"optimizer.float32_master": True}))
    rollouts, _ = collect_rollouts(setup.policy.params, setup.learner, setup.train_problems[:2], jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    state = setup.initial_state()
    before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(state.params)]
    state, metrics = update_policy(state, update_rows(rollouts, np.arange(len(advantages)), advantages),
                                   setup.learner, np.random.default_rng(1))
    assert metrics["optimizer_steps"] >= 1 and metrics["skipped_steps"] == 0
    after = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    for old, param, master in zip(before, after, jax.tree.leaves(state.opt_state.master), strict=True):
        master = np.asarray(master)
        assert np.all(np.abs(param - master) <= np.finfo(np.float32).eps * (np.abs(old) + np.abs(master)))


def test_optimizer_steps_fixes_the_number_of_updates(setup):
    """policy_update.optimizer_steps = k: k updates whatever the rows (fewer only with fewer rows than k; chunks of
    micro_batch_rows when k of them cannot hold the rows); 0: one update per micro_batch_rows."""
    from optpo_jax.train.update import _step_cuts, update_policy

    # Cuts at ceil(i M / k): k = 4 over 9 rows is 3 + 2 + 2 + 2 (steps of ceil(9 / 4) = 3 rows would make only 3).
    assert _step_cuts(9, 16, 4) == [0, 3, 5, 7, 9]
    for num_rows, chunk_rows, steps in ((799, 256, 4), (30, 16, 10), (5, 16, 4), (17, 16, 16)):
        cuts = _step_cuts(num_rows, chunk_rows, steps)
        sizes = np.diff(cuts)
        assert cuts[0] == 0 and cuts[-1] == num_rows and len(sizes) == steps and sizes.max() - sizes.min() <= 1
    assert _step_cuts(3, 16, 4) == [0, 1, 2, 3]  # fewer rows than steps: one row each
    assert _step_cuts(40, 16, 0) == [0, 16, 32, 48]  # 0: micro-batches of 16 (the last padded)
    assert _step_cuts(40, 8, 2) == [0, 8, 16, 24, 32, 40]  # 2 steps of 20 rows exceed 8: micro-batches again
    assert _step_cuts(0, 16, 4) == [0] and _step_cuts(0, 16, 0) == [0]  # no rows, no step

    # The update takes those steps.
    rollouts, _ = collect_rollouts(setup.policy.params, setup.learner, setup.train_problems[:4], jax.random.key(5))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    assert len(advantages) > 24
    arrays = update_rows(rollouts, np.arange(len(advantages)), advantages)
    update = dataclasses.replace(setup.learner.config.update, optimizer_steps=3, micro_batch_rows=16)
    learner = dataclasses.replace(setup.learner, config=dataclasses.replace(setup.learner.config, update=update))
    state = setup.initial_state()
    state = state.replace(params=jax.tree.map(jnp.copy, state.params))
    _, metrics = update_policy(state, arrays, learner, np.random.default_rng(1))
    assert metrics["optimizer_steps"] == 3
    with pytest.raises(ValueError, match=r"UpdateConfig.optimizer_steps must be an integer in \[0, 65536\], got -1"):
        UpdateConfig(optimizer_steps=-1)

"""optpo_jax/prior.py: the learned prior's concentration and how it enters the rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax import SPRTConfig, init_vote_state, sprt_update
from optpo_jax.prior import (
    PRIOR_GRID,
    fitted_concentration,
    init_prior_state,
    prior_from_json,
    prior_to_json,
    update_prior,
)
from optpo_jax.sprt import rule_confidence


def test_update_prior_recovers_the_concentration_of_simulated_votes():
    """Votes drawn from a Chinese restaurant process (a Dirichlet process) of known theta."""
    rng = np.random.default_rng(0)
    for theta in (0.2, 1.0):
        counts = np.zeros((3000, 24), np.int32)
        for prompt in range(3000):
            for _ in range(rng.integers(4, 25)):
                seen = counts[prompt] > 0
                weights = np.concatenate([counts[prompt][seen], [theta]])
                choice = rng.choice(len(weights), p=weights / weights.sum())
                slot = np.flatnonzero(seen)[choice] if choice < seen.sum() else seen.sum()
                counts[prompt, slot] += 1
        state = jax.jit(update_prior)(init_prior_state(), jnp.asarray(counts))
        assert fitted_concentration(state, default=5.0) == theta
        assert int(state.num_prompts) == 3000
        restored = prior_from_json(prior_to_json(state))
        np.testing.assert_array_equal(np.asarray(restored.log_likelihood), np.asarray(state.log_likelihood))
    assert fitted_concentration(init_prior_state(), default=5.0) == 5.0  # nothing seen: the config's prior


@pytest.mark.parametrize("rule", ["dirichlet", "beta", "predictive"])  # a compiled branch each / a traced prior
def test_a_learned_prior_changes_the_rule_only_through_its_concentration(rule):
    config = SPRTConfig(rule=rule, threshold=0.9, max_samples=16)
    state = init_vote_state(3, 16)
    ids, slots, valid = jnp.array([0, 0, 1, 1, 2]), jnp.array([0, 0, 0, 1, 0]), jnp.ones(5, bool)
    prior = update_prior(init_prior_state(), jnp.array([[9, 0, 0], [8, 0, 0], [7, 1, 0]]))
    fitted = fitted_concentration(prior, config.prior)
    assert fitted in PRIOR_GRID and fitted != config.prior
    learned = jax.jit(lambda s, p: sprt_update(s, ids, slots, valid, config, prior_state=p))(state, prior)
    fixed = sprt_update(state, ids, slots, valid, SPRTConfig(rule=rule, threshold=0.9, max_samples=16,
                                                             prior=fitted))
    np.testing.assert_allclose(np.asarray(learned.confidence), np.asarray(fixed.confidence), atol=1e-6)
    before_any = sprt_update(state, ids, slots, valid, config, prior_state=init_prior_state())
    np.testing.assert_allclose(np.asarray(before_any.confidence),
                               np.asarray(sprt_update(state, ids, slots, valid, config).confidence), atol=1e-6)
    # One traced rule, or (dirichlet: its tables depend on the prior) one branch per grid value.
    counts = jnp.array([[2, 0, 0], [1, 1, 0], [3, 0, 0]], jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda c, p: rule_confidence(c, jnp.zeros(3, jnp.int32), config, p))(counts, prior))
    assert ("cond[" in jaxpr) == (rule == "dirichlet")

"""Issue 17: the margin and predictive rules and the learned prior, each against an independent reference."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln

from optpo_jax import SPRTConfig, init_vote_state, sprt_update
from optpo_jax.predictive import plurality_at_budget_prob
from optpo_jax.prior import (
    PRIOR_GRID,
    fitted_concentration,
    init_prior_state,
    prior_from_json,
    prior_to_json,
    update_prior,
)
from optpo_jax.sprt import margin_confidence, predictive_confidence, rule_confidence


def _stays_label(final: np.ndarray, leader: int) -> np.ndarray:
    """Whether ``leader`` is the consensus of each row of final counts (ties to the lower slot)."""
    return np.argmax(final, axis=-1) == leader


def enumerated_plurality(counts, remaining, prior):
    """Exact P(the leader is still the consensus) by enumerating every split of the remaining votes
    over the seen answers and one unseen slot (placed last), weighted by the Dirichlet-multinomial
    pmf in float64 (the reference for small budgets)."""
    seen = np.array([c for c in counts if c > 0], float)
    alpha = np.concatenate([seen + prior, [prior]])
    current = np.concatenate([seen, [0.0]])
    leader = int(np.argmax(current))
    total = 0.0
    for split in itertools.product(range(remaining + 1), repeat=len(alpha)):
        if sum(split) != remaining:
            continue
        x = np.array(split, float)
        log_pmf = (gammaln(remaining + 1) - np.sum(gammaln(x + 1)) + gammaln(alpha.sum())
                   - gammaln(alpha.sum() + remaining) + np.sum(gammaln(alpha + x) - gammaln(alpha)))
        total += math.exp(log_pmf) * bool(_stays_label(current + x, leader))
    return total


CASES = [([3, 1], 5), ([1, 3], 5), ([2, 2], 6), ([4], 6), ([2, 1, 1], 5), ([1, 2, 1, 3], 4), ([1], 3), ([5, 4], 2)]


def test_predictive_matches_exact_enumeration_under_jit_and_vmap(prior=0.3):
    counts = np.zeros((len(CASES), 12), np.int32)
    for row, (votes, _) in enumerate(CASES):
        counts[row, : len(votes)] = votes
    remaining = np.array([m for _, m in CASES], np.int32)
    reference = np.array([enumerated_plurality(votes, m, prior) for votes, m in CASES])
    jitted = jax.jit(plurality_at_budget_prob, static_argnums=(2, 3))(counts, remaining, prior, 8)
    vmapped = jax.vmap(lambda c, m: plurality_at_budget_prob(c, m, prior, 8))(counts, remaining)
    np.testing.assert_allclose(np.asarray(jitted), reference, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vmapped), reference, atol=1e-5)


def test_predictive_within_1e3_of_a_monte_carlo_reference_at_budget_40():
    """10^6 draws p ~ Dir(counts + a, a), then the remaining votes ~ Multinomial(p) (seeded)."""
    rng = np.random.default_rng(0)
    for votes, remaining in [([3, 1], 36), ([5, 2, 1], 32)]:
        seen = np.array(votes, float)
        draws = rng.multinomial(remaining, rng.dirichlet(np.concatenate([seen + 1.0, [1.0]]), size=1_000_000))
        current = np.concatenate([seen, [0.0]])
        reference = np.mean(_stays_label(current + draws, int(np.argmax(current))))
        counts = np.zeros(40, np.int32)
        counts[: len(votes)] = votes
        value = float(plurality_at_budget_prob(jnp.asarray(counts), remaining, 1.0, 40))
        assert abs(value - reference) <= 1e-3, (votes, value, reference)


def test_predictive_is_certain_exactly_when_the_runner_up_cannot_catch_up():
    counts = jnp.array([[6, 2, 0], [2, 6, 0], [5, 2, 0], [0, 0, 0]])
    # 6 vs 2 with 4 left: a 6-6 tie goes to slot 0, so only the leader in slot 0 is certain.
    values = np.asarray(plurality_at_budget_prob(counts, jnp.array([4, 4, 4, 4]), 1.0, 8))
    assert values[0] == 1.0 and values[1] < 1.0 and values[2] < 1.0 and values[3] == 0.0
    config = SPRTConfig(rule="predictive", max_samples=12, threshold=0.99)
    np.testing.assert_array_equal(np.asarray(predictive_confidence(counts, None, config))[0], 1.0)


def test_margin_is_walds_test_on_the_margin_for_two_answers():
    """Closed form: with answers a, b the posterior of H_a is r^a / (r^a + r^b + 1), r = p0 / (1 - p0)."""
    config = SPRTConfig(rule="margin", margin_p0=0.75, threshold=0.95)
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, 30, size=(64, 2))
    counts = np.concatenate([pairs, np.zeros((64, 3), int)], axis=1)
    r = 3.0
    lead, other = pairs.max(1), pairs.min(1)
    reference = np.where(lead > 0, r**lead / (r**lead + np.where(other > 0, r**other, 0.0) + 1.0), 0.0)
    values = jax.jit(jax.vmap(lambda c: margin_confidence(c, None, config)))(jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(values), reference, rtol=1e-5)
    # Stopping (both seen, far from the +1 term) is a margin test: margin >= log(t / (1 - t)) / log r.
    both = (other > 3)
    stops = np.asarray(values) >= 0.95
    np.testing.assert_array_equal(stops[both], (lead - other)[both] >= math.log(19) / math.log(3))


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


@pytest.mark.parametrize("fields, message", [
    ({"rule": "margin", "margin_p0": 1.2}, "SPRTConfig.margin_p0 must lie in (0.5, 1), got 1.2"),
    ({"rule": "margin", "margin_p0": 0.5}, "SPRTConfig.margin_p0 must lie in (0.5, 1), got 0.5"),
    ({"rule": "esc", "learn_prior": True}, "SPRTConfig.learn_prior needs a rule with a prior"),
])
def test_invalid_rule_parameters_are_named(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SPRTConfig(**fields)

"""optpo_jax/predictive.py: the predictive rule's plurality-at-budget probability against exact references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

from optpo_jax import SPRTConfig
from optpo_jax.predictive import plurality_at_budget_prob
from optpo_jax.sprt import predictive_confidence


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

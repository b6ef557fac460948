"""optpo_jax/posterior.py: posterior_mode_prob against scipy, on bad input and in checked mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from optpo_jax import posterior_mode_prob
from tests.scipy_reference import mode_prob_reference

NUM_SLOTS = 64


def _padded(rows):
    table = np.zeros((len(rows), NUM_SLOTS), np.int32)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table


def _hard_and_random_cases():
    cases = [
        [1], [4], [256], [1, 1], [2, 2], [3, 1], [128, 128], [40, 3, 3], [100, 90, 60, 6],
        [4] * 64, [5] * 51 + [1], [10, 9] + [1] * 62, [0, 0, 3, 0, 3], [2] * 63 + [3],
    ]
    rng = np.random.default_rng(0)
    for _ in range(40):
        observed = int(rng.integers(1, 65))
        total = int(rng.integers(observed, 257))
        probs = rng.dirichlet(np.full(observed, rng.choice([0.1, 1.0, 10.0])))
        counts = rng.multinomial(total - observed, probs) + 1
        cases.append(list(rng.permutation(counts)))
    return cases


CASES = _hard_and_random_cases()


@pytest.mark.parametrize("prior", [0.5, 1.0, 2.0])
def test_matches_scipy_quad_within_1e5(prior):
    # Reference: scipy.integrate.quad of the same Gamma integral in float64.
    got = np.asarray(posterior_mode_prob(jnp.asarray(_padded(CASES)), prior))
    want = np.array([mode_prob_reference(case, prior) for case in CASES])
    assert np.max(np.abs(got - want)) < 1e-5, np.max(np.abs(got - want))


@pytest.mark.parametrize("votes", [1, 2, 4, 10, 30])
def test_single_answer_matches_beta_closed_form(votes):
    # Closed form: with one observed answer the posterior of its share is Beta(v + 1, 1),
    # and P(share > 1/2) = 1 - 0.5 ** (v + 1): 0.75 after one vote, 0.96875 after four.
    got = float(posterior_mode_prob(jnp.array([votes, 0, 0], jnp.int32)))
    assert got == pytest.approx(1 - 0.5 ** (votes + 1), abs=1e-6)


def test_no_votes_gives_zero_and_over_capacity_gives_nan():
    got = np.asarray(posterior_mode_prob(jnp.array([[0, 0], [5, 1], [9, 0]], jnp.int32), max_count=8))
    assert got[0] == 0.0 and 0 < got[1] < 1 and np.isnan(got[2])


def test_ties_share_a_value_below_one_half():
    got = np.asarray(posterior_mode_prob(jnp.array([[3, 3, 1], [1, 3, 3], [5, 5, 5]], jnp.int32)))
    assert got[0] == pytest.approx(got[1], abs=1e-7)
    assert got[0] < 0.5 and got[2] < 1 / 3


def test_empty_slots_are_capacity_only_and_order_does_not_matter():
    compact = posterior_mode_prob(jnp.array([7, 2, 1], jnp.int32))
    spread = posterior_mode_prob(jnp.array([0, 1, 0, 0, 7, 0, 2, 0], jnp.int32))
    assert float(compact) == pytest.approx(float(spread), abs=1e-7)


def test_jit_vmap_and_leading_dims_agree(maybe_jit):
    counts = jnp.asarray(_padded(CASES[:12])).reshape(3, 4, NUM_SLOTS)
    fn = maybe_jit(posterior_mode_prob, static_argnums=1)
    direct = fn(counts, 1.0)
    mapped = jax.vmap(lambda c: posterior_mode_prob(c, 1.0))(counts)
    assert direct.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(mapped), atol=1e-7)


def test_rejects_float_counts():
    with pytest.raises(TypeError, match="integer"):
        posterior_mode_prob(jnp.array([1.0, 2.0]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8))
def test_probability_in_range_and_monotone_in_leader_votes(counts):
    counts = np.array(counts, np.int32)
    before = float(posterior_mode_prob(jnp.asarray(counts), max_count=64))
    bumped = counts.copy()
    bumped[np.argmax(counts)] += 1
    after = float(posterior_mode_prob(jnp.asarray(bumped), max_count=64))
    assert 0.0 <= before <= 1.0
    assert after >= before - 1e-6


# A traced prior (jit over priors, vmap, grad): its own grid, sized for a static range of priors.
TRACED_COUNTS = _padded(CASES[:24])


def test_traced_prior_matches_static_tables_with_one_compilation():
    # Reference: the static path (scipy float64 tables) at each prior, itself within 1e-5 of scipy quad.
    traces = []

    def at_prior(prior):
        traces.append(prior)
        return posterior_mode_prob(jnp.asarray(TRACED_COUNTS), prior)

    fn = jax.jit(at_prior)
    for prior in (0.1, 0.35, 1.0, 2.0, 7.5):
        got = np.asarray(fn(prior))
        want = np.asarray(posterior_mode_prob(jnp.asarray(TRACED_COUNTS), prior))
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6, err_msg=f"prior {prior}")
    assert len(traces) == 1
    batched = jax.vmap(lambda prior: posterior_mode_prob(jnp.asarray(TRACED_COUNTS[:4]), prior))(
        jnp.array([0.5, 2.0]))
    for row, prior in zip(batched, (0.5, 2.0), strict=True):
        np.testing.assert_allclose(row, posterior_mode_prob(jnp.asarray(TRACED_COUNTS[:4]), prior), atol=5e-6)


@pytest.mark.parametrize("prior", [0.3, 1.0, 3.0])
def test_grad_wrt_prior_matches_finite_difference(prior):
    # Reference: a central difference of scipy quad (float64) with step 1e-3 (error ~1e-7).
    rows = [[5, 2, 0], [3, 3, 1], [1, 0, 0], [20, 11, 4]]
    grad = jax.vmap(jax.grad(lambda p, c: posterior_mode_prob(c, p)), in_axes=(None, 0))(
        prior, jnp.array(rows, jnp.int32))
    step = 1e-3
    want = [(mode_prob_reference(row, prior + step) - mode_prob_reference(row, prior - step)) / (2 * step)
            for row in rows]
    np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=2e-6)


def test_traced_prior_outside_its_range_or_not_scalar():
    counts = jnp.array([[4, 1, 0]], jnp.int32)
    fn = jax.jit(lambda prior: posterior_mode_prob(counts, prior))
    # Outside the grid's range of priors (default 0.1..10) or not a concentration: NaN, not a coarse value.
    for prior in (0.05, 11.0, 0.0, -1.0, float("nan")):
        assert np.isnan(float(fn(prior)[0])), prior
    wider = jax.jit(lambda prior: posterior_mode_prob(counts, prior, traced_prior_range=(0.05, 20.0)))
    assert float(wider(0.05)[0]) == pytest.approx(float(posterior_mode_prob(counts, 0.05)[0]), abs=5e-6)
    with pytest.raises(ValueError, match=r"prior must be a scalar.*\(2,\)"):
        jax.jit(lambda prior: posterior_mode_prob(counts, prior))(jnp.ones(2))
    with pytest.raises(ValueError, match="traced_prior_range"):
        posterior_mode_prob(counts, jnp.float32(1.0), traced_prior_range=(0.0, 1.0))


def test_static_prior_whose_tables_do_not_fit_raises():
    # Reference: the table size (max_count + 1) x nodes that quadrature_tables would allocate in
    # float64 (~26.5M entries here, > MAX_TABLE_ENTRIES); 1e-6 at 64 was reported at 30 GiB.
    with pytest.raises(ValueError, match=r"prior=0.001.*max_count=256.*at most 16777216"):
        posterior_mode_prob(jnp.array([3, 1], jnp.int32), 1e-3)
    for prior in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="prior"):
            posterior_mode_prob(jnp.array([3, 1], jnp.int32), prior)


# K = 0 is a shape: raise at trace time instead of dividing by zero.
def test_posterior_rejects_empty_answer_axis(maybe_jit):
    with pytest.raises(ValueError, match=r"K >= 1.*\(3, 0\)"):
        maybe_jit(posterior_mode_prob)(jnp.zeros((3, 0), jnp.int32))


# a row with a negative count is NaN (before: the negative count was ignored).
def test_posterior_negative_count_row_is_nan(maybe_jit):
    counts = jnp.array([[-3, 2, 1], [-1, -1, 0], [2, 1, 0]], jnp.int32)
    got = np.asarray(maybe_jit(posterior_mode_prob)(counts))
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert got[2] == pytest.approx(float(posterior_mode_prob(jnp.array([2, 1, 0], jnp.int32))), abs=0)


# checked mode of posterior_mode_prob names the index and value.
def test_posterior_checked_mode():
    fn = jax.jit(checkify.checkify(functools.partial(posterior_mode_prob, max_count=8, checked=True)))
    error, _ = fn(jnp.array([[1, 2], [3, -2]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"counts\[1, 1\] = -2, outside \[0, max_count=8\]"):
        error.throw()
    error, _ = fn(jnp.array([[1, 9]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"counts\[0, 1\] = 9"):
        error.throw()
    error, prob = fn(jnp.array([[1, 2], [3, 0]], jnp.int32))
    error.throw()
    np.testing.assert_array_equal(prob, posterior_mode_prob(jnp.array([[1, 2], [3, 0]], jnp.int32), max_count=8))


def test_64bit_host_counts_that_do_not_fit_give_nan():
    # Reference: NaN for a count above max_count (documented); the other row as computed alone.
    got = np.asarray(posterior_mode_prob(np.array([[2**32 + 5, 0], [3, 1], [-(2**32) + 2, 1]], np.int64)))
    assert np.isnan(got[0]) and np.isnan(got[2])
    assert got[1] == float(posterior_mode_prob(jnp.array([3, 1], jnp.int32)))
    with pytest.raises(checkify.JaxRuntimeError, match=r"counts\[0, 0\] = 4294967301"):
        posterior_mode_prob(np.array([[2**32 + 5, 0]], np.int64), checked=True)

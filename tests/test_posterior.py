import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy_reference import mode_prob_reference

from optpo_jax import posterior_mode_prob

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

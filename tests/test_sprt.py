import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from optpo_jax import SPRTConfig, consensus, init_vote_state, posterior_mode_prob, sprt_update


def _wave(prompt_ids, slots, valid=None):
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else jnp.asarray(valid)
    return prompt_ids, jnp.asarray(slots, jnp.int32), valid


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rule", "majority", "SPRTConfig.rule"),
        ("threshold", 1.0, "SPRTConfig.threshold"),
        ("threshold", 0.0, "SPRTConfig.threshold"),
        ("prior", 0.0, "SPRTConfig.prior"),
        ("min_samples", 0, "SPRTConfig.min_samples"),
        ("esc_window", 0, "SPRTConfig.esc_window"),
    ],
)
def test_config_names_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message) as error:
        SPRTConfig(**{field: value})
    assert repr(value) in str(error.value)


def test_config_min_above_max():
    with pytest.raises(ValueError, match="min_samples \\(9\\).*max_samples \\(8\\)"):
        SPRTConfig(min_samples=9, max_samples=8)


def test_update_counts_votes_samples_and_ignores_invalid_rows(maybe_jit):
    config = SPRTConfig(min_samples=8, max_samples=16)
    state = init_vote_state(3, 4)
    update = maybe_jit(functools.partial(sprt_update, config=config))
    state = update(state, *_wave([0, 0, 1, 1, 2, 2], [1, 1, 3, -1, 0, 2], [1, 1, 1, 1, 1, 0]))
    np.testing.assert_array_equal(state.counts, [[0, 2, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(state.num_samples, [2, 2, 1])
    assert not np.any(state.done)
    np.testing.assert_allclose(state.confidence, posterior_mode_prob(state.counts, max_count=16), atol=1e-7)
    np.testing.assert_array_equal(consensus(state), [1, 3, 0])


def test_stops_at_threshold_after_min_samples():
    config = SPRTConfig(threshold=0.95, min_samples=6, max_samples=40)
    state = init_vote_state(1, 2)
    state = sprt_update(state, *_wave([0] * 4, [0] * 4), config)
    assert float(state.confidence[0]) == pytest.approx(0.96875, abs=1e-6)
    assert not state.done[0]  # confident, but below min_samples
    state = sprt_update(state, *_wave([0] * 2, [0] * 2), config)
    assert state.done[0]
    frozen = sprt_update(state, *_wave([0] * 3, [1] * 3), config)
    np.testing.assert_array_equal(frozen.counts, state.counts)  # rows for a done prompt are ignored


def test_budget_is_never_exceeded_and_fixed_rule_draws_exactly_max():
    config = SPRTConfig(rule="fixed", min_samples=1, max_samples=5)
    state = init_vote_state(2, 3)
    state = sprt_update(state, *_wave([0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 2, 0, 0, 0]), config)
    np.testing.assert_array_equal(state.num_samples, [5, 1])
    np.testing.assert_array_equal(state.done, [True, False])
    assert state.counts[0, 0] == 5


def test_beta_rule_matches_scipy_incomplete_beta():
    # Reference: scipy.special.betainc, 1 - I_0.5(v1 + a, v2 + a) on leader and runner-up.
    config = SPRTConfig(rule="beta", threshold=0.9, min_samples=1, max_samples=64, prior=1.0)
    state = init_vote_state(1, 4)
    state = sprt_update(state, *_wave([0] * 9, [2, 2, 2, 2, 2, 1, 1, 3, -1]), config)
    want = 1 - special.betainc(6, 3, 0.5)
    assert float(state.confidence[0]) == pytest.approx(want, abs=1e-6)
    assert bool(state.done[0]) == (want >= 0.9)


def test_esc_needs_a_full_window_of_agreement_across_waves():
    config = SPRTConfig(rule="esc", esc_window=4, min_samples=1, max_samples=40)
    state = init_vote_state(2, 3)
    state = sprt_update(state, *_wave([0, 0, 1, 0, 1], [1, 2, 0, 2, 0]), config)
    np.testing.assert_array_equal(state.run_length, [2, 2])
    state = sprt_update(state, *_wave([1, 0, 0, 1], [0, 2, 2, -1]), config)
    np.testing.assert_array_equal(state.run_length, [4, 0])  # a missing answer breaks a run
    np.testing.assert_array_equal(state.done, [True, False])


def test_single_observed_answer_dirichlet_equals_beta_rule():
    dirichlet, beta = SPRTConfig(min_samples=1), SPRTConfig(rule="beta", min_samples=1)
    wave = _wave([0] * 3, [1] * 3)
    a = sprt_update(init_vote_state(1, 3), *wave, dirichlet).confidence
    b = sprt_update(init_vote_state(1, 3), *wave, beta).confidence
    assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-6)


def test_vmap_over_independent_vote_problems_matches_loop():
    config = SPRTConfig(min_samples=2, max_samples=8)
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(0, 4, (3, 10)), jnp.int32)
    slots = jnp.asarray(rng.integers(-1, 3, (3, 10)), jnp.int32)
    valid = jnp.asarray(rng.random((3, 10)) < 0.8)
    states = jax.vmap(lambda _: init_vote_state(4, 3))(jnp.arange(3))
    batched = jax.vmap(functools.partial(sprt_update, config=config))(states, prompt_ids, slots, valid)
    for i in range(3):
        single = sprt_update(init_vote_state(4, 3), prompt_ids[i], slots[i], valid[i], config)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-7)


def test_consensus_is_minus_one_without_votes():
    state = sprt_update(init_vote_state(2, 3), *_wave([0, 1], [-1, 2]), SPRTConfig())
    np.testing.assert_array_equal(consensus(state), [-1, 2])


# Counts must be real ints and the prior a finite value the rules can compute with; each error
# names the field, the value and the bound (reference: the bounds stated in SPRTConfig's docstring).
@pytest.mark.parametrize(
    "fields, field, bound",
    [
        ({"min_samples": 2.5}, "min_samples", "an int"),
        ({"min_samples": True}, "min_samples", "an int"),
        ({"max_samples": 8.0}, "max_samples", "an int"),
        ({"esc_window": np.float32(3)}, "esc_window", "an int"),
        ({"max_samples": 10**9}, "max_samples", "1048576"),
        ({"rule": "esc", "max_samples": 2**21}, "max_samples", "1048576"),
        ({"prior": float("inf")}, "prior", "[0.001, 1000.0]"),
        ({"prior": float("nan")}, "prior", "[0.001, 1000.0]"),
        ({"prior": 1e-300}, "prior", "[0.001, 1000.0]"),
        ({"prior": 1e300}, "prior", "[0.001, 1000.0]"),
        ({"prior": True}, "prior", "a finite number"),
        ({"prior": "1.0"}, "prior", "a finite number"),
        ({"threshold": float("nan")}, "threshold", "(0, 1)"),
    ],
)
def test_config_rejects_non_integer_sizes_and_unusable_priors(fields, field, bound):
    with pytest.raises(ValueError, match=f"SPRTConfig.{field}") as error:
        SPRTConfig(**fields)
    assert repr(fields[field]) in str(error.value) and bound in str(error.value)


@pytest.mark.parametrize("prior", [1e-6, 1e-5])
def test_config_rejects_priors_whose_posterior_tables_do_not_fit(prior):
    # Reported: prior 1e-6 tried to allocate 30 GiB, 1e-5 about 16 GB (the quadrature tables of
    # posterior.py have (max_samples + 1) x nodes entries, nodes ~ 1 / prior).
    from optpo_jax import posterior

    assert posterior.table_entries(prior, 64) > posterior.MAX_TABLE_ENTRIES
    with pytest.raises(ValueError, match=r"SPRTConfig.prior must be a finite number in \[0.001, 1000.0\]"):
        SPRTConfig(prior=prior)
    # Same bound for a bigger budget at a small (but allowed) prior, and for the learned prior's grid.
    with pytest.raises(ValueError, match=r"SPRTConfig.max_samples=1000 .*SPRTConfig.prior=0.001"):
        SPRTConfig(prior=1e-3, max_samples=1000)
    with pytest.raises(ValueError, match=r"SPRTConfig.max_samples=9000 .*prior=0.1"):
        SPRTConfig(prior=5.0, max_samples=9000, learn_prior=True)
    SPRTConfig(rule="beta", prior=1e-3, max_samples=1000)  # the Beta rule has no tables
    with pytest.raises(ValueError, match=r"SPRTConfig.max_samples=300 .*'predictive'.*at most 256"):
        SPRTConfig(rule="predictive", max_samples=300)


def test_config_normalises_numpy_scalars_to_python_numbers():
    config = SPRTConfig(max_samples=np.int64(8), min_samples=np.int32(2), prior=np.float32(0.5))
    assert type(config.max_samples) is int and type(config.min_samples) is int and type(config.prior) is float
    assert config == SPRTConfig(max_samples=8, min_samples=2, prior=0.5)


@pytest.mark.parametrize("rule", ["dirichlet", "beta", "esc", "margin", "predictive", "fixed"])
@pytest.mark.parametrize("prior", [1e-3, 1e3])
def test_every_rule_computes_at_the_prior_bounds(rule, prior):
    # The accepted extremes are computable: a confidence in [0, 1] for votes with a clear leader;
    # for dirichlet against scipy quad (tests/scipy_reference.py).
    from scipy_reference import mode_prob_reference

    from optpo_jax.sprt import rule_confidence

    config = SPRTConfig(rule=rule, prior=prior, max_samples=64)
    counts = jnp.array([[12, 3, 1, 0], [1, 0, 0, 0], [30, 30, 2, 0]], jnp.int32)
    got = np.asarray(rule_confidence(counts, jnp.array([4, 1, 2], jnp.int32), config))
    assert np.all((got >= 0) & (got <= 1)), got
    if rule == "dirichlet":
        want = [mode_prob_reference(np.asarray(row), prior) for row in counts]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

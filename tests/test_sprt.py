"""optpo_jax/sprt.py: the stopping rules, sprt_update and SPRTConfig, including bad input to the pure API."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from scipy import special

from optpo_jax import SPRTConfig, consensus, init_vote_state, posterior_mode_prob, sprt, sprt_update
from optpo_jax.sprt import margin_confidence


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
        ({"threshold": float("nan")}, "threshold", "(0.0, 1.0)"),
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
    from optpo_jax.sprt import rule_confidence
    from tests.scipy_reference import mode_prob_reference

    config = SPRTConfig(rule=rule, prior=prior, max_samples=64)
    counts = jnp.array([[12, 3, 1, 0], [1, 0, 0, 0], [30, 30, 2, 0]], jnp.int32)
    got = np.asarray(rule_confidence(counts, jnp.array([4, 1, 2], jnp.int32), config))
    assert np.all((got >= 0) & (got <= 1)), got
    if rule == "dirichlet":
        want = [mode_prob_reference(np.asarray(row), prior) for row in counts]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


CONFIG = SPRTConfig(rule="esc", esc_window=2, min_samples=1, max_samples=8)


def _rows(prompt_ids, slots, valid=None):
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else jnp.asarray(valid)
    return prompt_ids, jnp.asarray(slots, jnp.int32), valid


def _assert_same_state(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# out-of-range prompt ids are dropped, not clipped onto the first / last prompt.
def test_out_of_range_prompt_ids_are_dropped_everywhere(maybe_jit):
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    # Prompt 1 answers 0, 0 with rows for prompts -1 and 2 (= P) in between; before, -1 voted
    # for prompt 0 and 2 for prompt 1, breaking its run of 0s and using its budget.
    got = update(init_vote_state(2, 3), *_rows([1, -1, 2, 1, 7, -5], [0, 1, 1, 0, 2, 2]))
    want = update(init_vote_state(2, 3), *_rows([1, 1], [0, 0]))
    _assert_same_state(got, want)
    np.testing.assert_array_equal(got.counts, [[0, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(got.num_samples, [0, 2])
    np.testing.assert_array_equal(got.run_length, [0, 2])
    np.testing.assert_array_equal(got.done, [False, True])


# an id that only wraps into range once cast to int32 is still out of range.
def test_unsigned_id_that_wraps_into_range_is_dropped():
    ids = jnp.array([2**32 - 1, 0], jnp.uint32)  # int32(2**32 - 1) is -1, clipped to 0 before
    state = sprt_update(init_vote_state(2, 2), ids, jnp.array([1, 0]), jnp.ones(2, bool), CONFIG)
    np.testing.assert_array_equal(state.counts, [[1, 0], [0, 0]])


# answer slots outside [0, K) act like -1: a sample without a vote that breaks the run.
def test_out_of_range_slots_are_samples_without_votes_and_break_runs(maybe_jit):
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    got = update(init_vote_state(1, 2), *_rows([0, 0, 0], [2, 2, -4]))
    want = update(init_vote_state(1, 2), *_rows([0, 0, 0], [-1, -1, -1]))
    _assert_same_state(got, want)
    np.testing.assert_array_equal(got.num_samples, [3])
    np.testing.assert_array_equal(got.counts, [[0, 0]])
    # Before, two slot-2 answers (which might be different answers) made an esc run and stopped it.
    np.testing.assert_array_equal(got.run_length, [0])
    assert not bool(got.done[0])


# the drop holds under vmap over a batch of vote states, and matches a loop.
def test_vmap_over_states_drops_out_of_range_rows():
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(-2, 6, (4, 12)), jnp.int32)  # P = 4: ids -2..5
    slots = jnp.asarray(rng.integers(-2, 5, (4, 12)), jnp.int32)  # K = 3: slots -2..4
    valid = jnp.asarray(rng.random((4, 12)) < 0.8)
    states = jax.vmap(lambda _: init_vote_state(4, 3))(jnp.arange(4))
    batched = jax.jit(jax.vmap(functools.partial(sprt_update, config=CONFIG)))(states, prompt_ids, slots, valid)
    for i in range(4):
        keep = np.asarray((prompt_ids[i] >= 0) & (prompt_ids[i] < 4))
        clean = sprt_update(
            init_vote_state(4, 3), prompt_ids[i][keep], slots[i][keep], valid[i][keep], CONFIG
        )
        _assert_same_state(jax.tree.map(lambda x, i=i: x[i], batched), clean)
        in_range = np.asarray(valid[i]) & keep
        assert int(batched.num_samples[i].sum()) == int(in_range.sum())


# checked mode raises through checkify, naming the row and the id, under jit and vmap.
def test_checked_mode_names_row_and_prompt_id():
    update = jax.jit(checkify.checkify(functools.partial(sprt_update, config=CONFIG, checked=True)))
    error, state = update(init_vote_state(2, 3), *_rows([0, 1, 0, 5], [0, 1, 2, 0]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 3 has prompt id 5, outside \[0, 2\)"):
        error.throw()
    # Same result as unchecked: the row is dropped.
    _assert_same_state(state, sprt_update(init_vote_state(2, 3), *_rows([0, 1, 0], [0, 1, 2]), CONFIG))
    error, _ = update(init_vote_state(2, 3), *_rows([0, 1, -1, 1], [0, 1, 2, 0], [1, 1, 0, 1]))
    error.throw()  # an invalid row may carry any id (padding)
    error, _ = update(init_vote_state(2, 3), *_rows([0, 1], [-1, 3]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 1 has answer slot 3, outside \[-1, 3\)"):
        error.throw()

    batched = jax.jit(checkify.checkify(jax.vmap(functools.partial(sprt_update, config=CONFIG, checked=True))))
    states = jax.vmap(lambda _: init_vote_state(2, 3))(jnp.arange(2))
    ids = jnp.array([[0, 1], [1, -1]], jnp.int32)
    error, _ = batched(states, ids, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), bool))
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 1 has prompt id -1"):
        error.throw()
    error, _ = batched(states, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), bool))
    error.throw()
    mapped = jax.jit(jax.vmap(checkify.checkify(functools.partial(sprt_update, config=CONFIG, checked=True))))
    error, _ = mapped(states, ids, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), bool))
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 1 has prompt id -1"):
        error.throw()


# called eagerly, checked mode raises without checkify.
def test_checked_mode_raises_eagerly():
    with pytest.raises(checkify.JaxRuntimeError, match="row 0 has prompt id -1"):
        sprt_update(init_vote_state(2, 2), *_rows([-1], [0]), CONFIG, checked=True)


# integer `valid` means `!= 0` (before: bitwise &, so 2 was not valid and 3 was).
def test_integer_valid_is_read_as_nonzero(maybe_jit):
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    state = update(init_vote_state(3, 2), *_rows([0, 1, 2], [0, 0, 0], jnp.array([2, 3, 0], jnp.int32)))
    np.testing.assert_array_equal(state.num_samples, [1, 1, 0])


# float ids, slots or valid raise at trace time, naming the argument and its dtype.
@pytest.mark.parametrize(
    "argument, rows",
    [
        ("prompt_ids", (jnp.array([0.7, 1.2]), jnp.array([0, 0]), jnp.ones(2, bool))),
        ("slot_ids", (jnp.array([0, 1]), jnp.array([0.9, 1.5]), jnp.ones(2, bool))),
        ("slot_ids", (jnp.array([0, 1]), jnp.array([True, False]), jnp.ones(2, bool))),
        ("valid", (jnp.array([0, 1]), jnp.array([0, 0]), jnp.array([0.5, 1.0]))),
    ],
)
def test_non_integer_dtypes_raise_naming_the_argument(argument, rows, maybe_jit):
    dtype = rows[("prompt_ids", "slot_ids", "valid").index(argument)].dtype
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    with pytest.raises(TypeError, match=f"{argument} must .*{dtype}"):
        update(init_vote_state(2, 2), *rows)


# NaN confidence never stops a prompt early (a garbage state stops only at its budget).
def test_negative_counts_in_state_never_stop_early():
    config = SPRTConfig(min_samples=1, max_samples=16)
    state = init_vote_state(1, 3)
    state = state.replace(counts=jnp.array([[9, -5, 0]], jnp.int32))
    state = sprt_update(state, *_rows([0], [0]), config)
    assert np.isnan(float(state.confidence[0])) and not bool(state.done[0])


# the documented vmap over a batch of independent vote problems runs as written and equals
# running each problem alone (reference: an unbatched sprt_update per problem).
def test_readme_vmap_snippet_runs_and_matches_each_problem_alone(capsys):
    from tests.doc_blocks import code_blocks

    (block,) = code_blocks("docs/pure_api.md", "python")
    assert "jax.vmap(functools.partial(sprt_update, config=config))" in block
    namespace = {}
    exec(compile(block, "docs/pure_api.md", "exec"), namespace)  # noqa: S102 - the page as printed
    capsys.readouterr()
    config, batched = namespace["config"], namespace["states"]
    num_problems = namespace["prompt_ids"].shape[0]
    assert num_problems >= 2 and batched.counts.shape[0] == num_problems
    for i in range(num_problems):
        alone = sprt_update(init_vote_state(*batched.counts.shape[1:]), namespace["prompt_ids"][i],
                            namespace["slot_ids"][i], namespace["valid"][i], config)
        _assert_same_state(jax.tree.map(lambda x, i=i: x[i], batched), alone)


# with x64 off, 64-bit host ids that do not fit int32 are out of range (reference: the
# documented behaviour, i.e. the same wave with those rows dropped / their slots -1), not wrapped.
def test_64bit_host_ids_are_range_checked_before_the_int32_cast(maybe_jit):
    assert not jax.config.jax_enable_x64
    config = SPRTConfig(max_samples=8)
    ids = np.array([2**32 + 1, 1, 2, -(2**32) + 3], np.int64)  # int32 would wrap them to 1 and 3
    slots = np.array([0, 2**32 + 3, 1, 0], np.int64)  # int32 would wrap it to slot 3
    valid = np.array([1, 1, 2**32, 1], np.int64)  # 2**32 != 0 is valid; int32 would wrap it to 0
    # Host arrays closed over, so that jit sees them as NumPy constants too.
    got = maybe_jit(lambda state: sprt_update(state, ids, slots, valid, config))(init_vote_state(4, 8))
    want = sprt_update(init_vote_state(4, 8), *_rows([1, 2], [-1, 1]), config)
    _assert_same_state(got, want)
    # The example of the issue: no vote for prompt 1.
    state = sprt_update(init_vote_state(4, 8), np.array([2**32 + 1]), np.array([0]), np.array([True]), config=config)
    np.testing.assert_array_equal(state.counts, np.zeros((4, 8)))


def test_64bit_host_ids_raise_in_checked_mode_naming_the_value():
    config = SPRTConfig(max_samples=8)
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 0 has prompt id 4294967297, outside \[0, 4\)"):
        sprt_update(init_vote_state(4, 8), np.array([2**32 + 1]), np.array([0]), np.array([True]), config=config,
                    checked=True)
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 1 has answer slot 4294967299, outside \[-1, 8\)"):
        sprt_update(init_vote_state(4, 8), np.array([0, 1]), np.array([0, 2**32 + 3]), np.array([True, True]),
                    config=config, checked=True)
    # An earlier row out of range in int32 is still the one named.
    with pytest.raises(checkify.JaxRuntimeError, match=r"row 0 has prompt id 7"):
        sprt_update(init_vote_state(4, 8), np.array([7, 2**40]), np.array([0, 0]), np.array([True, True]),
                    config=config, checked=True)
    # Padding rows (valid False) may carry any id.
    state = sprt_update(init_vote_state(4, 8), np.array([2**40, 0]), np.array([2**40, 0]), np.array([False, True]),
                        config=config, checked=True)
    np.testing.assert_array_equal(state.num_samples, [1, 0, 0, 0])


# an empty wave (R = 0) leaves the votes as they are (reference: a wave of one padding row).
def test_empty_wave_returns_the_state_unchanged(maybe_jit):
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    state = update(init_vote_state(2, 3), *_rows([0, 1, 1], [0, 2, 2]))
    empty = jnp.zeros(0, jnp.int32)
    got = update(state, empty, empty, jnp.zeros(0, bool))
    _assert_same_state(got, state)
    _assert_same_state(got, update(state, *_rows([0], [0], [False])))
    batched = jax.vmap(lambda _: init_vote_state(2, 3))(jnp.arange(2))
    no_rows = jnp.zeros((2, 0), jnp.int32)
    got = jax.vmap(functools.partial(sprt_update, config=CONFIG))(batched, no_rows, no_rows, no_rows != 0)
    _assert_same_state(got, batched)


def test_update_of_no_prompts_drops_every_row(maybe_jit):
    # P = 0: every prompt id is outside [0, P), so every row is dropped (the documented rule).
    empty_state = init_vote_state(2, 3).select(slice(0, 0))
    got = maybe_jit(functools.partial(sprt_update, config=CONFIG))(empty_state, *_rows([0, 1], [0, 0]))
    _assert_same_state(got, empty_state)


# every rule gives NaN, and never stops, for a row with a negative count (reference: the
# dirichlet rule's documented NaN); the clean row keeps the value it has on its own.
@pytest.mark.parametrize("rule", sorted(sprt.RULES))
def test_every_rule_gives_nan_for_negative_counts(rule):
    config = SPRTConfig(rule=rule, threshold=0.9, min_samples=1, max_samples=16, esc_window=1)
    counts = jnp.array([[9, -5, 0], [0, 0, -1], [3, 0, 0]], jnp.int32)
    run_length = jnp.array([9, 9, 3], jnp.int32)
    confidence = jax.jit(sprt.rule_confidence, static_argnums=2)  # eagerly, the predictive rule takes ~20 s
    got = np.asarray(confidence(counts, run_length, config))
    assert np.isnan(got[0]) and np.isnan(got[1]), got
    clean = np.asarray(confidence(counts[2:], run_length[2:], config))
    np.testing.assert_allclose(got[2:], clean, rtol=0, atol=1e-6)
    state = init_vote_state(3, 3).replace(counts=counts, num_samples=jnp.array([4, 1, 3], jnp.int32),
                                          run_slot=jnp.array([0, 0, 0], jnp.int32), run_length=run_length)
    state = jax.jit(sprt_update, static_argnums=4)(state, *_rows([0, 1], [0, 0]), config)
    assert np.isnan(np.asarray(state.confidence[:2])).all()
    assert not np.asarray(state.done[:2]).any()


def test_a_new_stopping_rule_is_one_function_and_one_registry_line(monkeypatch):
    def two_votes(counts, run_length, config):  # confident once the leader has two votes
        return (counts.max(axis=-1) >= 2).astype(jnp.float32)

    monkeypatch.setitem(sprt.RULES, "two_votes", sprt.Rule(two_votes))
    config = sprt.SPRTConfig(rule="two_votes", threshold=0.5, min_samples=1, max_samples=8)
    state = sprt.init_vote_state(2, 8)
    state = sprt.sprt_update(state, jnp.array([0, 0, 1, 1]), jnp.array([3, 3, 1, 2]), jnp.ones(4, bool), config)
    assert np.asarray(state.done).tolist() == [True, False]


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


@pytest.mark.parametrize("fields, message", [
    ({"rule": "margin", "margin_p0": 1.2}, "SPRTConfig.margin_p0 must be a finite number in (0.5, 1.0), got 1.2"),
    ({"rule": "margin", "margin_p0": 0.5}, "SPRTConfig.margin_p0 must be a finite number in (0.5, 1.0), got 0.5"),
    ({"rule": "esc", "learn_prior": True}, "SPRTConfig.learn_prior needs a rule that reads a prior"),
])
def test_invalid_rule_parameters_are_named(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SPRTConfig(**fields)

"""Issue 15, item 13: the pure API (sprt_update, posterior_mode_prob, allocate_wave) on bad input.

Each test names the sub-point it covers; each failed on the code before the fix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from optpo_jax import SPRTConfig, allocate_wave, init_vote_state, posterior_mode_prob, sprt, sprt_update

CONFIG = SPRTConfig(rule="esc", esc_window=2, min_samples=1, max_samples=8)


def _rows(prompt_ids, slots, valid=None):
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else jnp.asarray(valid)
    return prompt_ids, jnp.asarray(slots, jnp.int32), valid


def _assert_same_state(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# 13a: out-of-range prompt ids are dropped, not clipped onto the first / last prompt.
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


# 13a: a dropped row takes no budget from the prompt it would have been clipped onto.
def test_dropped_rows_take_no_budget():
    config = SPRTConfig(rule="fixed", min_samples=1, max_samples=2)
    state = sprt_update(init_vote_state(2, 2), *_rows([2, 2, 1, 1], [1, 1, 0, 0]), config)
    np.testing.assert_array_equal(state.counts, [[0, 0], [2, 0]])


# 13a: an id that only wraps into range once cast to int32 is still out of range.
def test_unsigned_id_that_wraps_into_range_is_dropped():
    ids = jnp.array([2**32 - 1, 0], jnp.uint32)  # int32(2**32 - 1) is -1, clipped to 0 before
    state = sprt_update(init_vote_state(2, 2), ids, jnp.array([1, 0]), jnp.ones(2, bool), CONFIG)
    np.testing.assert_array_equal(state.counts, [[1, 0], [0, 0]])


# 13a: answer slots outside [0, K) act like -1: a sample without a vote that breaks the run.
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


# 13a: the drop holds under vmap over a batch of vote states, and matches a loop.
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


# 13a: checked mode raises through checkify, naming the row and the id, under jit and vmap.
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


# 13a: called eagerly, checked mode raises without checkify.
def test_checked_mode_raises_eagerly():
    with pytest.raises(checkify.JaxRuntimeError, match="row 0 has prompt id -1"):
        sprt_update(init_vote_state(2, 2), *_rows([-1], [0]), CONFIG, checked=True)


# 13b: integer `valid` means `!= 0` (before: bitwise &, so 2 was not valid and 3 was).
def test_integer_valid_is_read_as_nonzero(maybe_jit):
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    state = update(init_vote_state(3, 2), *_rows([0, 1, 2], [0, 0, 0], jnp.array([2, 3, 0], jnp.int32)))
    np.testing.assert_array_equal(state.num_samples, [1, 1, 0])


# 13b: float ids, slots or valid raise at trace time, naming the argument and its dtype.
@pytest.mark.parametrize(
    "argument, rows",
    [
        ("prompt_ids", (jnp.array([0.7, 1.2]), jnp.array([0, 0]), jnp.ones(2, bool))),
        ("answer_slots", (jnp.array([0, 1]), jnp.array([0.9, 1.5]), jnp.ones(2, bool))),
        ("answer_slots", (jnp.array([0, 1]), jnp.array([True, False]), jnp.ones(2, bool))),
        ("valid", (jnp.array([0, 1]), jnp.array([0, 0]), jnp.array([0.5, 1.0]))),
    ],
)
def test_non_integer_dtypes_raise_naming_the_argument(argument, rows, maybe_jit):
    dtype = rows[("prompt_ids", "answer_slots", "valid").index(argument)].dtype
    update = maybe_jit(functools.partial(sprt_update, config=CONFIG))
    with pytest.raises(TypeError, match=f"{argument} must .*{dtype}"):
        update(init_vote_state(2, 2), *rows)


# 13c: K = 0 is a shape: raise at trace time instead of dividing by zero.
def test_posterior_rejects_empty_answer_axis(maybe_jit):
    with pytest.raises(ValueError, match=r"K >= 1.*\(3, 0\)"):
        maybe_jit(posterior_mode_prob)(jnp.zeros((3, 0), jnp.int32))


# 13c: a row with a negative count is NaN (before: the negative count was ignored).
def test_posterior_negative_count_row_is_nan(maybe_jit):
    counts = jnp.array([[-3, 2, 1], [-1, -1, 0], [2, 1, 0]], jnp.int32)
    got = np.asarray(maybe_jit(posterior_mode_prob)(counts))
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert got[2] == pytest.approx(float(posterior_mode_prob(jnp.array([2, 1, 0], jnp.int32))), abs=0)


# 13c: NaN confidence never stops a prompt early (a garbage state stops only at its budget).
def test_negative_counts_in_state_never_stop_early():
    config = SPRTConfig(min_samples=1, max_samples=16)
    state = init_vote_state(1, 3)
    state = state.replace(counts=jnp.array([[9, -5, 0]], jnp.int32))
    state = sprt_update(state, *_rows([0], [0]), config)
    assert np.isnan(float(state.confidence[0])) and not bool(state.done[0])


# 13c: checked mode of posterior_mode_prob names the index and value.
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


# 13d: num_rows must be an int >= 1 (before: 3.5 gave 4 rows).
@pytest.mark.parametrize("num_rows, error", [(3.5, TypeError), (4.0, TypeError), (True, TypeError),
                                             ("4", TypeError), (np.float32(2), TypeError), (0, ValueError)])
def test_allocate_wave_requires_integer_num_rows(num_rows, error):
    with pytest.raises(error, match="num_rows"):
        allocate_wave(init_vote_state(2, 2), num_rows, SPRTConfig())


def test_allocate_wave_accepts_numpy_integer():
    prompt_ids, valid = allocate_wave(init_vote_state(2, 2), np.int64(3), SPRTConfig())
    assert prompt_ids.shape == valid.shape == (3,)


# --- Issue: hardening the public pure API (README vmap, 64-bit host ids, empty waves, negative counts). ---


# 1: the documented vmap over a batch of independent vote problems runs as written and equals
# running each problem alone (reference: an unbatched sprt_update per problem).
def test_readme_vmap_snippet_runs_and_matches_each_problem_alone(capsys):
    from doc_blocks import code_blocks

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
                            namespace["answer_slots"][i], namespace["valid"][i], config)
        _assert_same_state(jax.tree.map(lambda x, i=i: x[i], batched), alone)


# 4: AnswerSlots is part of the public API and maps each prompt's answers to slots in order of appearance.
def test_answer_slots_is_exported():
    import optpo_jax
    from optpo_jax import AnswerSlots

    assert "AnswerSlots" in optpo_jax.__all__
    slots = AnswerSlots(num_prompts=2, num_slots=3)
    np.testing.assert_array_equal(slots.assign([0, 0, 1, 0, 1], ["7", "9", "9", "7", None]), [0, 1, 0, 0, -1])
    assert slots.answer(0, 1) == "9" and slots.answer(1, -1) is None


# 5: with x64 off, 64-bit host ids that do not fit int32 are out of range (reference: the
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


def test_64bit_host_counts_that_do_not_fit_give_nan():
    # Reference: NaN for a count above max_count (documented); the other row as computed alone.
    got = np.asarray(posterior_mode_prob(np.array([[2**32 + 5, 0], [3, 1], [-(2**32) + 2, 1]], np.int64)))
    assert np.isnan(got[0]) and np.isnan(got[2])
    assert got[1] == float(posterior_mode_prob(jnp.array([3, 1], jnp.int32)))
    with pytest.raises(checkify.JaxRuntimeError, match=r"counts\[0, 0\] = 4294967301"):
        posterior_mode_prob(np.array([[2**32 + 5, 0]], np.int64), checked=True)


# 6: an empty wave (R = 0) leaves the votes as they are (reference: a wave of one padding row).
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


# 7: every rule gives NaN, and never stops, for a row with a negative count (reference: the
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

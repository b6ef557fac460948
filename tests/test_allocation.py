"""optpo_jax/allocation.py: rollouts_to_stop, allocate_wave and refill's budgets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax import SPRTConfig, allocate_wave, init_vote_state, sprt_update
from optpo_jax.allocation import rollouts_to_stop
from optpo_jax.prior import fitted_concentration, init_prior_state, update_prior
from optpo_jax.sprt import rule_confidence, stop_condition


def _rows_per_prompt(prompt_ids, valid, num_prompts):
    return np.bincount(np.asarray(prompt_ids)[np.asarray(valid)], minlength=num_prompts)


def _state_after(config, answers_per_prompt, num_slots=4):
    """Feeds each prompt its answers in one wave."""
    state = init_vote_state(len(answers_per_prompt), num_slots)
    prompt_ids = [p for p, answers in enumerate(answers_per_prompt) for _ in answers]
    slots = [a for answers in answers_per_prompt for a in answers]
    if not slots:
        return state
    ones = jnp.ones(len(slots), bool)
    return sprt_update(state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(slots, jnp.int32), ones, config)


@pytest.mark.parametrize("rule, learned", [("dirichlet", False), ("beta", False), ("esc", False), ("fixed", False),
                                           ("dirichlet", True), ("beta", True)])  # switch / traced learned prior
def test_rollouts_to_stop_is_the_fewest_unanimous_rollouts(rule, learned):
    # Brute force: the smallest n >= 1 whose hypothetical all-agreeing state stops.
    config = SPRTConfig(rule=rule, threshold=0.97, min_samples=3, max_samples=20, esc_window=5)
    answers = [[], [0], [0, 0, 1], [1, 2, 1, 1, 0, 2, -1], [2, 2]]
    state = _state_after(config, answers)
    prior_state = None
    if learned:  # unanimous finished prompts: the fit (0.1) is far from the config's 1.0
        prior_state = update_prior(init_prior_state(), jnp.array([[9, 0], [8, 0], [7, 0]]))
        assert fitted_concentration(prior_state, config.prior) != config.prior
    got = np.asarray(jax.jit(lambda votes, prior: rollouts_to_stop(votes, config, prior))(state, prior_state))
    for p in range(len(answers)):
        if state.done[p]:
            assert got[p] == 0
            continue
        leader = int(np.argmax(state.counts[p]))
        for n in range(1, config.max_samples + 1):
            counts = state.counts[p].at[leader].add(n)
            run = (state.run_length[p] if state.run_slot[p] == leader else 0) + n
            conf = rule_confidence(counts[None], jnp.asarray([run]), config, prior_state)
            if stop_condition(conf, state.num_samples[p][None] + n, config)[0]:
                break
        assert got[p] == n, (p, got[p], n)
    if learned:  # the learned prior moved some demand
        assert not np.array_equal(got, np.asarray(rollouts_to_stop(state, config)))


def test_fresh_prompts_get_their_demand_then_spare_rows_fill_budgets():
    config = SPRTConfig(threshold=0.95, min_samples=4, max_samples=10)
    state = init_vote_state(3, 4)
    prompt_ids, valid = allocate_wave(state, 16, config)
    rows = _rows_per_prompt(prompt_ids, valid, 3)
    # 4 unanimous votes give 0.969 >= 0.95, so each asks for 4; the 4 spare rows are
    # spread one each, and the last goes to the least settled (all tie: prompt 0).
    np.testing.assert_array_equal(rows, [6, 5, 5])
    assert np.all(np.diff(np.asarray(prompt_ids)[np.asarray(valid)]) >= 0)  # contiguous blocks


def test_short_waves_serve_earliest_prompts_and_idle_rows_are_invalid():
    config = SPRTConfig(threshold=0.95, min_samples=4, max_samples=6)
    state = init_vote_state(5, 4)
    rows = _rows_per_prompt(*allocate_wave(state, 10, config), 5)
    np.testing.assert_array_equal(rows, [4, 4, 2, 0, 0])
    state = _state_after(config, [[0] * 6, [1] * 6, [0, 1], [], [2] * 6])
    prompt_ids, valid = allocate_wave(state, 16, config)
    rows = _rows_per_prompt(prompt_ids, valid, 5)
    np.testing.assert_array_equal(rows, [0, 0, 4, 6, 0])  # prompt 2 has 4 left, prompt 3 all 6
    assert int(np.sum(valid)) == 10 and np.all(np.asarray(prompt_ids)[~np.asarray(valid)] == 0)


def test_allocation_and_updates_finish_every_prompt_within_budget(maybe_jit):
    config = SPRTConfig(threshold=0.95, min_samples=2, max_samples=24)
    rng = np.random.default_rng(1)
    num_prompts, num_slots, num_rows = 12, 6, 32
    answer_probs = rng.dirichlet(np.full(num_slots, 0.5), size=num_prompts)
    allocate = maybe_jit(functools.partial(allocate_wave, num_rows=num_rows, config=config))
    update = maybe_jit(functools.partial(sprt_update, config=config))
    state = init_vote_state(num_prompts, num_slots)
    for wave in range(50):
        if np.all(state.done):
            break
        prompt_ids, valid = allocate(state)
        slots = [rng.choice(num_slots, p=answer_probs[p]) for p in np.asarray(prompt_ids)]
        state = update(state, prompt_ids, jnp.asarray(slots, jnp.int32), valid)
    assert np.all(state.done) and wave < 50
    assert np.all(np.asarray(state.num_samples) <= config.max_samples)
    assert np.all(np.asarray(state.num_samples) >= config.min_samples)


def test_rejects_empty_wave():
    with pytest.raises(ValueError, match="num_rows"):
        allocate_wave(init_vote_state(2, 2), 0, SPRTConfig())


def test_allocate_wave_without_prompts_returns_an_all_invalid_wave(maybe_jit):
    # P = 0 (e.g. an empty selection): no prompt can use a row (reference: the module's rule,
    # unusable rows are valid False with prompt id 0).
    state = init_vote_state(2, 3).select(slice(0, 0))
    allocate = maybe_jit(lambda votes: allocate_wave(votes, 5, SPRTConfig()))
    prompt_ids, valid = allocate(state)
    np.testing.assert_array_equal(prompt_ids, np.zeros(5, np.int32))
    np.testing.assert_array_equal(valid, np.zeros(5, bool))
    assert prompt_ids.dtype == jnp.int32 and valid.dtype == jnp.bool_


def _rows(prompt_ids, slots, valid=None):
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else jnp.asarray(valid)
    return prompt_ids, jnp.asarray(slots, jnp.int32), valid


# a dropped row takes no budget from the prompt it would have been clipped onto.
def test_dropped_rows_take_no_budget():
    config = SPRTConfig(rule="fixed", min_samples=1, max_samples=2)
    state = sprt_update(init_vote_state(2, 2), *_rows([2, 2, 1, 1], [1, 1, 0, 0]), config)
    np.testing.assert_array_equal(state.counts, [[0, 0], [2, 0]])


# num_rows must be an int >= 1 (before: 3.5 gave 4 rows).
@pytest.mark.parametrize("num_rows, error", [(3.5, TypeError), (4.0, TypeError), (True, TypeError),
                                             ("4", TypeError), (np.float32(2), TypeError), (0, ValueError)])
def test_allocate_wave_requires_integer_num_rows(num_rows, error):
    with pytest.raises(error, match="num_rows"):
        allocate_wave(init_vote_state(2, 2), num_rows, SPRTConfig())


def test_allocate_wave_accepts_numpy_integer():
    prompt_ids, valid = allocate_wave(init_vote_state(2, 2), np.int64(3), SPRTConfig())
    assert prompt_ids.shape == valid.shape == (3,)

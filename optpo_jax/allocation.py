"""Which prompt each row of the next fixed-size wave (``allocate_wave``) or each freed row of a
continuous decode (``refill``) serves.

The rule (``allocate_wave``), in two passes over the active prompts:

1. Demand. Each prompt asks for the fewest further rollouts after which it would stop
   if they all agreed with its current leader (ConSol, arXiv 2503.17587, sizes its
   batches the same way), capped by its remaining budget. For a prompt that has not
   started this is at least ``min_samples``; a unanimous prompt at threshold 0.95
   asks for 4 at prior 1. Demands are granted in prompt order (lower index first), so
   when rows are short the earliest prompts finish first.
2. Spare rows. Rows left after every demand is met are spread evenly over the
   prompts with budget left; the remainder goes to the prompts least likely to be
   settled (lowest confidence first, prompt order on ties), each up to its budget. A spare row is never idle while some prompt has budget: every
   rollout drawn is reused by the GRPO update.

Rows that no prompt can use are returned with ``valid`` False and prompt id 0.

``refill`` is the same rule with the rollouts already in flight counted as agreeing
votes: a continuous decode calls it whenever rows finish, for the freed rows only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.prior import PriorState
from optpo_jax.sprt import SPRTConfig, VoteState, remaining_budget, rule_confidence, stop_condition


def rollouts_to_stop(state: VoteState, config: SPRTConfig, prior_state: PriorState | None = None) -> jax.Array:
    """Fewest further rollouts after which each prompt stops if all agree with its leader.

    Binary search over n in [1, budget]; stopping is monotone in n because more
    agreeing votes only raise every rule's confidence. Returns [P] int32, 0 for done
    prompts. A prompt with budget left always stops at n = budget.
    """
    num_prompts, num_slots = state.counts.shape
    budget = remaining_budget(state, config)
    leader = jnp.argmax(state.counts, axis=-1)
    leader_onehot = jax.nn.one_hot(leader, num_slots, dtype=jnp.int32)
    run_continues = state.run_slot == leader

    def stops_after(num_more):
        counts = state.counts + leader_onehot * num_more[:, None]
        run_length = jnp.where(run_continues, state.run_length, 0) + num_more
        confidence = rule_confidence(counts, run_length, config, prior_state)
        return stop_condition(confidence, state.num_samples + num_more, config)

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        searching = high - low > 1
        middle_stops = stops_after(middle)
        return (jnp.where(searching & ~middle_stops, middle, low), jnp.where(searching & middle_stops, middle, high))

    # low: known not to stop (or done); high: known to stop. A loop, not unrolled, so the
    # rule (a switch over the prior grid when the prior is learned) is compiled once.
    bounds = (jnp.zeros(num_prompts, jnp.int32), budget)
    _, high = jax.lax.fori_loop(0, math.ceil(math.log2(config.max_samples + 1)), halve, bounds)
    return high


def _fill_in_order(room: jax.Array, order: jax.Array, num_rows) -> jax.Array:
    """Grants room[p] rows to prompts in ``order`` until num_rows run out. [P] -> [P]."""
    room_sorted = room[order]
    before = jnp.cumsum(room_sorted) - room_sorted
    granted_sorted = jnp.clip(num_rows - before, 0, room_sorted)
    return jnp.zeros_like(room).at[order].set(granted_sorted)


def rows_to_prompts(rows_per_prompt: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Lays out per-prompt row counts [P] as contiguous rows: ([num_rows], [num_rows])."""
    ends = jnp.cumsum(rows_per_prompt)
    row = jnp.arange(num_rows)
    prompt_ids = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)
    valid = row < jnp.sum(rows_per_prompt)  # ends[-1], and 0 without prompts (P = 0)
    return jnp.where(valid, prompt_ids, 0), valid


def _check_num_rows(num_rows) -> int:
    if isinstance(num_rows, (bool, np.bool_)) or not isinstance(num_rows, (int, np.integer)):
        raise TypeError(
            f"num_rows must be a Python int (static under jit), got {num_rows!r} of type {type(num_rows).__name__}"
        )
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows!r}")
    return int(num_rows)


def allocate_wave(state: VoteState, num_rows: int, config: SPRTConfig,
                  prior_state: PriorState | None = None) -> tuple[jax.Array, jax.Array]:
    """Gives each row of a wave of ``num_rows`` rows to an active prompt.

    Args:
      state: votes of P prompts.
      num_rows: static wave size R >= 1: a Python int or NumPy integer (not a bool,
        a float or a traced value; under ``jit`` mark it static).
      config: the stopping rule, whose budget and thresholds size the demands.
      prior_state: the learned prior the rule uses (``sprt_update``'s), or None.

    Returns:
      prompt_ids: [R] int32 prompt of each row, rows of one prompt contiguous.
      valid: [R] bool, False for rows that no active prompt can use (every row when P = 0).

    Raises:
      TypeError if ``num_rows`` is not an integer, ValueError if it is below 1.
    """
    num_rows = _check_num_rows(num_rows)
    in_flight = jnp.zeros(state.counts.shape[:1], jnp.int32)
    return refill(state, in_flight, num_rows, config, prior_state)


def refill(state: VoteState, in_flight: jax.Array, num_rows: int, config: SPRTConfig,
           prior_state: PriorState | None = None, num_free=None, to_stop=None) -> tuple[jax.Array, jax.Array]:
    """Gives each freed row of a continuous decode to an active prompt, counting rollouts in flight.

    ``allocate_wave``'s two passes, with each prompt's in-flight rollouts counted as if
    they already agreed with its leader: a prompt's demand is ``rollouts_to_stop`` minus
    its rollouts in flight (a prompt whose rollouts in flight could already settle it
    demands no more), and its room is its remaining budget minus them, so a prompt never
    has more rollouts drawn or in flight than ``max_samples``. Rows left after every
    demand still go to prompts with room, as in a wave (a continuous driver with
    lookahead rarely has any: the next batch's demands take them). ``allocate_wave`` is
    this with nothing in flight.

    Args:
      state: votes of P prompts.
      in_flight: [P] int32 rollouts of each prompt being decoded (not yet voted).
      num_rows: static capacity R >= 1 (a Python int; static under ``jit``).
      config, prior_state: the stopping rule and its learned prior, as for ``allocate_wave``.
      num_free: rows actually free, 0 <= num_free <= R (may be traced); default R. Rows
        from ``num_free`` on come back invalid, so one compilation serves every count.
      to_stop: [P] ``rollouts_to_stop(state, config, prior_state)`` when the caller keeps it
        current (a continuous driver re-plans only the prompts a vote touched); default computed.

    Returns:
      prompt_ids [R] int32 and valid [R] bool, as ``allocate_wave``.
    """
    num_rows = _check_num_rows(num_rows)
    num_free = num_rows if num_free is None else jnp.clip(num_free, 0, num_rows)
    num_prompts = state.counts.shape[0]
    in_flight = jnp.asarray(in_flight, jnp.int32)
    budget = jnp.maximum(remaining_budget(state, config) - in_flight, 0)
    to_stop = rollouts_to_stop(state, config, prior_state) if to_stop is None else jnp.asarray(to_stop, jnp.int32)
    demand = jnp.minimum(jnp.maximum(to_stop - in_flight, 0), budget)
    prompt_order = jnp.arange(num_prompts)
    granted = _fill_in_order(demand, prompt_order, num_free)
    spare = num_free - jnp.sum(granted)
    room = budget - granted
    # Spread spare rows evenly over prompts with room, the remainder least settled first.
    even_share = jnp.minimum(room, spare // jnp.maximum(jnp.sum(room > 0), 1))
    granted = granted + even_share
    spare = spare - jnp.sum(even_share)
    least_settled_first = jnp.lexsort((prompt_order, state.confidence))
    granted = granted + _fill_in_order(room - even_share, least_settled_first, spare)
    return rows_to_prompts(granted, num_rows)

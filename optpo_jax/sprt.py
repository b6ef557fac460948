"""Vote state, stopping rules and the pure sequential-test update.

Each prompt accumulates votes (answer slots of its rollouts) wave after wave; after
every wave a stopping rule turns the votes into a confidence and marks the prompt
done. Rules (``SPRTConfig.rule``, the ``RULES`` registry: one pure confidence function
each, ``(counts [..., K], run_length [...], config) -> [...]``):

- ``dirichlet`` (OptPO, arXiv 2512.02882): the posterior probability that the leading
  answer is the policy's mode under a Dirichlet posterior with one extra slot for
  unseen answers (``posterior_mode_prob``).
- ``beta`` (Adaptive-Consistency, arXiv 2305.11860): P(p_1 > p_2) for leader and
  runner-up under Beta(v1 + a, v2 + a), i.e. 1 - I_0.5(v1 + a, v2 + a).
- ``esc`` (Early-Stopping Self-Consistency, arXiv 2401.10480): stop once the last
  ``esc_window`` answers all agree. Confidence is 1 then, else 0.
- ``margin`` (the OptPO paper's sequential test; Wald's SPRT on the vote margin as in
  ConSol, arXiv 2503.17587): the posterior of "the leader is the right answer" among
  the hypotheses "answer j is right" (``margin_confidence``).
- ``predictive``: the probability that the leader is still the plurality once the
  budget is spent, under the Dirichlet-multinomial predictive of the remaining votes
  (``predictive.plurality_at_budget_prob``): it targets the full-budget label itself.
- ``fixed`` (TTRL, arXiv 2504.16084): draw exactly ``max_samples``; confidence is the
  Dirichlet one, for reporting only.

A prompt is done when (confidence >= threshold and num_samples >= min_samples) or
num_samples >= max_samples.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import checkify
from jax.scipy.special import betainc

from optpo_jax import posterior
from optpo_jax.field_ranges import INT, REAL, FieldError, check_ranges, ranged
from optpo_jax.posterior import host_check, host_int32, posterior_mode_prob
from optpo_jax.predictive import MAX_REMAINING, plurality_at_budget_prob
from optpo_jax.prior import PriorState, branch_concentrations, learned_concentration, prior_branch

# Concentrations every rule computes with in float32: below, the Dirichlet rule's grid
# (nodes ~ 1 / prior) and the Beta rule's betainc degenerate; above, the predictive rule's
# lgamma differences (~1e4 at 1e3) lose all digits.
PRIOR_RANGE = (1e-3, 1e3)
# Vote tables are [P, K] with K >= max_samples (``AnswerSlots`` needs a slot per rollout):
# 2**20 slots is 4 MiB a prompt. Rules may bound it lower (``Rule.check``).
MAX_SAMPLES_LIMIT = 2**20


@dataclasses.dataclass(frozen=True)
class SPRTConfig:
    """Static configuration of the stopping rule; validates itself on construction.

    Attributes:
      rule: one of ``RULES``.
      threshold: confidence in (0, 1) at which a prompt stops (dirichlet, beta).
      prior: Dirichlet / Beta concentration a, a finite number in ``PRIOR_RANGE``
        ([1e-3, 1e3]).
      min_samples: rollouts a prompt draws before it may stop, an int >= 1.
      max_samples: budget per prompt, an int in [min_samples, ``MAX_SAMPLES_LIMIT``]; a
        prompt stops there whatever its confidence. The rules bound it further by what
        they allocate: dirichlet and fixed by the size of the posterior tables
        (``posterior.MAX_TABLE_ENTRIES`` entries, which a small prior reaches sooner),
        predictive by ``predictive.MAX_REMAINING``.
      esc_window: number of trailing answers that must agree for ``esc``, an int >= 1.
      learn_prior: the training loop fits the concentration to finished prompts' votes
        (``prior.PriorState``) and passes it to the rule; ``prior`` until the first fit.
      margin_p0: for ``margin``, the right answer's share against any other answer
        under its hypothesis, in (0.5, 1): each vote moves the log-odds by log(p0 / (1 - p0)).

    Ranged fields (``field_ranges``) take Python or NumPy numbers (stored as Python ones),
    ints never bools or floats; every error is a ValueError naming the field, the value and
    the range.
    """

    rule: str = "dirichlet"
    threshold: float = ranged(0.95, REAL, 0.0, 1.0, False, False)
    prior: float = ranged(1.0, REAL, *PRIOR_RANGE)
    min_samples: int = ranged(4, INT, 1, MAX_SAMPLES_LIMIT)
    max_samples: int = ranged(64, INT, 1, MAX_SAMPLES_LIMIT)
    esc_window: int = ranged(8, INT, 1, MAX_SAMPLES_LIMIT)
    margin_p0: float = ranged(0.75, REAL, 0.5, 1.0, False, False)
    learn_prior: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"SPRTConfig.rule must be one of {tuple(RULES)}, got {self.rule!r}")
        check_ranges(self)
        if self.min_samples > self.max_samples:
            raise ValueError(
                f"SPRTConfig.min_samples ({self.min_samples}) must not exceed "
                f"SPRTConfig.max_samples ({self.max_samples})"
            )
        if self.learn_prior and not RULES[self.rule].reads_prior:
            raise ValueError(f"SPRTConfig.learn_prior needs a rule that reads a prior "
                             f"{tuple(name for name, rule in RULES.items() if rule.reads_prior)}, got rule {self.rule!r}")
        check = RULES[self.rule].check
        if check is not None:
            check(self)


def _check_posterior_tables(config: SPRTConfig) -> None:
    """The Dirichlet rule's tables (one per concentration it may use) fit ``posterior.MAX_TABLE_ENTRIES``."""
    for value in branch_concentrations(config.prior) if config.learn_prior else (config.prior,):
        entries = posterior.table_entries(value, config.max_samples)
        if entries > posterior.MAX_TABLE_ENTRIES:
            which = (f"SPRTConfig.prior={value!r}" if value == config.prior
                     else f"prior={value!r} (learn_prior: a concentration of prior.PRIOR_GRID)")
            raise FieldError(
                "SPRTConfig", "max_samples", f"={config.max_samples} with {which} needs posterior tables of "
                f"{entries} entries for rule {config.rule!r}; at most {posterior.MAX_TABLE_ENTRIES} fit "
                "(their nodes grow like 1 / prior): lower max_samples or raise the prior"
            )


def _check_predictive_budget(config: SPRTConfig) -> None:
    """The predictive rule's [X, R, R] arrays grow like max_samples**3: at most ``MAX_REMAINING``."""
    if config.max_samples > MAX_REMAINING:
        raise FieldError(
            "SPRTConfig", "max_samples", f"={config.max_samples} is too large for rule 'predictive' (its arrays "
            f"grow like max_samples**3): at most {MAX_REMAINING}"
        )


@struct.dataclass
class VoteState:
    """Votes of P prompts over K answer slots.

    Attributes:
      counts: [P, K] int32 votes per answer slot.
      num_samples: [P] int32 rollouts drawn, including those without an answer.
      done: [P] bool, the prompt has stopped; later rows for it are ignored.
      confidence: [P] float32, the rule's confidence after the last update.
      run_slot: [P] int32 answer slot of the current run of identical answers (-1 none).
      run_length: [P] int32 length of that run (used by the ``esc`` rule).
    """

    counts: jax.Array
    num_samples: jax.Array
    done: jax.Array
    confidence: jax.Array
    run_slot: jax.Array
    run_length: jax.Array

    def select(self, prompts) -> VoteState:
        """The votes of ``prompts`` (a slice or index array) as a VoteState of those prompts."""
        return jax.tree.map(lambda values: values[prompts], self)


def init_vote_state(num_prompts: int, num_slots: int) -> VoteState:
    """Empty votes for ``num_prompts`` prompts with ``num_slots`` answer slots each."""
    if num_prompts < 1 or num_slots < 1:
        raise ValueError(f"need num_prompts >= 1 and num_slots >= 1, got {num_prompts}, {num_slots}")
    zeros = jnp.zeros((num_prompts,), jnp.int32)
    return VoteState(
        counts=jnp.zeros((num_prompts, num_slots), jnp.int32),
        num_samples=zeros,
        done=jnp.zeros((num_prompts,), bool),
        confidence=jnp.zeros((num_prompts,), jnp.float32),
        run_slot=zeros - 1,
        run_length=zeros,
    )


def leader_and_runner_up(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Vote counts of the leading and second answer. counts [..., K] -> ([...], [...])."""
    if counts.shape[-1] == 1:
        return counts[..., 0], jnp.zeros_like(counts[..., 0])
    top_two = jax.lax.top_k(counts, 2)[0]
    return top_two[..., 0], top_two[..., 1]


def dirichlet_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig) -> jax.Array:
    """P(the leader is the policy's mode) under Dir(counts + prior, prior for unseen answers)."""
    del run_length
    return posterior_mode_prob(counts, config.prior, max_count=config.max_samples)


def beta_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig, prior=None) -> jax.Array:
    """P(p_leader > p_runner_up) under Beta(v1 + prior, v2 + prior); 0 before the first vote.

    ``prior`` (a float or a traced scalar) overrides ``config.prior``.
    """
    del run_length
    prior = config.prior if prior is None else prior
    leader, runner_up = leader_and_runner_up(counts)
    alpha = leader.astype(jnp.float32) + prior
    beta = runner_up.astype(jnp.float32) + prior
    return jnp.where(leader > 0, 1.0 - betainc(alpha, beta, 0.5), 0.0)


def esc_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig) -> jax.Array:
    """1 once the last ``esc_window`` answers agree, else 0."""
    del counts
    return (run_length >= config.esc_window).astype(jnp.float32)


def margin_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig) -> jax.Array:
    """Posterior of H_leader among H_j = "answer j is right", j over the answers seen plus one not seen yet.

    Under H_j answer j has share p0 against any other answer i, whose own probability q_i
    is the same under every hypothesis but H_i. The likelihood ratio of H_a to H_b is then
    (p0 / q)^(n_a - n_b) with q = 1 - p0 the share of the other side of a pair: every other
    answer's factor cancels. With a uniform prior over the hypotheses,
    P(H_a | votes) = r^(n_a) / (sum_j r^(n_j) + 1), r = p0 / (1 - p0), the + 1 being the
    hypothesis that the right answer has not been drawn yet (count 0; without it a single
    vote would be certainty). With two answers the test stops when the margin
    n_a - n_b >= log(t / (1 - t)) / log r: Wald's SPRT on the margin. 0 before the first vote.
    """
    del run_length
    log_ratio = jnp.log(config.margin_p0 / (1.0 - config.margin_p0))
    counts = counts.astype(jnp.float32)
    leader = jnp.max(counts, axis=-1)
    # Relative to the leader, so nothing overflows: r^(n_j - n_a) <= 1.
    others = jnp.where(counts > 0, jnp.exp((counts - leader[..., None]) * log_ratio), 0.0)
    confidence = 1.0 / (jnp.sum(others, axis=-1) + jnp.exp(-leader * log_ratio))
    return jnp.where(leader > 0, confidence, 0.0)


def predictive_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig, prior=None) -> jax.Array:
    """P(the leader is strictly the plurality after the budget's remaining votes), under Dir(counts + prior).

    The remaining votes are ``max_samples`` minus the votes so far (rollouts without an
    answer are not in ``counts``, so this may count a few votes too many: the safe side).
    ``prior`` (a float or a traced scalar) overrides ``config.prior``.
    """
    del run_length
    remaining = jnp.maximum(config.max_samples - jnp.sum(counts, axis=-1), 0)
    return plurality_at_budget_prob(counts, remaining, config.prior if prior is None else prior, config.max_samples)


class Rule(NamedTuple):
    """A stopping rule: its confidence, whether reaching the threshold stops a prompt
    (False: only the budget does, and the confidence is reported, not acted on), whether
    its confidence reads ``config.prior`` (so a learned prior applies), whether it takes the
    prior as a traced ``prior=`` argument (else the prior is static), and a check of a
    config's sizes against what the rule allocates (ValueError), or None."""

    confidence: Callable[..., jax.Array]
    stops_early: bool = True
    reads_prior: bool = False
    traced_prior: bool = False
    check: Callable[[SPRTConfig], None] | None = None


RULES: dict[str, Rule] = {
    "dirichlet": Rule(dirichlet_confidence, reads_prior=True, check=_check_posterior_tables),
    "beta": Rule(beta_confidence, reads_prior=True, traced_prior=True),
    "esc": Rule(esc_confidence),
    "margin": Rule(margin_confidence),
    "predictive": Rule(predictive_confidence, reads_prior=True, traced_prior=True, check=_check_predictive_budget),
    "fixed": Rule(dirichlet_confidence, stops_early=False, reads_prior=True, check=_check_posterior_tables),
}


def rule_confidence(counts: jax.Array, run_length: jax.Array, config: SPRTConfig,
                    prior_state: PriorState | None = None) -> jax.Array:
    """The configured rule's confidence for votes ``counts [..., K]`` and ``run_length [...]``.

    With ``prior_state`` the rule's concentration is the one fitted there (``config.prior``
    before any prompt finished): passed as a traced value where the rule takes one, else one
    compiled branch per concentration of ``PRIOR_GRID`` (the Dirichlet rule's quadrature
    tables depend on it).

    A row with a negative count is not a vote state: its confidence is NaN under every rule
    (a NaN never reaches the threshold, so such a prompt stops only at its budget).
    """
    counts = jnp.asarray(counts)
    confidence = _rule_confidence(counts, run_length, config, prior_state)
    return jnp.where(jnp.any(counts < 0, axis=-1), jnp.nan, confidence)


def _rule_confidence(counts, run_length, config: SPRTConfig, prior_state: PriorState | None) -> jax.Array:
    """``rule_confidence`` before the NaN for negative counts."""
    rule = RULES[config.rule]
    confidence = rule.confidence
    if prior_state is None:
        return confidence(counts, run_length, config)
    if not rule.reads_prior:
        raise ValueError(f"a learned prior needs a rule that reads a prior, got rule {config.rule!r}")
    if rule.traced_prior:
        return confidence(counts, run_length, config, prior=learned_concentration(prior_state, config.prior))
    branches = [functools.partial(confidence, config=dataclasses.replace(config, prior=value))
                for value in branch_concentrations(config.prior)]
    return jax.lax.switch(prior_branch(prior_state), branches, counts, run_length)


def stop_condition(confidence, num_samples, config: SPRTConfig) -> jax.Array:
    """Whether a prompt with this confidence and sample count stops. [...] -> [...] bool."""
    at_budget = num_samples >= config.max_samples
    if not RULES[config.rule].stops_early:
        return at_budget
    return (confidence >= config.threshold) & (num_samples >= config.min_samples) | at_budget


def remaining_budget(state: VoteState, config: SPRTConfig) -> jax.Array:
    """Rollouts each prompt may still draw: [P] int32, 0 once done."""
    return jnp.where(state.done, 0, jnp.maximum(config.max_samples - state.num_samples, 0))


def consensus(state: VoteState) -> jax.Array:
    """Slot of each prompt's pseudo-label: the most-voted slot, lowest index on ties.

    Returns [P] int32, -1 for prompts without any vote.
    """
    best = jnp.argmax(state.counts, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.max(state.counts, axis=-1) > 0, best, -1)


def rank_within_prompt(prompt_ids: jax.Array, keep: jax.Array) -> jax.Array:
    """For each row, how many earlier kept rows serve the same prompt. [R] -> [R] int32."""
    num_rows = prompt_ids.shape[0]
    # Sort kept rows by prompt, stable in row order; dropped rows go last.
    sort_key = jnp.where(keep, prompt_ids, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(sort_key, stable=True)
    sorted_key = sort_key[order]
    position = jnp.arange(num_rows)
    starts = jnp.concatenate([jnp.array([True]), sorted_key[1:] != sorted_key[:-1]])
    segment_start = jax.lax.cummax(jnp.where(starts, position, 0))
    return jnp.zeros(num_rows, jnp.int32).at[order].set((position - segment_start).astype(jnp.int32))


def _update_runs(state: VoteState, prompt_ids, slot_ids, keep):
    """Run of identical trailing answers per prompt after this wave, in row order."""
    num_prompts = state.counts.shape[0]
    row = jnp.arange(prompt_ids.shape[0])
    kept_row = jnp.where(keep, row, -1)
    last_row = jax.ops.segment_max(kept_row, prompt_ids, num_segments=num_prompts)
    touched = last_row >= 0
    last_slot = jnp.where(touched, slot_ids[jnp.maximum(last_row, 0)], -1)
    breaks = keep & ((slot_ids != last_slot[prompt_ids]) | (slot_ids < 0))
    break_row = jax.ops.segment_max(jnp.where(breaks, row, -1), prompt_ids, num_segments=num_prompts)
    trailing = jax.ops.segment_sum(
        (keep & (row > break_row[prompt_ids])).astype(jnp.int32), prompt_ids, num_segments=num_prompts
    )
    continues = (break_row < 0) & (state.run_slot == last_slot)
    new_length = jnp.where(continues, state.run_length + trailing, trailing)
    new_length = jnp.where(last_slot >= 0, new_length, 0)
    return (
        jnp.where(touched, last_slot, state.run_slot),
        jnp.where(touched, new_length, state.run_length),
    )


def _require_integer(name: str, values: jax.Array) -> None:
    """Raises at trace time unless ``values`` has an integer dtype (bool is not one)."""
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {values.dtype}")


def _first_failure(bad: jax.Array) -> jax.Array:
    """Index of the first True of ``bad`` [R] (0 if none), for an error message."""
    return jnp.argmax(bad).astype(jnp.int32)


def _host_valid(valid):
    """A host integer ``valid`` read as ``!= 0`` on the host, before a cast to int32 could wrap 2**32 to 0."""
    if isinstance(valid, jax.Array):
        return valid
    array = np.asarray(valid)
    return array != 0 if np.issubdtype(array.dtype, np.integer) else valid


def _wave_inputs(prompt_ids, slot_ids, valid) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The wave's arrays, checked at trace time: all [R], integer ids and slots, bool (or int != 0) valid.

    Host (NumPy) ids and slots that int32 cannot hold become ``posterior.OUT_OF_INT32``
    (out of range), as JAX would wrap them with x64 off.
    """
    prompt_ids, slot_ids = jnp.asarray(host_int32(prompt_ids)), jnp.asarray(host_int32(slot_ids))
    valid = jnp.asarray(_host_valid(valid))
    if prompt_ids.ndim != 1 or slot_ids.shape != prompt_ids.shape or valid.shape != prompt_ids.shape:
        raise ValueError(
            "prompt_ids, slot_ids and valid must all be [R]; got "
            f"{prompt_ids.shape}, {slot_ids.shape}, {valid.shape}"
        )
    _require_integer("prompt_ids", prompt_ids)
    _require_integer("slot_ids", slot_ids)
    if valid.dtype != jnp.bool_:
        if not jnp.issubdtype(valid.dtype, jnp.integer):
            raise TypeError(f"valid must be bool (or an integer dtype, read as != 0), got dtype {valid.dtype}")
        valid = valid != 0
    return prompt_ids, slot_ids, valid


def _check_host_ranges(prompt_ids, slot_ids, valid, num_prompts: int, num_slots: int) -> None:
    """The checks of ``checked=True`` on host rows in their own dtype, so that an id int32 cannot
    hold is named as given. Only when all three are host arrays (a traced ``valid`` leaves them
    to the traced checks, which then name ``posterior.OUT_OF_INT32`` for such an id)."""
    if any(isinstance(values, jax.Array) for values in (prompt_ids, slot_ids, valid)):
        return
    prompt_ids, slot_ids, valid = np.asarray(prompt_ids), np.asarray(slot_ids), np.asarray(valid)
    if not all(np.issubdtype(values.dtype, np.integer) for values in (prompt_ids, slot_ids)):
        return  # _wave_inputs raises the TypeError
    if prompt_ids.shape != slot_ids.shape or prompt_ids.shape != valid.shape or prompt_ids.ndim != 1:
        return  # _wave_inputs raises the ValueError
    valid = valid != 0
    for bad, values, what in (
        (valid & ((prompt_ids < 0) | (prompt_ids >= num_prompts)), prompt_ids,
         f"prompt id {{}}, outside [0, {num_prompts})"),
        (valid & (slot_ids != -1) & ((slot_ids < 0) | (slot_ids >= num_slots)), slot_ids,
         f"answer slot {{}}, outside [-1, {num_slots})"),
    ):
        if bad.any():
            row = int(np.argmax(bad))
            host_check(bad, f"sprt_update: row {row} has " + what.format(values[row]))


def _pad_empty_wave(prompt_ids, slot_ids, valid):
    """An empty wave (R = 0) as one padding row (valid False), which changes no vote: gathers
    and segment ops need a row."""
    if prompt_ids.shape[0] > 0:
        return prompt_ids, slot_ids, valid
    return jnp.zeros(1, prompt_ids.dtype), jnp.full(1, -1, slot_ids.dtype), jnp.zeros(1, bool)


def _check_ranges(bad: jax.Array, values: jax.Array, what: str) -> None:
    """A checkify check that no row is ``bad``, naming the first such row and its value."""
    row = _first_failure(bad)
    checkify.check(~jnp.any(bad), f"sprt_update: row {{row}} has {what}", row=row, value=values[row])


def sprt_update(
    state: VoteState,
    prompt_ids: jax.Array,
    slot_ids: jax.Array,
    valid: jax.Array,
    config: SPRTConfig,
    *,
    checked: bool = False,
    prior_state: PriorState | None = None,
) -> VoteState:
    """Adds one wave of R rollouts to the votes and applies the stopping rule.

    Rows whose prompt is already done, rows with ``valid`` False, and rows past a
    prompt's ``max_samples`` budget (in row order) are ignored. A row with answer
    slot -1 (no parseable answer) counts as a sample but not as a vote.

    Out-of-range input (nothing is clipped onto a real prompt or slot):

    - A row whose prompt id lies outside [0, P) is dropped: it counts nowhere (no
      sample, no vote, no budget, no effect on any prompt's run of answers).
    - A row whose answer slot lies outside [0, K) is treated exactly like slot -1: a
      sample without a vote that breaks the prompt's run of identical answers.
    - Host (NumPy) ids and slots are tested in their own dtype: with x64 off an int64
      id that int32 cannot hold is out of range, not wrapped (2**32 + 1 is not prompt 1).
      ``jit`` casts NumPy arguments itself before this function sees them; NumPy arrays
      passed eagerly or closed over are seen here.
    - An empty wave (R = 0) changes nothing; with no prompts (P = 0) every row is dropped.

    All of this is silent by default, as ``jit`` cannot raise on values. ``checked=True``
    adds ``jax.experimental.checkify`` checks that fail on the first valid row with a
    prompt id outside [0, P) or a slot outside [-1, K), naming the row and the value
    (padding rows, ``valid`` False, are never checked); the result is unchanged. Host
    ids are checked on the host when all three arrays are NumPy, naming the value as given
    (else an id int32 cannot hold is named as ``posterior.OUT_OF_INT32``). Under
    ``jit`` wrap it: ``checkify.checkify(partial(sprt_update, config=c, checked=True))``
    returns ``(error, state)``; ``error.throw()`` raises on the host (docs/reliability.md).

    Args:
      state: votes of P prompts over K slots.
      prompt_ids: [R] integer prompt served by each row, in [0, P).
      slot_ids: [R] integer answer slot of each row in [0, K), or -1.
      valid: [R] whether the row carries a rollout: bool, or an integer dtype read
        as ``valid != 0`` (so ``2`` is valid). Any other dtype raises TypeError.
      config: the stopping rule.
      checked: static; add the checkify check described above.
      prior_state: a learned prior (``prior.update_prior``) for the rule's concentration;
        None uses ``config.prior``.

    Returns:
      The new VoteState. Pure, jittable and vmappable; no host synchronisation.

    Raises:
      TypeError at trace time if ``prompt_ids`` or ``slot_ids`` is not of an
      integer dtype (floats would be truncated) or ``valid`` is neither bool nor
      integer; ValueError if the three are not all [R].
    """
    num_prompts, num_slots = state.counts.shape
    if checked:
        _check_host_ranges(prompt_ids, slot_ids, valid, num_prompts, num_slots)
    prompt_ids, slot_ids, valid = _pad_empty_wave(*_wave_inputs(prompt_ids, slot_ids, valid))
    # Range tests in the given dtype, before any cast could wrap a large id into range.
    known_prompt = (prompt_ids >= 0) & (prompt_ids < num_prompts)
    known_slot = (slot_ids >= 0) & (slot_ids < num_slots)
    if checked:
        _check_ranges(valid & ~known_prompt, prompt_ids, f"prompt id {{value}}, outside [0, {num_prompts})")
        _check_ranges(valid & ~known_slot & (slot_ids != -1), slot_ids,
                      f"answer slot {{value}}, outside [-1, {num_slots})")
    if num_prompts == 0:
        return state  # every row's prompt id lies outside [0, 0): all are dropped
    # Dropped rows get some in-range id (clip: measured faster than where on CPU); ``keep`` is False for them.
    prompt_ids = jnp.clip(prompt_ids, 0, num_prompts - 1).astype(jnp.int32)
    slot_ids = jnp.where(known_slot, slot_ids, -1).astype(jnp.int32)
    keep = valid & known_prompt & ~state.done[prompt_ids]
    keep = keep & (rank_within_prompt(prompt_ids, keep) < remaining_budget(state, config)[prompt_ids])
    votes = keep & (slot_ids >= 0)
    counts = state.counts.at[prompt_ids, jnp.maximum(slot_ids, 0)].add(votes.astype(jnp.int32))
    num_samples = state.num_samples + jax.ops.segment_sum(
        keep.astype(jnp.int32), prompt_ids, num_segments=num_prompts
    )
    run_slot, run_length = _update_runs(state, prompt_ids, slot_ids, keep)
    confidence = rule_confidence(counts, run_length, config, prior_state)
    done = state.done | stop_condition(confidence, num_samples, config)
    return VoteState(counts, num_samples, done, confidence, run_slot, run_length)

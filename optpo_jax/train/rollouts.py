"""A batch's rollouts: waves until the sequential test stops every prompt, with lookahead.

allocate_wave -> sample_wave -> count_votes, repeated until every prompt of the batch is
done. Every rollout a prompt kept is returned for the update, with the slot of its
answer, so rewards against the consensus need no second pass. Spare rows start the
next batch's prompts early; their votes and rollouts travel to the next call as a
``LookaheadCarry``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.allocation import refill
from optpo_jax.prior import PriorState
from optpo_jax.sprt import SPRTConfig, VoteState, init_vote_state
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.distributed import local_row_count, process_max
from optpo_jax.train.learner import Learner
from optpo_jax.train.row_pool import RowPool
from optpo_jax.train.step_config import StepConfig
from optpo_jax.train.vote_book import VoteBook
from optpo_jax.train.waves import Wave, count_votes, sample_wave, tokenize_prompts

_refill_jit = jax.jit(refill, static_argnames=("num_rows", "config"))

# What is kept of every rollout, per row: [N] or [N, Lg] host arrays.
KEPT_FIELDS = ("prompt_index", "completion_tokens", "completion_lengths", "policy_logprobs", "slots")


@dataclasses.dataclass
class Rollouts:
    """N retained rollouts of a batch of P prompts (host arrays).

    Attributes:
      prompt_index: [N] int32 index of each rollout's prompt in the batch.
      prompt_tokens: [N, Wp] int32 right-padded prompts; prompt_lengths [N].
      completion_tokens: [N, Lg] int32; completion_lengths [N].
      policy_logprobs: [N, Lg] float32 sampling-time log-probabilities (GRPO's old ones).
      slots: [N] int32 answer slot of each rollout, -1 without an answer.
      votes: the final VoteState; answer_slots the per-prompt answer tables.
      rows_total, rows_used: rows paid for and rows that carried a kept rollout (waves: wave rows;
        continuous: rollouts started, of which cancelled or dropped ones were not kept).
      waves: sampler calls (waves, or continuous decode chunks); sampling_seconds: wall time in them.
      decode_steps: one-token decode steps over all rows (the prefill's first token not counted).
      num_rows: rows decoded at once (this process's).
      decoded_tokens: tokens those steps produced for kept rollouts, the lookahead's included: the
        sum of (length - 1) over every rollout this call kept.
    """

    prompt_index: np.ndarray
    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    completion_tokens: np.ndarray
    completion_lengths: np.ndarray
    policy_logprobs: np.ndarray
    slots: np.ndarray
    votes: VoteState
    answer_slots: AnswerSlots
    rows_total: int
    rows_used: int
    waves: int
    sampling_seconds: float
    decode_steps: int = 0
    num_rows: int = 0
    decoded_tokens: int = 0

    @property
    def utilization(self) -> float:
        """Fraction of rows paid for that produced a kept rollout."""
        return self.rows_used / max(self.rows_total, 1)

    @property
    def useful_row_fraction(self) -> float:
        """Decode row-steps of this call that produced a token of a kept rollout (the lookahead's included):
        decoded_tokens / (rows x decode steps)."""
        return self.decoded_tokens / max(self.num_rows * self.decode_steps, 1)


@dataclasses.dataclass
class LookaheadCarry:
    """The next batch's prompts as far as this batch's spare rows took them (this process's share).

    Attributes:
      votes: their VoteState (host arrays).
      tables: their answer tables (slot i of prompt p is tables[p][i]).
      kept: their rollouts, ``KEPT_FIELDS`` -> [N, ...] arrays, prompt_index within the batch.
    """

    votes: VoteState
    tables: list
    kept: dict


def collect_rollouts(params, learner: Learner, problems: list, key: jax.Array, lookahead: list = (),
                     carry: LookaheadCarry | None = None, *, prior_state: PriorState | None = None,
                     progress: bool = False) -> tuple[Rollouts, LookaheadCarry | None]:
    """Samples waves for ``problems`` until the stopping rule has finished every one.

    Rows the batch cannot use go to ``lookahead`` prompts (the next batch): they start
    voting early and come back as the carry that the next call continues from.
    allocate_wave serves prompts in order, so the lookahead never takes a row the batch
    could use.

    Args:
      params: the policy's params (architecture: ``learner.model_config``).
      learner: its ``task`` (prompt_tokens(problem), extract(completion tokens)) and ``config``:
        the stopping rule (``sprt``), ``sampling`` and ``rows_per_wave`` (over all processes; each
        fills rows_per_wave / process_count rows with its own prompts).
      problems: the P prompts of this batch (this process's share on several processes).
      key: jax.random key; rollout k of prompt p (of ``problems`` + ``lookahead``) draws from its stream
        (p, k) of it (``sampler.rollout_keys``), whatever wave or row it is drawn in.
      lookahead: prompts that may use spare rows.
      carry: what the previous call returned for these ``problems``.
      prior_state: the stopping rule's learned prior (``sprt.learn_prior``), or None.
      progress: show a progress bar over waves (undecided prompts in its postfix).

    Returns:
      The batch's Rollouts (including rollouts carried in) and the carry for ``lookahead``
      (None without lookahead).
    """
    model_config, task, config = learner.model_config, learner.task, learner.config
    num_prompts, all_problems = len(problems), list(problems) + list(lookahead)
    num_rows = local_row_count(config.rows_per_wave, "rows_per_wave")
    prompts = tokenize_prompts(task, all_problems, config.sampling)
    votes, answer_slots, kept = _start_votes(task, num_prompts, len(all_problems), config.sprt, carry)
    drawn = np.bincount(np.concatenate(kept["prompt_index"]).astype(np.int64) if kept["prompt_index"] else
                        np.zeros(0, np.int64), minlength=len(all_problems))
    run = _Collection(votes, answer_slots, kept, drawn, num_prompts, num_rows, config, prior_state,
                      tqdm(desc="rollouts", unit="wave", leave=False, disable=not progress))
    if config.sampling.schedule == "continuous":
        _run_continuous(run, params, model_config, task, prompts, key)
    else:
        _run_waves(run, params, model_config, task, prompts, key)
    run.bar.close()
    votes, answer_slots, kept = run.votes, run.answer_slots, run.kept
    rows_used, waves, sampling_seconds = run.rows_used, run.calls, run.sampling_seconds
    kept = {name: np.concatenate(parts) for name, parts in kept.items()}
    batch = {name: values[kept["prompt_index"] < num_prompts] for name, values in kept.items()}
    index = batch["prompt_index"]
    rollouts = Rollouts(
        prompt_index=index, prompt_tokens=prompts.tokens[index], prompt_lengths=prompts.lengths[index],
        completion_tokens=batch["completion_tokens"], completion_lengths=batch["completion_lengths"],
        policy_logprobs=batch["policy_logprobs"], slots=batch["slots"],
        votes=votes.select(slice(None, num_prompts)), answer_slots=answer_slots.select(slice(None, num_prompts)),
        rows_total=run.rows_total, rows_used=rows_used, waves=waves, sampling_seconds=sampling_seconds,
        decode_steps=run.decode_steps, num_rows=num_rows, decoded_tokens=run.decoded_tokens,
    )
    return rollouts, _carry_of_lookahead(votes, answer_slots, kept, num_prompts) if lookahead else None


@dataclasses.dataclass
class _Collection:
    """A batch's votes and kept rollouts while its rollouts are being drawn."""

    votes: VoteState
    answer_slots: AnswerSlots
    kept: dict
    drawn: np.ndarray  # [P] rollouts of each prompt voted and kept so far
    num_prompts: int
    num_rows: int
    config: StepConfig
    prior_state: PriorState | None
    bar: tqdm
    rows_used: int = 0
    rows_total: int = 0
    calls: int = 0
    decode_steps: int = 0
    decoded_tokens: int = 0
    sampling_seconds: float = 0.0
    book: VoteBook | None = None  # continuous: the votes live here, re-planned prompt by prompt

    def __post_init__(self):
        self.counted = int(np.asarray(self.votes.num_samples).sum())

    def add(self, sampled: Wave) -> None:
        """Counts a Wave's (or finished rollouts') votes and keeps its valid rows."""
        voting = int(np.sum(sampled.valid & ~np.asarray(self.votes.done)[sampled.prompt_ids]))
        if self.book is None:
            self.votes, slots = count_votes(self.votes, self.answer_slots, sampled, self.config.sprt,
                                            self.prior_state)
        else:
            slots = self.answer_slots.assign(sampled.prompt_ids, sampled.answers)
            self.book.count(sampled.prompt_ids, slots, sampled.valid)
            self.votes = self.book.votes
        self.counted = _check_counted(self.votes, self.counted, voting)
        rows = np.flatnonzero(sampled.valid)
        for name, values in zip(KEPT_FIELDS, (sampled.prompt_ids, sampled.completions, sampled.completion_lengths,
                                              sampled.policy_logprobs, slots), strict=True):
            self.kept[name].append(values[rows])
        self.drawn += np.bincount(sampled.prompt_ids[rows], minlength=len(self.drawn))
        self.rows_used += len(rows)
        self.decoded_tokens += int(np.sum(np.maximum(sampled.completion_lengths[rows] - 1, 0)))
        self.bar.set_postfix(undecided=int(np.sum(~np.asarray(self.votes.done)[: self.num_prompts])))

    def wanted(self, in_flight=None) -> np.ndarray:
        """[P] > 0 for the batch's prompts still voting or owed rollouts for the update."""
        drawn = self.drawn if in_flight is None else self.drawn + in_flight
        return _rows_wanted(self.votes, drawn, self.num_prompts, self.config)


def _run_waves(run: _Collection, params, model_config, task, prompts, key) -> None:
    """Waves of ``num_rows`` rows until every batch prompt is finished (on every process)."""
    config = run.config
    # Every process takes part in every wave until the last unfinished prompt anywhere is finished.
    while process_max(int(np.any(run.wanted() > 0))):
        extra = _extra_demand(run.votes, run.drawn, run.num_prompts, config.update.min_rollouts_per_prompt)
        prompt_ids, valid = _allocate_with_lookahead(run.votes, run.num_prompts, run.num_rows, config.sprt, extra,
                                                     run.prior_state)
        start = time.perf_counter()
        wave = sample_wave(params, model_config, task, prompts, prompt_ids, valid, key,
                           config.sampling, bar=run.bar, rollout_index=_rollout_index(prompt_ids, valid, run.drawn))
        run.sampling_seconds += time.perf_counter() - start
        run.decode_steps += max(int(wave.completion_lengths[valid].max(initial=1)) - 1, 0)
        run.add(wave)
        run.rows_total += run.num_rows
        run.calls += 1
        run.bar.update(1)


def _rollout_index(prompt_ids: np.ndarray, valid: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """[R] the number of each row's rollout among its prompt's: rollouts drawn before, then row order."""
    index = np.zeros(len(prompt_ids), np.int32)
    seen = drawn.copy()
    for row in np.flatnonzero(valid):
        index[row] = seen[prompt_ids[row]]
        seen[prompt_ids[row]] += 1
    return index


def _run_continuous(run: _Collection, params, model_config, task, prompts, key) -> None:
    """One pool of ``num_rows`` rows, refilled as rollouts finish, until every batch prompt is finished.

    Rows go to the batch's prompts by ``refill`` (rollouts in flight counted), then to
    rollouts owed for the update, then to the lookahead prompts. With ``on_stop="cancel"``
    a prompt's rollouts in flight are cancelled when its vote stops (beyond those it still
    owes the update); with ``"finish"`` they finish and are kept. When the batch is finished,
    the lookahead's rollouts still in flight are dropped: the carry holds finished ones only.
    """
    config = run.config
    if jax.process_count() > 1:
        raise ValueError("sampling.schedule='continuous' runs on one process; use sampling.schedule='waves' "
                         f"for a run over {jax.process_count()} processes")
    pool = RowPool(params, model_config, task, prompts, config.sampling, run.num_rows, key, started=run.drawn)
    run.book = VoteBook(run.votes, config.sprt, run.prior_state, run.num_rows)
    run.votes = run.book.votes
    while True:
        if config.sampling.on_stop == "cancel":
            pool.cancel(_rows_to_cancel(pool, run))
        in_flight = pool.in_flight()
        if not np.any(run.wanted(in_flight) > 0) and not in_flight[: run.num_prompts].any():
            break
        free = pool.free_rows()
        if len(free):
            extra = _extra_demand(run.votes, run.drawn + in_flight, run.num_prompts,
                                  config.update.min_rollouts_per_prompt)
            prompt_ids, valid = _allocate_with_lookahead(run.votes, run.num_prompts, run.num_rows, config.sprt, extra,
                                                         run.prior_state, in_flight, len(free), run.book.to_stop)
            pool.insert(prompt_ids[valid])
        if not pool.in_flight().any():
            raise RuntimeError("the batch is unfinished but refill gave no row a prompt: a prompt wants rollouts "
                               "beyond its budget")
        start = time.perf_counter()
        finished = pool.decode()
        run.sampling_seconds += time.perf_counter() - start
        run.add(finished)
        run.calls += 1
        run.bar.update(1)
    run.rows_total = pool.insertions
    run.decode_steps = pool.decode_steps


def _rows_to_cancel(pool: RowPool, run: _Collection) -> np.ndarray:
    """Rows of prompts whose vote has stopped, beyond the rollouts each still owes the update (latest started first)."""
    done = np.asarray(run.votes.done)
    owed = np.zeros(len(done), np.int64)
    owed[: run.num_prompts] = np.maximum(run.config.update.min_rollouts_per_prompt - run.drawn[: run.num_prompts], 0)
    busy = np.flatnonzero((pool.row_prompt >= 0) & done[np.maximum(pool.row_prompt, 0)])
    cancel = []
    for prompt in np.unique(pool.row_prompt[busy]):
        rows = busy[pool.row_prompt[busy] == prompt]
        rows = rows[np.argsort(pool.row_serial[rows])]
        cancel.extend(rows[owed[prompt]:])
    return np.asarray(cancel, np.int64)


def _check_counted(votes: VoteState, counted_before: int, voting_rows: int) -> int:
    """The votes counted so far, after checking that the wave added one per voting row.

    ``allocate_wave`` grants rows only within each prompt's budget, so a vote lost here is a
    bug, not a budget: an error (not an ``assert``, which ``python -O`` removes).
    """
    counted = int(np.asarray(votes.num_samples).sum())
    if counted - counted_before != voting_rows:
        raise RuntimeError(f"a wave of {voting_rows} voting rows added {counted - counted_before} votes: "
                           "rows were granted beyond a prompt's budget or outside the vote table")
    return counted


def _start_votes(task, num_prompts: int, num_all: int, sprt: SPRTConfig, carry: LookaheadCarry | None):
    """Empty votes, tables and kept rollouts for ``num_all`` prompts; the first ``num_prompts``
    continue from ``carry`` when there is one."""
    votes = init_vote_state(num_all, sprt.max_samples)
    answer_slots = AnswerSlots.for_task(task, num_all, sprt.max_samples)
    kept = {name: [] for name in KEPT_FIELDS}
    if carry is None:
        return votes, answer_slots, kept
    if len(carry.tables) != num_prompts:
        raise ValueError(f"the carry holds votes of {len(carry.tables)} prompts, the batch has {num_prompts}")
    rest = votes.select(slice(num_prompts, None))
    votes = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), carry.votes, rest)
    for prompt, table in enumerate(carry.tables):
        answer_slots.restore(prompt, table)
    for name in KEPT_FIELDS:
        kept[name].append(np.asarray(carry.kept[name]))
    return votes, answer_slots, kept


def _carry_of_lookahead(votes: VoteState, answer_slots: AnswerSlots, kept: dict, num_prompts: int) -> LookaheadCarry:
    """The lookahead prompts' votes, tables and rollouts, indexed from 0."""
    early = {name: values[kept["prompt_index"] >= num_prompts] for name, values in kept.items()}
    early["prompt_index"] = early["prompt_index"] - num_prompts
    lookahead = slice(num_prompts, None)
    return LookaheadCarry(jax.tree.map(np.asarray, votes.select(lookahead)), answer_slots.tables[lookahead], early)


def _extra_demand(votes: VoteState, drawn: np.ndarray, num_prompts: int, min_rollouts: int) -> np.ndarray:
    """[num_prompts] rollouts each batch prompt whose vote has stopped still draws for the update."""
    done = np.asarray(votes.done)[:num_prompts]
    return np.where(done, np.maximum(min_rollouts - drawn[:num_prompts], 0), 0)


def _rows_wanted(votes: VoteState, drawn: np.ndarray, num_prompts: int, config: StepConfig) -> np.ndarray:
    """[num_prompts] > 0 for the batch's unfinished prompts: voting, or drawing rollouts for the update."""
    voting = ~np.asarray(votes.done)[:num_prompts]
    return voting + _extra_demand(votes, drawn, num_prompts, config.update.min_rollouts_per_prompt)


def _allocate_with_lookahead(votes: VoteState, num_prompts: int, num_rows: int, config: SPRTConfig,
                             extra: np.ndarray | None = None, prior_state=None, in_flight: np.ndarray | None = None,
                             num_free: int | None = None, to_stop: np.ndarray | None = None):
    """The batch's ``refill`` over its own prompts, then ``extra[p]`` rows for each batch prompt p
    whose vote has stopped (rollouts for the update), then the unused rows to the lookahead prompts
    in order. Rows from ``num_free`` on (default: all ``num_rows``) stay invalid; ``in_flight`` [P]
    counts rollouts being decoded (default none: a wave); ``to_stop`` [P] is ``rollouts_to_stop`` if
    kept current by the caller (``VoteBook``).

    The batch gets exactly the rows it would get alone. (In a pool, rows the lookahead took stay
    busy until its rollouts finish, so a batch prompt that needs rollouts later waits for the next
    freed row.)
    """
    wave = in_flight is None
    in_flight = np.zeros(votes.counts.shape[0], np.int32) if wave else in_flight.astype(np.int32)
    num_free = num_rows if num_free is None else num_free
    batch = slice(None, num_prompts)
    plan = (lambda part: None) if to_stop is None else (lambda part: to_stop[part])
    prompt_ids, valid = (np.asarray(x) for x in _refill_jit(votes.select(batch), in_flight[batch], num_rows, config,
                                                        prior_state, num_free, plan(batch)))
    prompt_ids, valid = prompt_ids.copy(), valid.copy()
    if extra is not None and extra.any():
        extra_ids = np.repeat(np.arange(num_prompts), extra)
        rows = np.flatnonzero(~valid[:num_free])[: len(extra_ids)]
        prompt_ids[rows], valid[rows] = extra_ids[: len(rows)], True
    spare = num_free - int(valid.sum())
    if spare == 0 or votes.counts.shape[0] == num_prompts:
        return prompt_ids, valid
    lookahead = slice(num_prompts, None)
    # A wave gives the lookahead the first spare rows of a whole wave's allocation (its demands and even
    # shares, as ever: the same waves as before refill existed); a pool refills them demand first.
    lookahead_free = num_rows if wave else spare
    early_ids, early_valid = (np.asarray(x) for x in _refill_jit(votes.select(lookahead), in_flight[lookahead], num_rows,
                                                              config, prior_state, lookahead_free, plan(lookahead)))
    extra_ids = early_ids[early_valid][:spare] + num_prompts
    rows = np.flatnonzero(~valid[:num_free])[: len(extra_ids)]
    prompt_ids[rows], valid[rows] = extra_ids, True
    return prompt_ids, valid

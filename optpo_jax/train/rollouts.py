"""A batch's rollouts: waves until the sequential test stops every prompt, with lookahead.

allocate_wave -> sample_wave -> count_votes, repeated until every prompt of the batch is
done. Every rollout a prompt kept is returned for the update, with the slot of its
answer, so rewards against the consensus need no second pass. Spare rows start the
next batch's prompts early; their votes and rollouts travel to the next call as a
``LookaheadCarry``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.allocation import allocate_wave
from optpo_jax.sprt import SPRTConfig, VoteState, init_vote_state
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.distributed import local_row_count, process_max
from optpo_jax.train.step_config import StepConfig
from optpo_jax.train.waves import count_votes, sample_wave, tokenize_prompts

_allocate = jax.jit(allocate_wave, static_argnums=(1, 2))

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
      rows_total, rows_used: wave rows paid for and rows that carried a kept rollout.
      waves: number of waves; sampling_seconds: wall time in the sampler.
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

    @property
    def utilization(self) -> float:
        """Fraction of wave rows that produced a kept rollout."""
        return self.rows_used / max(self.rows_total, 1)


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

    def save(self, path: Path) -> None:
        """Writes the carry to ``path`` (.npz) atomically, with the process count it was split over."""
        arrays = {f"votes.{name}": np.asarray(value) for name, value in vars(self.votes).items()}
        arrays.update({f"kept.{name}": value for name, value in self.kept.items()})
        arrays["tables"] = np.array(json.dumps(self.tables))
        arrays["process_count"] = np.array(jax.process_count())
        _write_npz(path, arrays)

    @staticmethod
    def save_none(path: Path) -> None:
        """Records at ``path`` that a step left no carry (its next batch starts afresh)."""
        _write_npz(path, {})

    @staticmethod
    def load(path: Path) -> LookaheadCarry | None:
        """The carry saved at ``path``; None (with a warning) when there is none, or it was split
        over another number of processes (its votes would belong to other prompts)."""
        if not path.exists():
            warnings.warn(f"no lookahead carry at {path}: the next batch starts its votes afresh", stacklevel=2)
            return None
        try:
            with np.load(path) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"the lookahead carry {path} is unreadable ({type(error).__name__}: {error}); it was "
                             "cut short or overwritten: resume from an earlier step with --resume_step") from error
        if "tables" not in arrays:
            return None
        if int(arrays["process_count"]) != jax.process_count():
            warnings.warn(f"the carry at {path} was split over {int(arrays['process_count'])} processes, not "
                          f"{jax.process_count()}: the next batch starts its votes afresh", stacklevel=2)
            return None
        fields = lambda prefix: {k.split(".", 1)[1]: arrays[k] for k in arrays if k.startswith(prefix)}
        return LookaheadCarry(VoteState(**fields("votes.")), json.loads(str(arrays["tables"])), fields("kept."))


def _write_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def collect_rollouts(params, model_config, task, problems: list, config: StepConfig, key: jax.Array,
                     lookahead: list = (), carry: LookaheadCarry | None = None,
                     progress: bool = False, prior_state=None) -> tuple[Rollouts, LookaheadCarry | None]:
    """Samples waves for ``problems`` until the stopping rule has finished every one.

    Rows the batch cannot use go to ``lookahead`` prompts (the next batch): they start
    voting early and come back as the carry that the next call continues from.
    allocate_wave serves prompts in order, so the lookahead never takes a row the batch
    could use.

    Args:
      params, model_config: the policy.
      task: prompt_tokens(problem) and extract(completion tokens).
      problems: the P prompts of this batch (this process's share on several processes).
      config: the stopping rule (``sprt``), ``sampling`` and ``rows_per_wave`` (over all
        processes; each fills rows_per_wave / process_count rows with its own prompts).
      key: jax.random key; wave w uses fold_in(key, w).
      lookahead: prompts that may use spare rows.
      carry: what the previous call returned for these ``problems``.
      progress: show a progress bar over waves (undecided prompts in its postfix).
      prior_state: the stopping rule's learned prior (``sprt.learn_prior``), or None.

    Returns:
      The batch's Rollouts (including rollouts carried in) and the carry for ``lookahead``
      (None without lookahead).
    """
    num_prompts, all_problems = len(problems), list(problems) + list(lookahead)
    num_rows = local_row_count(config.rows_per_wave, "rows_per_wave")
    prompts = tokenize_prompts(task, all_problems, config.sampling)
    votes, answer_slots, kept = _start_votes(task, num_prompts, len(all_problems), config.sprt, carry)
    drawn = np.bincount(np.concatenate(kept["prompt_index"]).astype(np.int64) if kept["prompt_index"] else
                        np.zeros(0, np.int64), minlength=len(all_problems))
    rows_used = waves = 0
    sampling_seconds = 0.0
    bar = tqdm(desc="waves", unit="wave", leave=False, disable=not progress)
    counted = int(np.asarray(votes.num_samples).sum())
    # Every process takes part in every wave until the last unfinished prompt anywhere is finished.
    while process_max(int(np.any(_rows_wanted(votes, drawn, num_prompts, config) > 0))):
        extra = _extra_demand(votes, drawn, num_prompts, config.update.min_rollouts_per_prompt)
        prompt_ids, valid = _allocate_with_lookahead(votes, num_prompts, num_rows, config.sprt, extra, prior_state)
        start = time.perf_counter()
        wave = sample_wave(params, model_config, task, prompts, prompt_ids, valid, jax.random.fold_in(key, waves),
                           config.sampling, bar=bar)
        sampling_seconds += time.perf_counter() - start
        voting = valid & ~np.asarray(votes.done)[prompt_ids]
        votes, slots = count_votes(votes, answer_slots, wave, config.sprt, prior_state)
        counted = _check_counted(votes, counted, int(voting.sum()))
        rows = np.flatnonzero(valid)
        for name, values in zip(KEPT_FIELDS, (prompt_ids, wave.completions, wave.completion_lengths,
                                              wave.policy_logprobs, slots), strict=True):
            kept[name].append(values[rows])
        drawn += np.bincount(prompt_ids[rows], minlength=len(drawn))
        rows_used, waves = rows_used + len(rows), waves + 1
        bar.update(1)
        bar.set_postfix(undecided=int(np.sum(~np.asarray(votes.done)[:num_prompts])))
    bar.close()
    kept = {name: np.concatenate(parts) for name, parts in kept.items()}
    batch = {name: values[kept["prompt_index"] < num_prompts] for name, values in kept.items()}
    index = batch["prompt_index"]
    rollouts = Rollouts(
        prompt_index=index, prompt_tokens=prompts.tokens[index], prompt_lengths=prompts.lengths[index],
        completion_tokens=batch["completion_tokens"], completion_lengths=batch["completion_lengths"],
        policy_logprobs=batch["policy_logprobs"], slots=batch["slots"],
        votes=votes.select(slice(None, num_prompts)), answer_slots=answer_slots.select(slice(None, num_prompts)),
        rows_total=waves * num_rows, rows_used=rows_used, waves=waves, sampling_seconds=sampling_seconds,
    )
    return rollouts, _carry_of_lookahead(votes, answer_slots, kept, num_prompts) if lookahead else None


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
                             extra: np.ndarray | None = None, prior_state=None):
    """The batch's allocation over its own prompts, then ``extra[p]`` rows for each batch prompt p
    whose vote has stopped (rollouts for the update), then the unused rows to the lookahead prompts
    in order.

    The batch gets exactly the rows it would get alone, so lookahead never delays it.
    """
    prompt_ids, valid = (np.asarray(x) for x in _allocate(votes.select(slice(None, num_prompts)), num_rows, config,
                                                                    prior_state))
    prompt_ids, valid = prompt_ids.copy(), valid.copy()
    if extra is not None and extra.any():
        extra_ids = np.repeat(np.arange(num_prompts), extra)
        rows = np.flatnonzero(~valid)[: len(extra_ids)]
        prompt_ids[rows], valid[rows] = extra_ids[: len(rows)], True
    spare = num_rows - int(valid.sum())
    if spare == 0 or votes.counts.shape[0] == num_prompts:
        return prompt_ids, valid
    early_ids, early_valid = (np.asarray(x) for x in _allocate(votes.select(slice(num_prompts, None)), num_rows,
                                                                config, prior_state))
    extra_ids = early_ids[early_valid][:spare] + num_prompts
    rows = np.flatnonzero(~valid)[: len(extra_ids)]
    prompt_ids[rows], valid[rows] = extra_ids, True
    return prompt_ids, valid

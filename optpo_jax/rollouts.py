"""Collecting a batch's rollouts in waves until the sequential test stops every prompt.

allocate_wave -> sample -> extract answers -> sprt_update, repeated until every prompt
of the batch is done. Every rollout a prompt kept is returned for the update, with the
slot of its answer, so rewards against the consensus need no second pass.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.allocation import allocate_wave
from optpo_jax.answer_slots import AnswerSlots
from optpo_jax.distributed import local_row_count, local_rows, mesh_of, process_max
from optpo_jax.evaluation import padded_prompts
from optpo_jax.sampler import SamplingConfig, bucket_width, sample
from optpo_jax.sprt import SPRTConfig, VoteState, init_vote_state, sprt_update

_allocate = jax.jit(allocate_wave, static_argnums=(1, 2))
_update_votes = jax.jit(sprt_update, static_argnums=(4,))


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


_FIELDS = ("prompt_index", "completion_tokens", "completion_lengths", "policy_logprobs", "slots")


def _concat_votes(first: VoteState, second: VoteState) -> VoteState:
    return jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), first, second)


def collect_rollouts(
    params,
    model_config,
    task,
    problems: list,
    sprt_config: SPRTConfig,
    sampling: SamplingConfig,
    rows_per_wave: int,
    key: jax.Array,
    lookahead: list = (),
    carry: dict | None = None,
    max_waves: int = 10_000,
    progress: bool = False,
) -> tuple[Rollouts, dict | None]:
    """Samples waves for ``problems`` until the stopping rule has finished every one.

    Rows the batch cannot use go to ``lookahead`` prompts (the next batch): they start
    voting early, and their votes and rollouts come back as a carry that the next call
    continues from. allocate_wave serves prompts in order, so the batch is never short
    of rows because of the lookahead.

    Args:
      params, model_config: the policy.
      task: prompt_tokens(problem) and extract(completion tokens).
      problems: the P prompts of this batch (this process's share on several processes).
      sprt_config: stopping rule and budget (max_samples bounds every prompt).
      sampling: the SamplingConfig of rollouts.
      rows_per_wave: R, rows of each sampler call (over all processes; each process fills
        R / process_count of them with its own ``problems``).
      key: jax.random key; wave w uses fold_in(key, w).
      lookahead: prompts that may use spare rows.
      carry: what the previous call returned for these ``problems`` (their early votes).
      progress: show a progress bar over waves (undecided prompts in its postfix).

    Returns:
      The batch's Rollouts (including rollouts carried in) and the carry for ``lookahead``
      (None without lookahead).
    """
    num_prompts, all_problems = len(problems), list(problems) + list(lookahead)
    num_rows, mesh = local_row_count(rows_per_wave, "rows_per_wave"), mesh_of(params)
    prompt_list = [task.prompt_tokens(p) for p in all_problems]
    # The same width on every process: the update's global batch concatenates their rows.
    width = bucket_width(process_max(max(len(p) for p in prompt_list)), sampling)
    prompt_array, prompt_lengths = padded_prompts(prompt_list, task.pad_token_id, width)
    votes = init_vote_state(len(all_problems), sprt_config.max_samples)
    answer_slots = AnswerSlots(len(all_problems), sprt_config.max_samples, getattr(task, "equivalent", None),
                               getattr(task, "canonical", None))
    kept = {name: [] for name in _FIELDS}
    if carry is not None:
        if len(carry["tables"]) != num_prompts:
            raise ValueError(f"the carry holds votes of {len(carry['tables'])} prompts, the batch has {num_prompts}")
        votes = _concat_votes(carry["votes"], jax.tree.map(lambda x: x[num_prompts:], votes))
        for prompt, table in enumerate(carry["tables"]):
            answer_slots.restore(prompt, table)
        for name in _FIELDS:
            kept[name].append(np.asarray(carry["kept"][name]))
    rows_used = waves = 0
    sampling_seconds = 0.0
    bar = tqdm(desc="waves", unit="wave", leave=False, disable=not progress)
    # Every process takes part in every wave until the last undecided prompt anywhere stops.
    while process_max(int(not np.all(np.asarray(votes.done)[:num_prompts]))):
        if waves == max_waves:
            raise RuntimeError(f"prompts still undecided after max_waves={max_waves} waves")
        prompt_ids, valid = _allocate_with_lookahead(votes, num_prompts, num_rows, sprt_config)
        start = time.perf_counter()
        out = sample(params, model_config, prompt_array[prompt_ids], prompt_lengths[prompt_ids], valid,
                     jax.random.fold_in(key, waves), sampling)
        completions, lengths = local_rows(out.tokens, mesh), local_rows(out.lengths, mesh)
        sampling_seconds += time.perf_counter() - start
        answers = [task.extract(completions[row, : lengths[row]]) if valid[row] else None for row in range(len(valid))]
        slots = answer_slots.assign(prompt_ids, answers)
        before = np.asarray(votes.num_samples)
        votes = _update_votes(votes, prompt_ids, slots, valid, sprt_config)
        # allocate_wave grants rows only within each prompt's budget, so every valid row is kept.
        assert int(np.asarray(votes.num_samples).sum() - before.sum()) == int(valid.sum())
        rows = np.flatnonzero(valid)
        for name, values in zip(_FIELDS, (prompt_ids, completions, lengths, local_rows(out.policy_logprobs, mesh), slots),
                                strict=True):
            kept[name].append(values[rows])
        rows_used += len(rows)
        waves += 1
        bar.update(1)
        bar.set_postfix(undecided=int(np.sum(~np.asarray(votes.done)[:num_prompts])))
    bar.close()
    kept = {name: np.concatenate(parts) for name, parts in kept.items()}
    mine = kept["prompt_index"] < num_prompts
    next_carry = None
    if lookahead:
        early = {name: values[~mine] for name, values in kept.items()}
        early["prompt_index"] = early["prompt_index"] - num_prompts
        next_carry = {"votes": jax.tree.map(lambda x: np.asarray(x)[num_prompts:], votes),
                      "tables": answer_slots.tables[num_prompts:], "kept": early}
    batch = {name: values[mine] for name, values in kept.items()}
    index = batch["prompt_index"]
    rollouts = Rollouts(
        prompt_index=index, prompt_tokens=prompt_array[index], prompt_lengths=prompt_lengths[index],
        completion_tokens=batch["completion_tokens"], completion_lengths=batch["completion_lengths"],
        policy_logprobs=batch["policy_logprobs"], slots=batch["slots"],
        votes=jax.tree.map(lambda x: x[:num_prompts], votes), answer_slots=_first(answer_slots, num_prompts),
        rows_total=waves * num_rows, rows_used=rows_used, waves=waves, sampling_seconds=sampling_seconds,
    )
    return rollouts, next_carry


def _allocate_with_lookahead(votes: VoteState, num_prompts: int, num_rows: int, config: SPRTConfig):
    """The batch's allocation over its own prompts, then its unused rows to the lookahead prompts in order.

    The batch gets exactly the rows it would get alone, so lookahead never delays it.
    """
    own = jax.tree.map(lambda x: x[:num_prompts], votes)
    prompt_ids, valid = (np.asarray(x) for x in _allocate(own, num_rows, config))
    spare = num_rows - int(valid.sum())
    if spare == 0 or votes.counts.shape[0] == num_prompts:
        return prompt_ids, valid
    early = jax.tree.map(lambda x: x[num_prompts:], votes)
    early_ids, early_valid = (np.asarray(x) for x in _allocate(early, num_rows, config))
    extra = early_ids[early_valid][:spare] + num_prompts
    rows = np.flatnonzero(~valid)[: len(extra)]
    prompt_ids, valid = prompt_ids.copy(), valid.copy()
    prompt_ids[rows], valid[rows] = extra, True
    return prompt_ids, valid


def _first(answer_slots: AnswerSlots, num_prompts: int) -> AnswerSlots:
    """The tables of the first ``num_prompts`` prompts."""
    first = AnswerSlots(num_prompts, answer_slots.num_slots, answer_slots.equivalent, answer_slots.canonical)
    first.tables, first.lookups = answer_slots.tables[:num_prompts], answer_slots.lookups[:num_prompts]
    return first

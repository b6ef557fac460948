"""The wave driver: one fixed-shape sampler call, from prompt rows to extracted answers.

Training (``rollouts.py``) and evaluation (``evaluation.py``) both sample through
``sample_wave`` and count votes through ``count_votes``, so a rollout's answer and the
majority it votes in mean the same thing in both. This is also the one place where
several processes agree a wave's shape: every process joins every wave with its own
rows, and the padded prompt width is the largest any process needs.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from optpo_jax.sampler import (
    SamplingConfig,
    bucket_width,
    decode_progress,
    pad_wave,
    progress_every,
    right_padded,
    sample_padded,
)
from optpo_jax.sprt import SPRTConfig, VoteState, sprt_update
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.distributed import local_rows, mesh_of, process_max, rows_to_global

_sprt_update_jit = jax.jit(sprt_update, static_argnames=("config",))


@dataclasses.dataclass(frozen=True)
class PromptTable:
    """The prompts of P problems, tokenized once and right-padded to one width.

    Attributes:
      tokens: [P, W] int32; W is the bucket of the longest prompt on any process.
      lengths: [P] int32 real tokens of each prompt.
    """

    tokens: np.ndarray
    lengths: np.ndarray


def tokenize_prompts(task, problems: list, sampling: SamplingConfig) -> PromptTable:
    """``task.prompt_tokens`` of every problem, padded to a width every process shares."""
    token_lists = [task.prompt_tokens(problem) for problem in problems]
    width = bucket_width(process_max(max((len(tokens) for tokens in token_lists), default=1)), sampling)
    return PromptTable(*right_padded(token_lists, task.pad_token_id, width))


@dataclasses.dataclass
class Wave:
    """One wave's rows on this process, read back to the host.

    Attributes:
      prompt_ids: [R] int32 row -> index into the PromptTable.
      valid: [R] bool, rows that carry a rollout.
      completions: [R, Lg] int32 generated tokens; completion_lengths [R].
      policy_logprobs: [R, Lg] float32 sampling-time log-probabilities (GRPO's old ones).
      answers: R extracted answers, None on invalid rows and where none was found.
    """

    prompt_ids: np.ndarray
    valid: np.ndarray
    completions: np.ndarray
    completion_lengths: np.ndarray
    policy_logprobs: np.ndarray
    answers: list


def sample_wave(params, model_config, task, prompts: PromptTable, prompt_ids: np.ndarray, valid: np.ndarray,
                key: jax.Array, sampling: SamplingConfig, bar=None, rollout_index: np.ndarray | None = None) -> Wave:
    """Samples rows ``prompt_ids`` of ``prompts`` (this process's share of the wave) and extracts answers.

    The padded width is the bucket of the longest valid prompt of the wave on any
    process; rows are placed over the params' mesh and this process's rows read back.
    ``bar``: a tqdm bar whose postfix shows the decode's token count on long generations.
    ``rollout_index``: [R] number of each row's rollout among its prompt's (read by the scripted
    replay policy; the decoder ignores it).
    """
    prompt_ids, valid = np.asarray(prompt_ids), np.asarray(valid, bool)
    lengths = prompts.lengths[prompt_ids]
    width = bucket_width(process_max(int(lengths[valid].max(initial=1))), sampling)
    inputs = pad_wave(prompts.tokens[prompt_ids], lengths, valid, sampling, width=width)
    mesh = mesh_of(params)
    if rollout_index is not None:
        rollout_index = rows_to_global(np.asarray(rollout_index, np.int32), mesh)
    with decode_progress(bar, sampling.max_new_tokens):
        out = sample_padded(params, *rows_to_global(inputs, mesh), key, model_config=model_config, config=sampling,
                            progress_every=progress_every(sampling, bar), rollout_index=rollout_index)
        completions, completion_lengths = local_rows(out.tokens, mesh), local_rows(out.lengths, mesh)
    answers = [task.extract(completions[row, : completion_lengths[row]]) if valid[row] else None
               for row in range(len(valid))]
    return Wave(prompt_ids, valid, completions, completion_lengths, local_rows(out.policy_logprobs, mesh), answers)


def count_votes(votes: VoteState, answer_slots: AnswerSlots, wave: Wave,
                sprt: SPRTConfig, prior_state=None) -> tuple[VoteState, np.ndarray]:
    """Adds a wave's answers to the votes: their slots in the answer tables, then ``sprt_update``.

    Returns the new votes and the [R] slot of each row's answer (-1 without one).
    """
    slots = answer_slots.assign(wave.prompt_ids, wave.answers)
    return _sprt_update_jit(votes, wave.prompt_ids, slots, wave.valid, sprt, prior_state=prior_state), slots

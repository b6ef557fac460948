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
    ``rollout_index``: [R] number of each row's rollout among its prompt's: rollout k of prompt p
    draws from the random stream (p, k) of ``key`` (``sampler.rollout_keys``) whatever its row, so
    (prompt, rollout) pairs must be distinct on valid rows (the scripted replay policy reads it
    too). None: row r draws from stream (r, 0).
    """
    prompt_ids, valid = np.asarray(prompt_ids), np.asarray(valid, bool)
    lengths = prompts.lengths[prompt_ids]
    width = bucket_width(process_max(int(lengths[valid].max(initial=1))), sampling)
    inputs = pad_wave(prompts.tokens[prompt_ids], lengths, valid, sampling, width=width)
    mesh = mesh_of(params)
    streams = None
    if rollout_index is not None:
        streams = rows_to_global(wave_streams(prompt_ids, valid, rollout_index), mesh)
        rollout_index = rows_to_global(np.asarray(rollout_index, np.int32), mesh)
    with decode_progress(bar, sampling.max_new_tokens):
        out = sample_padded(params, *rows_to_global(inputs, mesh), key, model_config=model_config, config=sampling,
                            progress_every=progress_every(sampling, bar), rollout_index=rollout_index,
                            streams=streams)
        completions, completion_lengths = local_rows(out.tokens, mesh), local_rows(out.lengths, mesh)
    answers = [task.extract(completions[row, : completion_lengths[row]]) if valid[row] else None
               for row in range(len(valid))]
    return Wave(prompt_ids, valid, completions, completion_lengths, local_rows(out.policy_logprobs, mesh), answers)


# Stream prompts of process i start at i * this: each process numbers its own prompts from 0.
PROMPT_STREAMS_PER_PROCESS = 1 << 24
_UNUSED_STREAM = (1 << 31) - 1


def rollout_streams(prompt_ids: np.ndarray, rollout_index: np.ndarray) -> np.ndarray:
    """[n, 2] int32 (prompt, rollout) random streams of this process's rollouts (``sampler.rollout_keys``),
    distinct from every other process's."""
    prompt_ids = np.asarray(prompt_ids, np.int64)
    if prompt_ids.size and prompt_ids.max() >= PROMPT_STREAMS_PER_PROCESS:
        raise ValueError(f"prompt id {prompt_ids.max()} >= {PROMPT_STREAMS_PER_PROCESS}: too many prompts in one "
                         "sampler call for distinct random streams")
    prompts = prompt_ids + jax.process_index() * PROMPT_STREAMS_PER_PROCESS
    return np.stack([prompts, np.asarray(rollout_index, np.int64)], axis=1).astype(np.int32)


def wave_streams(prompt_ids: np.ndarray, valid: np.ndarray, rollout_index: np.ndarray) -> np.ndarray:
    """[R, 2] ``rollout_streams`` of a wave's rows; ValueError if two valid rows share one (they would draw the
    same tokens). Invalid rows get streams of their own that no valid row uses."""
    streams = rollout_streams(np.where(valid, prompt_ids, 0), rollout_index)
    pairs = streams[valid]
    if len(np.unique(pairs, axis=0)) != len(pairs):
        raise ValueError("two valid rows of a wave have the same (prompt, rollout_index): they would draw the same "
                         "tokens")
    streams[~valid, 0], streams[~valid, 1] = _UNUSED_STREAM, np.flatnonzero(~valid)
    return streams


def count_votes(votes: VoteState, answer_slots: AnswerSlots, wave: Wave,
                sprt: SPRTConfig, prior_state=None) -> tuple[VoteState, np.ndarray]:
    """Adds a wave's answers to the votes: their slots in the answer tables, then ``sprt_update``.

    Returns the new votes and the [R] slot of each row's answer (-1 without one).
    """
    slots = answer_slots.assign(wave.prompt_ids, wave.answers)
    return _sprt_update_jit(votes, wave.prompt_ids, slots, wave.valid, sprt, prior_state=prior_state), slots

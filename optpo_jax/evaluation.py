"""pass@1 (avg@k), maj@k and pass@k of a policy on a task, sampled with our sampler."""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.distributed import (
    allgather_objects,
    local_row_count,
    local_rows,
    merge_shares,
    mesh_of,
    process_max,
    process_share,
)
from optpo_jax.sampler import SamplingConfig, sample


@dataclasses.dataclass
class EvalResult:
    """Per-prompt samples and the metrics over them.

    Attributes:
      answers: per prompt, the k extracted answers (None where none was found).
      correct: [P, k] bool, whether each sample's answer is right.
      majority_correct: [P] bool, whether the most frequent answer is right (ties go to
        the answer seen first; no answer at all counts as wrong).
      generated_tokens: total tokens sampled.
    """

    answers: list
    correct: np.ndarray
    majority_correct: np.ndarray
    generated_tokens: int

    @property
    def per_prompt_accuracy(self) -> np.ndarray:
        """[P] fraction of each prompt's samples that are right."""
        return self.correct.mean(axis=1)

    @property
    def pass_at_1(self) -> float:
        """avg@k: mean accuracy over all samples."""
        return float(self.correct.mean())

    @property
    def maj_at_k(self) -> float:
        return float(self.majority_correct.mean())

    @property
    def pass_at_k(self) -> float:
        return float(self.correct.any(axis=1).mean())

    def pass_at_1_stderr(self) -> float:
        """Standard error of pass@1 over prompts (samples within a prompt are not independent)."""
        accuracy = self.per_prompt_accuracy
        return float(accuracy.std(ddof=1) / np.sqrt(len(accuracy))) if len(accuracy) > 1 else 0.0

    def summary(self) -> dict:
        return {
            "pass@1": self.pass_at_1, "pass@1_stderr": self.pass_at_1_stderr(),
            f"maj@{self.correct.shape[1]}": self.maj_at_k, f"pass@{self.correct.shape[1]}": self.pass_at_k,
        }


def majority_answer(answers):
    """The most frequent non-None answer (first seen wins ties), or None."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def padded_prompts(prompts: list, pad_token_id: int, width: int | None = None):
    """Right-padded [N, width] int32 tokens and [N] lengths of token lists."""
    width = width or max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def evaluate(
    policy,
    task,
    problems: list,
    num_samples: int,
    key: jax.Array,
    sampling: SamplingConfig,
    rows_per_wave: int = 512,
    progress: bool = True,
) -> EvalResult:
    """Samples ``num_samples`` completions per problem and grades them.

    Args:
      policy: an object with ``config`` (ModelConfig) and ``params``.
      task: provides prompt_tokens(problem), extract(completion tokens), is_correct(answer, problem).
      problems: the prompts to evaluate.
      num_samples: k, completions per problem.
      key: jax.random key.
      sampling: temperature etc.; its stop/pad ids should be the task's.
      rows_per_wave: rows per sampler call (over all processes); the last wave is padded
        with invalid rows so every call has the same shape.

    On several processes each evaluates and grades its share of ``problems``; the result
    (identical on every process) holds all of them.
    """
    local_problems = process_share(problems)
    num_rows, mesh = local_row_count(rows_per_wave, "rows_per_wave"), mesh_of(policy.params)
    prompt_list = [task.prompt_tokens(p) for p in local_problems]
    rows = [(index, sample_index) for index in range(len(local_problems)) for sample_index in range(num_samples)]
    width = process_max(max((len(p) for p in prompt_list), default=1))
    answers = [[None] * num_samples for _ in local_problems]
    generated = 0
    num_waves = process_max(-(-len(rows) // num_rows))
    for wave_index in tqdm(range(num_waves), desc="evaluate", disable=not progress, leave=False):
        chunk = rows[wave_index * num_rows : (wave_index + 1) * num_rows]
        prompts = [prompt_list[index] for index, _ in chunk]
        prompts += [[task.pad_token_id]] * (num_rows - len(chunk))
        tokens, lengths = padded_prompts(prompts, task.pad_token_id, width)
        valid = np.arange(num_rows) < len(chunk)
        out = sample(policy.params, policy.config, tokens, lengths, valid, jax.random.fold_in(key, wave_index), sampling)
        completions, completion_lengths = local_rows(out.tokens, mesh), local_rows(out.lengths, mesh)
        generated += int(completion_lengths[valid].sum())
        for row, (index, sample_index) in enumerate(chunk):
            answers[index][sample_index] = task.extract(completions[row, : completion_lengths[row]])
    correct = [[bool(task.is_correct(a, p)) for a in row] for row, p in zip(answers, local_problems, strict=True)]
    majority = [bool(task.is_correct(majority_answer(row), p)) for row, p in zip(answers, local_problems, strict=True)]
    shares = allgather_objects({"answers": answers, "correct": correct, "majority": majority, "generated": generated})
    return EvalResult(answers=merge_shares([share["answers"] for share in shares]),
                      correct=np.array(merge_shares([share["correct"] for share in shares]), bool).reshape(
                          len(problems), num_samples),
                      majority_correct=np.array(merge_shares([share["majority"] for share in shares]), bool),
                      generated_tokens=sum(share["generated"] for share in shares))

"""pass@1 (avg@k), maj@k and pass@k of a policy on a task, sampled with our sampler."""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.distributed import to_host
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
      rows_per_wave: rows per sampler call; the last wave is padded with invalid rows so
        every call has the same shape.
    """
    prompt_list = [task.prompt_tokens(p) for p in problems]
    rows = [(index, sample_index) for index in range(len(problems)) for sample_index in range(num_samples)]
    width = max(len(p) for p in prompt_list)
    answers = [[None] * num_samples for _ in problems]
    generated = 0
    waves = range(0, len(rows), rows_per_wave)
    for wave_index, start in enumerate(tqdm(waves, desc="evaluate", disable=not progress, leave=False)):
        chunk = rows[start : start + rows_per_wave]
        prompts = [prompt_list[index] for index, _ in chunk]
        prompts += [[task.pad_token_id]] * (rows_per_wave - len(chunk))
        tokens, lengths = padded_prompts(prompts, task.pad_token_id, width)
        valid = np.arange(rows_per_wave) < len(chunk)
        out = sample(policy.params, policy.config, tokens, lengths, valid, jax.random.fold_in(key, wave_index), sampling)
        completions, completion_lengths = to_host(out.tokens), to_host(out.lengths)
        generated += int(completion_lengths.sum())
        for row, (index, sample_index) in enumerate(chunk):
            answers[index][sample_index] = task.extract(completions[row, : completion_lengths[row]])
    correct = np.array([[task.is_correct(a, p) for a in row] for row, p in zip(answers, problems, strict=True)])
    majority = np.array([task.is_correct(majority_answer(row), p) for row, p in zip(answers, problems, strict=True)])
    return EvalResult(answers=answers, correct=correct.reshape(len(problems), num_samples),
                      majority_correct=majority, generated_tokens=generated)

"""pass@1 (avg@k), maj@k and pass@k of a policy on a task, sampled with our sampler."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig, consensus, init_vote_state
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.distributed import allgather_objects, local_row_count, merge_shares, process_max, process_share
from optpo_jax.train.row_pool import RowPool
from optpo_jax.train.setup import Setup
from optpo_jax.train.waves import Wave, count_votes, sample_wave, tokenize_prompts


@dataclasses.dataclass
class EvalResult:
    """Per-prompt samples and the metrics over them.

    Attributes:
      answers: per prompt, the k extracted answers (None where none was found).
      correct: [P, k] bool, whether each sample's answer is right.
      majority_correct: [P] bool, whether the consensus answer is right (the most-voted
        answer slot, ties to the answer seen first; no answer at all counts as wrong).
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


def _sample_waves(policy, task, prompts, row_prompts, num_rows, key, sampling, bar, count, votes, answers):
    """Waves of ``num_rows`` rows over ``row_prompts`` in order (the last padded): (votes, generated tokens)."""
    generated = 0
    num_waves = process_max(-(-len(row_prompts) // num_rows))
    sample_number = np.arange(len(row_prompts)) - np.searchsorted(row_prompts, row_prompts)  # k-th of its prompt
    bar.reset(total=num_waves)
    for wave_index in range(num_waves):
        rows = slice(wave_index * num_rows, (wave_index + 1) * num_rows)
        chunk = row_prompts[rows]
        valid = np.arange(num_rows) < len(chunk)
        padding = (0, num_rows - len(chunk))
        wave = sample_wave(policy.params, policy.config, task, prompts, np.pad(chunk, padding), valid,
                           key, sampling, bar=bar,
                           rollout_index=np.pad(sample_number[rows], padding))
        generated += int(wave.completion_lengths[valid].sum())
        votes = count(votes, wave)
        for prompt, answer in zip(chunk, wave.answers[: len(chunk)], strict=True):  # the rest are padding rows
            answers[prompt].append(answer)
        bar.update(1)
    return votes, generated


def _sample_continuous(policy, task, prompts, row_prompts, num_rows, key, sampling, bar, count, votes, answers):
    """``row_prompts`` through a ``RowPool``, each freed row taking the next: (votes, generated tokens).

    Each answer goes to its sample's place (``rollout_index``), and the votes are counted once, at the
    end, in the waves' order (prompt, then sample): the same maj@k as waves, ties included."""
    generated, next_row = 0, 0
    num_samples = len(row_prompts) // max(len(answers), 1)
    placed = [[None] * num_samples for _ in answers]
    bar.reset(total=len(row_prompts))
    pool = RowPool(policy.params, policy.config, task, prompts, sampling, num_rows, key)
    while next_row < len(row_prompts) or pool.in_flight().any():
        start = row_prompts[next_row : next_row + len(pool.free_rows())]
        pool.insert(start)
        next_row += len(start)
        finished = pool.decode()
        generated += int(finished.completion_lengths.sum())
        for prompt, sample, answer in zip(finished.prompt_ids, finished.rollout_index, finished.answers, strict=True):
            placed[prompt][sample] = answer
        bar.update(len(finished.prompt_ids))
    for prompt, row in enumerate(placed):
        answers[prompt].extend(row)
    every_answer = [answer for row in placed for answer in row]
    return count(votes, Wave(row_prompts, np.ones(len(row_prompts), bool), None, None, None, every_answer)), generated


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

    Rows are filled in problem order (k rows per problem) through the same driver as
    training (waves, or a continuous row pool with ``sampling.schedule="continuous"``), and maj@k is the consensus of the same answer tables and votes that
    training uses (so equivalent spellings such as ``0.5`` and ``\\frac{1}{2}`` vote together).

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
    num_rows = local_row_count(rows_per_wave, "rows_per_wave")
    prompts = tokenize_prompts(task, local_problems, sampling)
    row_prompts = np.repeat(np.arange(len(local_problems), dtype=np.int32), num_samples)
    votes = init_vote_state(max(len(local_problems), 1), num_samples)
    answer_slots = AnswerSlots.for_task(task, len(local_problems), num_samples)
    vote_config = SPRTConfig(rule="fixed", min_samples=num_samples, max_samples=num_samples)
    answers = [[] for _ in local_problems]
    sample = _sample_waves
    if sampling.schedule == "continuous":
        if jax.process_count() == 1:
            sample = _sample_continuous
        else:
            warnings.warn(f"evaluation over {jax.process_count()} processes samples in waves: the continuous "
                          "schedule runs on one process", stacklevel=2)
    bar = tqdm(desc="evaluate", disable=not progress, leave=False)
    votes, generated = sample(policy, task, prompts, row_prompts, num_rows, key, sampling, bar,
                              lambda votes, batch: count_votes(votes, answer_slots, batch, vote_config)[0], votes,
                              answers)
    bar.close()
    # The vote tables have at least one row (an empty share still joins every wave); only real prompts have labels.
    slots = np.asarray(consensus(votes))[: len(local_problems)]
    labels = [answer_slots.answer(prompt, int(slot)) for prompt, slot in enumerate(slots)]
    correct = [[bool(task.is_correct(a, p)) for a in row] for row, p in zip(answers, local_problems, strict=True)]
    majority = [bool(task.is_correct(label, p)) for label, p in zip(labels, local_problems, strict=True)]
    shares = allgather_objects({"answers": answers, "correct": correct, "majority": majority, "generated": generated})
    return EvalResult(answers=merge_shares([share["answers"] for share in shares]),
                      correct=np.array(merge_shares([share["correct"] for share in shares]), bool).reshape(
                          len(problems), num_samples),
                      majority_correct=np.array(merge_shares([share["majority"] for share in shares]), bool),
                      generated_tokens=sum(share["generated"] for share in shares))


def run_eval(setup: Setup, params, num_samples: int, seed: int, progress: bool = True) -> EvalResult:
    """pass@1 / maj@k / pass@k of ``params`` on the run's evaluation prompts."""
    policy = dataclasses.replace(setup.policy, params=params)
    return evaluate(policy, setup.task, setup.eval_problems, num_samples, jax.random.key(seed), setup.eval_sampling,
                    rows_per_wave=setup.learner.config.rows_per_wave, progress=progress)

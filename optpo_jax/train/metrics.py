"""What a training step measures: rollouts, label and reward accuracy, entropy, the task's counters.

The only place where ground truth is read during training.
"""

from __future__ import annotations

import numpy as np

from optpo_jax.train.distributed import process_sum
from optpo_jax.train.step import StepOutput

_SUMMED = ("prompts", "rollouts", "vote_rollouts", "generated_tokens", "rows_used", "rows_total", "labels_right",
           "rewards_right", "majority_share_sum", "negative_logprob_sum", "answered")


def step_metrics(output: StepOutput, problems: list, task) -> dict:
    """Per-step metrics over every process's prompts.

    Each process grades its own prompts and their sums and the task's counters are added
    over processes; ``waves`` is common to all and ``decode_steps``, ``useful_row_fraction`` and the
    ``*_seconds`` timings are this process's.
    """
    rollouts, rewards, leader = output.rollouts, output.rewards, output.labels
    per_prompt = np.bincount(rollouts.prompt_index, minlength=len(problems))
    labels = [rollouts.answer_slots.answer(p, int(leader[p])) for p in range(len(problems))]
    label_right = np.array([task.is_correct(label, problem) for label, problem in zip(labels, problems, strict=True)])
    answer_right = np.array([task.is_correct(rollouts.answer_slots.answer(p, int(s)), problems[p])
                             for p, s in zip(rollouts.prompt_index, rollouts.slots, strict=True)])
    counts, votes = np.asarray(rollouts.votes.counts), np.asarray(rollouts.votes.num_samples)
    local = [len(problems), len(rollouts.prompt_index), votes.sum(), rollouts.completion_lengths.sum(),
             rollouts.rows_used, rollouts.rows_total, label_right.sum(), np.sum(rewards == answer_right),
             np.sum(counts.max(axis=1) / np.maximum(votes, 1)), -np.sum(rollouts.policy_logprobs),
             np.sum(rollouts.slots >= 0)]
    total = dict(zip(_SUMMED, process_sum(np.array(local, np.float64)).tolist(), strict=True))
    # A prompt keeps at most max_samples (= vote slots) rollouts: one histogram length on every process.
    histogram = np.trim_zeros(process_sum(np.bincount(per_prompt, minlength=counts.shape[1] + 1)), "b")
    return {
        # rollouts: every completion drawn; vote_rollouts: those the vote counted (the rest were drawn
        # for the update after the vote stopped: policy_update.min_rollouts_per_prompt).
        "rollouts": int(total["rollouts"]), "rollouts_per_prompt": total["rollouts"] / total["prompts"],
        "vote_rollouts": int(total["vote_rollouts"]),
        "rollouts_per_prompt_histogram": histogram.tolist(),
        "generated_tokens": int(total["generated_tokens"]), "waves": rollouts.waves,
        "wave_utilization": total["rows_used"] / max(total["rows_total"], 1),
        # Decode row-steps that produced a kept token (this process's rows; docs/architecture.md, continuous rollouts).
        "decode_steps": rollouts.decode_steps, "useful_row_fraction": rollouts.useful_row_fraction,
        # Rollouts with an extractable answer: 0 means no vote, no label, no reward and nothing trained.
        "answered_fraction": total["answered"] / max(total["rollouts"], 1),
        "label_accuracy": total["labels_right"] / total["prompts"],
        "reward_accuracy": total["rewards_right"] / max(total["rollouts"], 1),
        "majority_share": total["majority_share_sum"] / total["prompts"],
        "entropy": total["negative_logprob_sum"] / max(total["generated_tokens"], 1),
        "sampling_seconds": rollouts.sampling_seconds, **task_counters(task), **output.update_metrics,
    }


def task_counters(task) -> dict:
    """Running counts a task keeps, added over every process's share of the prompts: prompts
    truncated to fit, equivalence checks that timed out or failed (votes and ground truth:
    ``*_errors`` counts checks whose worker died on every try or whose math-verify call
    failed, each read as "not equal"), answers over the length limit."""
    counters = {}
    if hasattr(task, "truncated_prompts"):
        counters["truncated_prompts"] = task.truncated_prompts
    for name, attribute in (("equivalence", "equivalent"), ("grader", "grader")):
        checker = getattr(task, attribute, None)
        for counter in ("timeouts", "errors"):
            if hasattr(checker, counter):
                counters[f"{name}_{counter}"] = getattr(checker, counter)
    if hasattr(task, "overlong_answers"):
        counters["overlong_answers"] = task.overlong_answers
    return dict(zip(counters, process_sum(np.array(list(counters.values()), np.int64)).tolist(), strict=True))

"""Are the stopping rules calibrated? Votes simulated from answer distributions with a known mode.

Each simulated question draws its answer distribution p ~ Dir(alpha) over ``--answers``
answers (the mode, argmax p, is known) and then ``--budget`` votes from p. The votes are
replayed like recorded ones (``bench_stopping.replay_questions``, waves of ``--wave``).
For each rule and threshold t, over the questions that stopped before the budget:

- ``dirichlet`` (fixed prior, and learned online): the share whose label is the true mode,
  which a calibrated rule keeps at or above t;
- ``predictive``: the share whose label equals the full-budget vote's label (what it targets).

Printed with the Monte Carlo standard error of each share.

    python experiments/calibration_stopping.py [--questions 4000] [--answers 4] [--alpha 1.0]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from bench_stopping import replay_questions
from vote_replay import VoteSamples

from optpo_jax import SPRTConfig

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def simulate(num_questions: int, num_answers: int, alpha: float, budget: int, seed: int = 0):
    """(VoteSamples with slots by first appearance, true-mode slot per question [Q])."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.full(num_answers, alpha), size=num_questions)
    answers = np.stack([rng.choice(num_answers, size=budget, p=p) for p in probabilities])
    slots = np.zeros_like(answers)
    mode_slots = np.full(num_questions, -1)
    for question, row in enumerate(answers):
        first_seen = {int(answer): index for index, answer in enumerate(dict.fromkeys(row.tolist()))}
        slots[question] = [first_seen[answer] for answer in row]
        mode_slots[question] = first_seen.get(int(np.argmax(probabilities[question])), -1)
    counts = np.stack([np.bincount(row, minlength=budget) for row in slots])
    full_majority = counts.argmax(axis=1)
    samples = VoteSamples("simulated", slots.astype(np.int32), mode_slots.astype(np.int32), full_majority)
    return samples, mode_slots


def calibration_rows(samples: VoteSamples, mode_slots: np.ndarray, wave: int) -> list[dict]:
    budget = samples.slots.shape[1]
    rows = []
    for rule, learn_prior, target in [("dirichlet", False, "mode"), ("dirichlet", True, "mode"),
                                      ("predictive", False, "full-budget label")]:
        for threshold in THRESHOLDS:
            config = SPRTConfig(rule=rule, threshold=threshold, min_samples=1, max_samples=budget,
                                learn_prior=learn_prior)
            labels, rollouts, fitted = replay_questions(samples, config, wave)
            early = rollouts < budget
            reference = mode_slots if target == "mode" else samples.full_majority
            share = float(np.mean(labels[early] == reference[early])) if early.any() else float("nan")
            stderr = math.sqrt(share * (1 - share) / max(early.sum(), 1))
            rows.append({"rule": rule + (" (learned prior)" if learn_prior else ""), "threshold": threshold,
                         "target": target, "stopped_early": int(early.sum()), "share": share, "stderr": stderr,
                         "rollouts": float(rollouts.mean()), "fitted_prior": fitted})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--answers", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--wave", type=int, default=4)
    args = parser.parse_args()
    samples, mode_slots = simulate(args.questions, args.answers, args.alpha, args.budget)
    print(f"{args.questions} questions, p ~ Dir({args.alpha}) over {args.answers} answers, budget {args.budget}, "
          f"waves of {args.wave}; rule prior 1.0 unless learned\n")
    print("| rule | threshold | label checked against | stopped early | share right (± stderr) | rollouts/question |")
    print("|---|---:|---|---:|---:|---:|")
    for row in calibration_rows(samples, mode_slots, args.wave):
        fitted = f" (fitted {row['fitted_prior']})" if row["fitted_prior"] is not None else ""
        print(f"| {row['rule']}{fitted} | {row['threshold']} | {row['target']} | {row['stopped_early']} "
              f"| {100 * row['share']:.2f}% ± {100 * row['stderr']:.2f} | {row['rollouts']:.2f} |")


if __name__ == "__main__":
    main()

"""Stopping rules replayed on real votes: rollouts spent against label quality.

Every question's recorded answers are fed in waves of ``--wave-size`` through
``sprt_update``; a question stops when its rule says so. Printed per rule: mean
rollouts per question, the saving against all N recorded votes, agreement of the
early label with the N-vote majority, and accuracy of the early label against the
truth.

    python experiments/bench_stopping.py [--wave-size 4] [--data-dir ../shared/data/vote_samples]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from vote_replay import DATASETS, DEFAULT_DATA_DIR, VoteSamples, load_vote_samples

from optpo_jax import SPRTConfig, consensus, init_vote_state, sprt_update

RULES = [
    ("dirichlet", {"threshold": 0.90}),
    ("dirichlet", {"threshold": 0.95}),
    ("dirichlet", {"threshold": 0.99}),
    ("beta", {"threshold": 0.90}),
    ("beta", {"threshold": 0.95}),
    ("beta", {"threshold": 0.99}),
    ("esc", {"esc_window": 4}),
    ("esc", {"esc_window": 8}),
    ("fixed", {}),
]


def replay(samples: VoteSamples, config: SPRTConfig, wave_size: int) -> dict[str, float]:
    """Feeds each question its recorded answers in waves until every question stops."""
    num_questions, num_answers = samples.slots.shape
    update = jax.jit(functools.partial(sprt_update, config=config))
    state = init_vote_state(num_questions, num_answers)
    prompt_ids = jnp.repeat(jnp.arange(num_questions, dtype=jnp.int32), wave_size)
    slots = jnp.asarray(samples.slots)
    for start in range(0, num_answers, wave_size):
        index = start + jnp.tile(jnp.arange(wave_size), num_questions)
        answer_slots = jnp.where(index < num_answers, slots[prompt_ids, jnp.minimum(index, num_answers - 1)], -1)
        state = update(state, prompt_ids, answer_slots, index < num_answers)
    label = np.asarray(consensus(state))
    rollouts = np.asarray(state.num_samples)
    return {
        "rollouts": float(rollouts.mean()),
        "saving": float(1.0 - rollouts.mean() / num_answers),
        "agreement": float(np.mean(label == samples.full_majority)),
        "accuracy": float(np.mean((label == samples.truth_slots) & (label >= 0))),
    }


def setting_label(knobs: dict, num_answers: int) -> str:
    """The knob a rule was run with, as ``name=value`` (the fixed rule's budget if none)."""
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or f"max_samples={num_answers}"


def replay_rules(samples: VoteSamples, rules: list[tuple[str, dict]], wave_size: int) -> list[dict]:
    """One row per (rule, knobs): the data set, rule, setting and ``replay``'s numbers.

    The budget is every recorded vote unless ``knobs`` sets ``max_samples``; ``min_samples`` is 1.
    """
    num_questions, num_answers = samples.slots.shape
    rows = []
    for rule, knobs in tqdm(rules, desc=samples.name, leave=False):
        config = SPRTConfig(rule=rule, **{"min_samples": 1, "max_samples": num_answers, **knobs})
        rows.append({"data": samples.name, "questions": num_questions, "votes": num_answers, "rule": rule,
                     "setting": setting_label(knobs, num_answers), **replay(samples, config, wave_size)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wave-size", type=int, default=4)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [row for name in DATASETS
            for row in replay_rules(load_vote_samples(name, args.data_dir), RULES, args.wave_size)]
    print(f"Stopping rules on recorded votes, waves of {args.wave_size}, budget = all recorded votes\n")
    print("| data (questions, votes) | rule | setting | rollouts/question | saving | agrees with full vote | accuracy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['data']} ({row['questions']}, {row['votes']}) | {row['rule']} | {row['setting']} "
            f"| {row['rollouts']:.2f} | {row['saving']:.1%} | {row['agreement']:.2%} | {row['accuracy']:.2%} |"
        )
    print(f"\n({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()

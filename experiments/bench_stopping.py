"""Stopping rules replayed on real votes: rollouts spent against label quality.

Every question's recorded answers are fed in waves of ``--wave`` rows per question
through ``sprt_update``; a question stops when its rule says so. Printed per rule:
mean rollouts per question, the saving against the full budget (every recorded vote),
agreement of the early label with the full-budget majority, and accuracy of the early
label against the truth.

    python experiments/bench_stopping.py                       # every rule, both shared sets
    python experiments/bench_stopping.py --rule predictive --threshold 0.95 --learn_prior
    python experiments/bench_stopping.py --config configs/arith_optpo.py --data my_votes.jsonl --json

A learned prior (``--learn_prior``, or a config with ``sprt.learn_prior``) is learned
online: the questions are shuffled with a fixed seed and replayed in chunks of
``--chunk``; each chunk stops with the prior fitted to the chunks before it and then adds
its own votes, so no question is scored with a prior that saw its votes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time

import numpy as np
from tqdm import tqdm
from vote_replay import DATASETS, DEFAULT_DATA_DIR, VoteSamples, load_vote_file, load_vote_samples, replay

from optpo_jax import SPRTConfig, consensus
from optpo_jax.prior import fitted_concentration, init_prior_state, update_prior

# The default table: every rule at its usual settings.
RULES = [
    ("dirichlet", {"threshold": 0.90}),
    ("dirichlet", {"threshold": 0.95}),
    ("dirichlet", {"threshold": 0.99}),
    ("dirichlet", {"threshold": 0.95, "learn_prior": True}),
    ("beta", {"threshold": 0.90}),
    ("beta", {"threshold": 0.95}),
    ("beta", {"threshold": 0.99}),
    ("esc", {"esc_window": 4}),
    ("esc", {"esc_window": 8}),
    ("margin", {"threshold": 0.95, "margin_p0": 0.75}),
    ("margin", {"threshold": 0.99, "margin_p0": 0.75}),
    ("predictive", {"threshold": 0.90}),
    ("predictive", {"threshold": 0.95}),
    ("predictive", {"threshold": 0.95, "learn_prior": True}),
    ("fixed", {}),
]
SHUFFLE_SEED = 0


def _final_votes(slots: np.ndarray, config: SPRTConfig, wave_size: int, prior_state=None):
    """The VoteState of the questions ``slots`` [Q, N] once ``wave_size`` rows each per wave have stopped them."""
    return replay(slots[None], config, wave_size * slots.shape[0], prior_state=prior_state).votes_by_question()


def replay_questions(samples: VoteSamples, config: SPRTConfig, wave_size: int, chunk: int = 64):
    """Each question's early label and rollouts under ``config``: (labels [Q], rollouts [Q], fitted prior or None).

    With ``config.learn_prior`` the questions go in a shuffled order (``SHUFFLE_SEED``), ``chunk`` at a time,
    each chunk stopped with the prior fitted to the chunks before it; the arrays are in the original order.
    """
    num_questions = samples.slots.shape[0]
    if not config.learn_prior:
        state = _final_votes(samples.slots, config, wave_size)
        return np.asarray(consensus(state)), np.asarray(state.num_samples), None
    order = np.random.default_rng(SHUFFLE_SEED).permutation(num_questions)
    prior_state = init_prior_state()
    labels, rollouts = np.zeros(num_questions, np.int32), np.zeros(num_questions, np.int32)
    for start in range(0, num_questions, chunk):
        questions = order[start : start + chunk]
        state = _final_votes(samples.slots[questions], config, wave_size, prior_state)
        labels[questions], rollouts[questions] = np.asarray(consensus(state)), np.asarray(state.num_samples)
        prior_state = update_prior(prior_state, state.counts)
    return labels, rollouts, fitted_concentration(prior_state, config.prior)


def rule_scores(samples: VoteSamples, config: SPRTConfig, wave_size: int, chunk: int = 64) -> dict:
    """Rollouts and label quality of ``config`` on ``samples`` (learned online when ``config.learn_prior``)."""
    label, rollouts, concentration = replay_questions(samples, config, wave_size, chunk)
    return {
        "rollouts_per_question": float(rollouts.mean()),
        "saving": float(1.0 - rollouts.mean() / samples.slots.shape[1]),
        "agreement": float(np.mean(label == samples.full_majority)),
        "accuracy": float(np.mean((label == samples.truth_slots) & (label >= 0))),
        "fitted_prior": concentration,
    }


def setting_label(knobs: dict, num_answers: int) -> str:
    """The knobs a rule was run with, as ``name=value`` (the budget if none)."""
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or f"max_samples={num_answers}"


def replay_rules(samples: VoteSamples, rules: list[tuple[str, dict]], wave_size: int, chunk: int = 64) -> list[dict]:
    """One row per (rule, knobs): the data set, rule, setting and ``rule_scores``.

    The budget is every recorded vote unless ``knobs`` sets ``max_samples``; ``min_samples`` is 1
    unless set.
    """
    num_questions, num_answers = samples.slots.shape
    rows = []
    for rule, knobs in tqdm(rules, desc=samples.name, leave=False):
        config = SPRTConfig(rule=rule, **{"min_samples": 1, "max_samples": num_answers, **knobs})
        rows.append({"data": samples.name, "questions": num_questions, "votes": num_answers, "rule": rule,
                     "setting": setting_label(knobs, num_answers), **rule_scores(samples, config, wave_size, chunk)})
    return rows


def rules_of_config(path: str, num_answers: int) -> list[tuple[str, dict]]:
    """The ``sprt`` settings of an experiment config file, its budget capped at the recorded votes."""
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sprt = dict(module.get_config().sprt)
    fields = {field.name for field in dataclasses.fields(SPRTConfig)}
    knobs = {name: value for name, value in sprt.items() if name in fields and name != "rule"}
    knobs["max_samples"] = min(int(knobs.get("max_samples", num_answers)), num_answers)
    knobs["min_samples"] = min(int(knobs.get("min_samples", 1)), knobs["max_samples"])
    return [(sprt["rule"], knobs)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help="a .jsonl of recorded votes (repeatable); default: the "
                        f"shared sets {', '.join(DATASETS.values())} in --data-dir")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--rule", help="one rule (default: the table of every rule)")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--prior", type=float)
    parser.add_argument("--margin_p0", type=float)
    parser.add_argument("--esc_window", type=int)
    parser.add_argument("--learn_prior", action="store_true", help="fit the prior online (see above)")
    parser.add_argument("--config", help="an experiment config file: replay its sprt settings")
    parser.add_argument("--wave", type=int, default=4, help="rows per question per wave")
    parser.add_argument("--chunk", type=int, default=64, help="questions per chunk of the online prior")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    if args.wave < 1:
        parser.error(f"--wave must be >= 1, got {args.wave}")
    if args.config and args.rule:
        parser.error("--config and --rule both set the rule: pass one")
    knob_flags = {k: getattr(args, k) for k in ("threshold", "prior", "margin_p0", "esc_window")}
    if not args.rule and not args.config and (any(v is not None for v in knob_flags.values()) or args.learn_prior):
        parser.error("rule settings (--threshold, --prior, ...) need --rule")
    return args


def chosen_rules(args, num_answers: int) -> list[tuple[str, dict]]:
    if args.config:
        return rules_of_config(args.config, num_answers)
    if not args.rule:
        return RULES
    knobs = {k: getattr(args, k) for k in ("threshold", "prior", "margin_p0", "esc_window")
             if getattr(args, k) is not None}
    if args.learn_prior:
        knobs["learn_prior"] = True
    return [(args.rule, knobs)]


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    sets = ([load_vote_file(path) for path in args.data] if args.data
            else [load_vote_samples(name, args.data_dir) for name in DATASETS])
    rows = []
    for samples in sets:
        try:
            rows += replay_rules(samples, chosen_rules(args, samples.slots.shape[1]), args.wave, args.chunk)
        except ValueError as error:  # an SPRTConfig field out of range: its message names it
            raise SystemExit(f"bench_stopping: {error}") from error
    if args.json:
        for row in rows:
            print(json.dumps({key: row[key] for key in ("data", "rule", "setting", "rollouts_per_question",
                                                         "agreement", "accuracy")}))
        return rows
    print(f"Stopping rules on recorded votes, waves of {args.wave}, budget = all recorded votes\n")
    print("| data (questions, votes) | rule | setting | rollouts/question | saving | agrees with full vote | accuracy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        fitted = f" (fitted prior {row['fitted_prior']})" if row["fitted_prior"] is not None else ""
        print(f"| {row['data']} ({row['questions']}, {row['votes']}) | {row['rule']} | {row['setting']}{fitted} "
              f"| {row['rollouts_per_question']:.2f} | {row['saving']:.1%} | {row['agreement']:.2%} "
              f"| {row['accuracy']:.2%} |")
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return rows


if __name__ == "__main__":
    main()

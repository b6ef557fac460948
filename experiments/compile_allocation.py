"""Compile and run time of one wave's allocation (``allocate_wave``) for each stopping rule.

The first call of the jitted allocation compiles it; the rule is traced inside the
demand's binary search and, with a learned prior, once per concentration of the grid for
the Dirichlet rule (whose tables depend on it; beta and predictive take it as a traced
value). Run it at two commits to compare:

    python experiments/compile_allocation.py [--prompts 64] [--rows 256] [--max_samples 64]
"""

from __future__ import annotations

import argparse

import jax
from bench_common import best_time

from optpo_jax.allocation import allocate_wave
from optpo_jax.prior import init_prior_state
from optpo_jax.sprt import SPRTConfig, init_vote_state

SETTINGS = (("dirichlet", 0.95, 1.0, False), ("dirichlet", 0.95, 1.0, True), ("predictive", 0.93, 0.3, False),
            ("predictive", 0.93, 0.3, True))


def time_allocation(config: SPRTConfig, num_prompts: int, num_rows: int) -> tuple[float, float]:
    """(seconds of the first call, the fastest of the next three) of the jitted allocation of an empty vote state."""
    state = init_vote_state(num_prompts, config.max_samples)
    prior_state = init_prior_state() if config.learn_prior else None
    allocate = jax.jit(lambda votes, prior: allocate_wave(votes, num_rows, config, prior))
    call = lambda: jax.block_until_ready(allocate(state, prior_state))
    return best_time(call, 1), best_time(call, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max_samples", type=int, default=64)
    args = parser.parse_args()
    print("| rule | threshold | prior | learn_prior | first call (s) | later call (ms, best of 3) |\n|---|---:|---:|---|---:|---:|")
    for rule, threshold, prior, learn_prior in SETTINGS:
        config = SPRTConfig(rule=rule, threshold=threshold, prior=prior, max_samples=args.max_samples,
                            learn_prior=learn_prior)
        first, later = time_allocation(config, args.prompts, args.rows)
        print(f"| {rule} | {threshold} | {prior} | {learn_prior} | {first:.1f} | {later * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()

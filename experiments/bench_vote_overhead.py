"""How much of a batch's rollout collection is vote bookkeeping rather than sampling.

Runs ``collect_rollouts`` (OptPO's stopping rule, the shipped arithmetic policy) and
splits its wall time into the sampler and everything else on the host: answer
extraction, slot tables, ``allocate_wave`` and ``sprt_update`` on the votes. This is
what keeping the vote state per process (along prompts) instead of on the mesh costs.

    python experiments/bench_vote_overhead.py
"""

from __future__ import annotations

import argparse
import time

import jax

from optpo_jax.default_config import arithmetic_config
from optpo_jax.experiment import build_setup
from optpo_jax.rollouts import collect_rollouts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rows_per_wave", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = arithmetic_config("optpo")
    config.rows_per_wave = args.rows_per_wave
    setup = build_setup(config)
    problems = setup.train_problems[: args.prompts]
    for repeat in range(args.repeats + 1):  # the first call compiles
        start = time.perf_counter()
        rollouts, _ = collect_rollouts(setup.policy.params, setup.model_config, setup.task, problems, setup.sprt,
                                       setup.sampling, setup.rows_per_wave, jax.random.key(repeat))
        total = time.perf_counter() - start
        if repeat:
            host = total - rollouts.sampling_seconds
            print(f"waves {rollouts.waves:3d}  rollouts {len(rollouts.prompt_index):5d}  total {total:6.3f} s  "
                  f"sampler {rollouts.sampling_seconds:6.3f} s  host bookkeeping {host:6.3f} s "
                  f"({host / total:.1%}, {1e3 * host / rollouts.waves:.1f} ms per wave)")


if __name__ == "__main__":
    main()

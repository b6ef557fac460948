"""Where a training step's time goes on the embedded task, and the padded-advantages baseline.

Runs OptPO (or TTRL) steps of the library's ``training_step`` from the shipped policy,
with ``stage_seconds``: it waits for the device after each stage and reports the seconds
of collecting rollouts, the rewards (the consensus), the group advantages, the update's
rows and the micro-batched update. Collection is split into the sampler and the host's
vote bookkeeping (answer extraction, slot tables, allocate_wave, sprt_update: what keeping
the votes per process on the host costs). The advantages are timed twice on the same
inputs: jitted on a padded count (``rollout_advantages``, what the step uses) and eagerly
on the exact count (the baseline, which compiles anew whenever the count changes).

    python experiments/profile_step.py [--method ttrl] [--steps 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import timed

from optpo_jax.default_config import arithmetic_config
from optpo_jax.grpo import group_advantages
from optpo_jax.train.batches import batch_problems
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step import training_step


def eager_advantages_seconds(output, num_prompts: int, estimator: str) -> float:
    """Seconds of ``group_advantages`` called eagerly on the step's exact rollout count (the baseline)."""
    rewards, prompt_index = jnp.asarray(output.rewards), jnp.asarray(output.rollouts.prompt_index)
    return timed(group_advantages, rewards, prompt_index, jnp.ones(len(output.rewards), bool), num_prompts,
                 estimator)[1]


def stage_report(output, stages: dict, eager: float) -> str:
    """The step's stage seconds as one line, collection split into the sampler and the host's bookkeeping."""
    rollouts, collect = output.rollouts, stages["collect"]
    host = collect - rollouts.sampling_seconds
    return (f"collect {collect:.2f} s (sampler {rollouts.sampling_seconds:.2f} s, host bookkeeping "
            f"{1e3 * host / rollouts.waves:.1f} ms a wave, {host / collect:.1%}), rewards {stages['rewards']:.2f} s, "
            f"advantages {stages['advantages']:.3f} s (eager baseline {eager:.3f} s), rows {stages['rows']:.3f} s, "
            f"update {stages['update']:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="optpo", choices=("optpo", "ttrl"))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    config = arithmetic_config(args.method)
    setup = build_setup(config)
    state, learner = setup.initial_state(), setup.learner
    for step in range(args.steps):
        problems = batch_problems(setup.train_problems, step, config.prompts_per_step, config.seed)
        stages = {}
        state, output = training_step(state, learner, problems, jax.random.key(step), np.random.default_rng(step),
                                      stage_seconds=stages)
        eager = eager_advantages_seconds(output, len(problems), learner.config.update.advantage_estimator)
        metrics = output.update_metrics
        print(f"{args.method} step {step}: {len(output.rewards)} rollouts, {metrics['trained_rollouts']} trained, "
              f"{metrics['optimizer_steps']} optimizer steps | {stage_report(output, stages, eager)}")


if __name__ == "__main__":
    main()

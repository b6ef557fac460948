"""Where a training step's time goes on the embedded task, and the padded-advantages baseline.

Runs OptPO (or TTRL) steps from the shipped policy and times each stage of
``loop.training_step``: collecting rollouts, the consensus, the group advantages, the
teacher-forcing arrays and the micro-batched update. Collection is split into the
sampler and the host's vote bookkeeping (answer extraction, slot tables, allocate_wave,
sprt_update: what keeping the votes per process on the host costs). The advantages are
timed twice on the same inputs: jitted on a padded count (``rollout_advantages``, what
the loop uses) and eagerly on the exact count (the baseline, which compiles anew
whenever the count changes).

    python experiments/profile_step.py [--method ttrl] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.default_config import arithmetic_config
from optpo_jax.grpo import group_advantages
from optpo_jax.train.loop import batch_problems, init_train_state
from optpo_jax.train.rewards import consensus_rewards
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step import rollout_advantages, training_rows, update_policy, update_rows


def timed(fn, *args):
    """(fn(*args), seconds), waiting for any device work it started."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="optpo", choices=("optpo", "ttrl"))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    config = arithmetic_config(args.method)
    setup = build_setup(config)
    state, learner = init_train_state(setup), setup.learner
    mode = learner.config.update.advantage_mode
    for step in range(args.steps):
        problems = batch_problems(setup.train_problems, step, config.prompts_per_step, config.seed)
        (rollouts, _), collect = timed(collect_rollouts, state.params, learner.model_config, learner.task, problems,
                                       learner.config, jax.random.key(step))
        host = collect - rollouts.sampling_seconds
        rewards, consensus = timed(consensus_rewards, rollouts, problems, learner.task)
        num_rollouts, num_prompts = len(rewards), len(problems)
        advantages, padded = timed(rollout_advantages, rewards, rollouts.prompt_index, num_prompts, mode)
        _, eager = timed(group_advantages, jnp.asarray(rewards), jnp.asarray(rollouts.prompt_index),
                         jnp.ones(num_rollouts, bool), num_prompts, mode)
        rng = np.random.default_rng(step)
        rows = training_rows(rollouts, advantages, learner.config.update, rng)
        arrays, build = timed(update_rows, rollouts, rows, advantages)
        (state, metrics), update = timed(update_policy, state, arrays, learner, rng)
        print(f"{args.method} step {step}: {num_rollouts} rollouts, {len(rows)} trained, "
              f"{metrics['optimizer_steps']} optimizer steps | collect {collect:.2f} s (sampler "
              f"{rollouts.sampling_seconds:.2f} s, host bookkeeping {1e3 * host / rollouts.waves:.1f} ms a wave, "
              f"{host / collect:.1%}), consensus {consensus:.2f} s, "
              f"advantages {padded:.3f} s (eager baseline {eager:.3f} s), arrays {build:.3f} s, update {update:.2f} s")


if __name__ == "__main__":
    main()

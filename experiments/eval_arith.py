"""pass@1, maj@64 and pass@64 of an arithmetic policy on the shifted test set, with the per-prompt histogram.

    python experiments/eval_arith.py [--policy optpo_jax/tasks/arith_policy] [--prompts 256] [--samples 64]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from optpo_jax.sampler import SamplingConfig
from optpo_jax.tasks.arithmetic import POLICY_DIR, SHIFTED, SOURCE, ArithmeticTask, generate_problems, load_policy
from optpo_jax.train.evaluation import evaluate

TEST_SEED = 0  # the default config's data.seed: the prompts the loop adapts on


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=str(POLICY_DIR))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    task, policy = ArithmeticTask(), load_policy(args.policy)
    sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, stop_token_ids=task.stop_token_ids,
                              pad_token_id=task.pad_token_id)
    print(f"policy {args.policy}: {policy.config.num_params() / 1e6:.2f}M parameters")
    for name, distribution in (("source", SOURCE), ("shifted test", SHIFTED)):
        problems = generate_problems(args.prompts, distribution, seed=TEST_SEED)
        result = evaluate(policy, task, problems, args.samples, jax.random.key(0), sampling)
        avg16 = result.correct[:, :16].mean()
        print(f"{name}: {args.prompts} prompts x {args.samples} samples at temperature 1: "
              f"pass@1 {100 * result.pass_at_1:.1f}% (avg@16 {100 * avg16:.1f}%, stderr "
              f"{100 * result.pass_at_1_stderr():.1f}), maj@{args.samples} {100 * result.maj_at_k:.1f}%, "
              f"pass@{args.samples} {100 * result.pass_at_k:.1f}%")
    histogram, edges = np.histogram(result.per_prompt_accuracy, bins=10, range=(0, 1))
    print("per-prompt accuracy on the shifted test set (fraction of samples right):")
    for count, low, high in zip(histogram, edges[:-1], edges[1:], strict=True):
        print(f"  [{low:.1f}, {high:.1f}{']' if high == 1 else ')'} {count:4d} {'#' * int(count * 60 / args.prompts)}")


if __name__ == "__main__":
    main()

"""Wave allocation against an equal split, replayed on real votes.

Questions are taken in batches of ``P``; each wave has ``R`` rows. The n-th rollout
of a question is its n-th recorded answer. ``allocate_wave`` (demand-sized, spare
rows to the least settled) is compared with an equal split (every active prompt gets
R // active rows, capped by its budget). Printed: waves until the whole batch stops,
rollouts per question, the fraction of rows that carried a rollout, and agreement
of the label with the full-vote majority.

    python experiments/bench_allocation.py
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from vote_replay import DATASETS, DEFAULT_DATA_DIR, load_vote_samples, replay

from optpo_jax import SPRTConfig, allocate_wave, consensus
from optpo_jax.allocation import rows_to_prompts
from optpo_jax.sprt import remaining_budget


def equal_split(state, num_rows, config):
    """Baseline: R // active rows to every active prompt, capped by budget."""
    active = ~state.done
    num_active = jnp.maximum(jnp.sum(active), 1)
    budget = remaining_budget(state, config)
    share = num_rows // num_active
    # When rows are fewer than prompts, the first R active prompts get one each.
    first_rows = active & (jnp.cumsum(active) <= num_rows)
    rows = jnp.where(share > 0, jnp.minimum(budget, share), first_rows.astype(jnp.int32))
    return rows_to_prompts(rows, num_rows)


def run(slots, full_majority, batch_size, num_rows, allocate, config):
    """Waves per batch, rollouts per question, row utilization and agreement of ``allocate`` on the questions
    ``slots`` [Q, N] taken ``batch_size`` at a time (the remainder left out), ``num_rows`` rows per wave."""
    num_batches = slots.shape[0] // batch_size
    kept = num_batches * batch_size
    replayed = replay(slots[:kept].reshape(num_batches, batch_size, -1), config, num_rows, allocate)
    labels = np.asarray(consensus(replayed.votes_by_question()))
    return {
        "waves": replayed.waves.mean(),
        "rollouts": float(jnp.mean(replayed.votes.num_samples)),
        "utilization": replayed.used_rows / (replayed.waves.sum() * num_rows),
        "agreement": np.mean(labels == full_majority[:kept]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    print("| data | prompts P | rows R | allocator | waves per batch | rollouts/question | row utilization | agrees with full vote |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in DATASETS:
        samples = load_vote_samples(name, args.data_dir)
        config = SPRTConfig(threshold=args.threshold, min_samples=4, max_samples=samples.slots.shape[1])
        for batch_size, num_rows in [(16, 64), (64, 64), (64, 512)]:
            for label, allocate in [("allocate_wave", allocate_wave), ("equal split", equal_split)]:
                r = run(samples.slots, samples.full_majority, batch_size, num_rows, allocate, config)
                print(
                    f"| {name} | {batch_size} | {num_rows} | {label} | {r['waves']:.2f} | {r['rollouts']:.2f} "
                    f"| {r['utilization']:.1%} | {r['agreement']:.2%} |"
                )


if __name__ == "__main__":
    main()

"""The OptPO settings sweep on the embedded task: learning rate, KL to the reference, epochs, lookahead.

Each setting runs the full default loop (16 steps of 32 prompts, transductive) from the
shipped policy with the same seed; prints one table row per setting.

    python experiments/sweep_arith.py [--out experiments/out/sweep]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from optpo_jax.default_config import arithmetic_config
from optpo_jax.train import train
from optpo_jax.train.metrics_log import read_metrics

SETTINGS = {
    "lr 3e-5": {"optimizer.learning_rate": 3e-5},
    "lr 1e-4 (default)": {},
    "lr 3e-4": {"optimizer.learning_rate": 3e-4},
    "lr 1e-4, KL 0.05": {"grpo.kl_coef": 0.05},
    "lr 1e-4, 2 epochs": {"policy_update.epochs": 2},
    "lr 1e-4, no lookahead": {"lookahead": False},
}


def configured(overrides: dict):
    config = arithmetic_config("optpo")
    config.update_from_flattened_dict(overrides)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/sweep"))
    args = parser.parse_args()
    print("| setting | pass@1 before | pass@1 after | maj@64 after | rollouts | wave utilization | sampling s "
          "| update s | entropy first -> last | majority share first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, overrides in SETTINGS.items():
        workdir = args.out / name.replace(" ", "_").replace(",", "")
        summary = train(configured(overrides), workdir, progress=False)
        steps = [record for record in read_metrics(workdir) if "rollouts" in record]
        mean, total = (lambda key, f=f, steps=steps: float(f([s[key] for s in steps])) for f in (np.mean, np.sum))
        print(f"| {name} | {100 * summary['before']['pass@1']:.1f} | {100 * summary['after']['pass@1']:.1f} ± "
              f"{100 * summary['after']['pass@1_stderr']:.1f} | {100 * summary['after']['maj@64']:.1f} "
              f"| {summary['total_rollouts']:,} | {mean('wave_utilization'):.2f} | {total('sampling_seconds'):.0f} "
              f"| {total('update_seconds'):.0f} | {steps[0]['entropy']:.3f} -> {steps[-1]['entropy']:.3f} "
              f"| {steps[0]['majority_share']:.2f} -> {steps[-1]['majority_share']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

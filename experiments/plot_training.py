"""Figures of a `compare` run: pass@1 over training (OptPO and TTRL) and OptPO's rollouts per prompt.

Needs a compare run that evaluated during training, e.g. every 2 steps (about 7 min on
a 2-core CPU):

    python -m optpo_jax.cli compare --workdir experiments/out/curves \
        --config.eval.every_steps=2 --baseline_config.eval.every_steps=2
    python experiments/plot_training.py --workdir experiments/out/curves [--out docs/figures]

Writes training_curves.png / .csv and rollouts_histogram.png / .csv into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optpo_jax.plots import (
    plot_rollouts_histogram,
    plot_training_curves,
    rollouts_histogram,
    save_figure,
    training_curve,
    write_csv,
)

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="experiments/out/curves", help="the compare run's --workdir")
    parser.add_argument("--out", default=str(FIGURES))
    args = parser.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    curves = [row for method in ("optpo", "ttrl") for row in training_curve(workdir / method)]
    write_csv(curves, out / "training_curves.csv")
    print(save_figure(plot_training_curves(workdir), out / "training_curves.png"))
    counts = rollouts_histogram(workdir / "optpo")
    write_csv([{"rollouts": n, "prompt_steps": int(c)} for n, c in enumerate(counts)], out / "rollouts_histogram.csv")
    print(save_figure(plot_rollouts_histogram(workdir / "optpo"), out / "rollouts_histogram.png"))
    print("| method | step | rollouts | train s | pass@1 (%) |\n|---|---:|---:|---:|---:|")
    for row in curves:
        print(f"| {row['method']} | {row['step']} | {row['rollouts']:,} | {row['train_seconds']:.0f} "
              f"| {100 * row['pass@1']:.1f} ± {100 * row['pass@1_stderr']:.1f} |")


if __name__ == "__main__":
    main()

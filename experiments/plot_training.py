"""Figures of a `compare` run: pass@1 against steps and compute (OptPO and TTRL), the compute-matched row.

Works on both layouts of `optpo-jax compare`: one run per method (`--workdir/optpo`,
`--workdir/ttrl`) and several seeds (`--workdir/seed{s}/{method}`, from `--seeds N`).
Curves need evaluations during training, e.g. every 2 steps (about 7 min per seed on a
2-core CPU):

    python -m optpo_jax.cli compare --workdir experiments/out/curves \
        --config.eval.every_steps=2 --baseline_config.eval.every_steps=2
    python experiments/plot_training.py --workdir experiments/out/curves [--out docs/figures]

    python -m optpo_jax.cli compare --seeds 3 --workdir experiments/out/seeds \
        --config.eval.every_steps=2 --baseline_config.eval.every_steps=2
    python experiments/plot_training.py --workdir experiments/out/seeds --out experiments/out/seeds/figures

Writes into --out: compute_curves.png / .csv (pass@1 against rollouts, generated tokens,
trained tokens and training seconds; mean over seeds with a +- 1 stderr band) and
compute_matched.csv; with one run per method also training_curves.png / .csv and
rollouts_histogram.png / .csv (OptPO's rollouts per prompt), as before. Prints the
compute-matched row: TTRL's pass@1 at OptPO's total training seconds, interpolated from
TTRL's evaluated steps (TTRL is not rerun with a time budget), per seed, with the paired
difference; and the same paired difference at each of OptPO's evaluated steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optpo_jax.report.compare import discover, load_curves
from optpo_jax.report.plots import (
    compute_curve_rows,
    plot_compute_curves,
    plot_rollouts_histogram,
    plot_training_curves,
    read_config,
    rollouts_histogram,
    save_figure,
    training_curve,
    write_csv,
)
from optpo_jax.report.seed_stats import compute_matched, curve_gaps

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def matched_rows(curves: list[list[dict]], methods: list[str], seeds: list) -> tuple[list[dict], dict]:
    """Per seed: A's final pass@1 and seconds, B's pass@1 at A's seconds; and the paired difference."""
    matched = compute_matched(curves[0], curves[1], "train_seconds")
    a, b = methods
    rows = [{"seed": seed, f"{a}_train_seconds": matched["budget"][i], f"{b}_train_seconds": matched["b_total"][i],
             f"{a}_pass@1": matched["a_final"][i], f"{b}_pass@1_at_{a}_seconds": matched["b_at_budget"][i],
             "difference": matched["a_final"][i] - matched["b_at_budget"][i],
             f"{b}_ran_shorter": matched["beyond_b"][i]} for i, seed in enumerate(seeds)]
    return rows, matched


def print_matched(rows: list[dict], matched: dict, curves: list[list[dict]], methods: list[str]) -> None:
    a, b = methods
    steps = ", ".join(str(int(s)) for s in curves[1][0]["step"])
    print(f"\nCompute-matched: {b}'s pass@1 at {a}'s total training seconds, interpolated linearly between {b}'s "
          f"evaluations (steps {steps}); {b} is not rerun with a time budget.\n")
    print(f"| seed | {a} train s | {b} train s | {a} pass@1 | {b} pass@1 at {a}'s s | difference |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        shorter = " (its final: ran shorter)" if row[f"{b}_ran_shorter"] else ""
        print(f"| {row['seed']} | {row[f'{a}_train_seconds']:.0f} | {row[f'{b}_train_seconds']:.0f} "
              f"| {100 * row[f'{a}_pass@1']:.1f} | {100 * row[f'{b}_pass@1_at_{a}_seconds']:.1f}{shorter} "
              f"| {_points(row['difference'])} |")
    d = matched["difference"]
    interval = "n/a (one seed)" if d["ci_low"] is None else f"[{_points(d['ci_low'])}, {_points(d['ci_high'])}]"
    stderr = "n/a" if d["stderr"] is None else f"{100 * d['stderr']:.1f}"
    print(f"\npaired difference {a} - {b} at {a}'s seconds: {_points(d['mean'])} points, stderr {stderr}, "
          f"95% interval {interval} (t, {d['n']} seed{'s' if d['n'] != 1 else ''})")
    print(f"\nOn training seconds at each of {a}'s evaluations, paired by seed ({b} read at {a}'s seconds of the "
          f"same seed, interpolated):\n")
    print(f"| step | {a} train s | {a} pass@1 | {b} pass@1 at those s | difference | 95% interval "
          f"| seeds past {b}'s end |\n|---:|---:|---:|---:|---:|---|---:|")
    for gap in curve_gaps(curves[0], curves[1], "train_seconds"):
        d = gap["difference"]
        stderr = "" if d["stderr"] is None else f" ± {100 * d['stderr']:.1f}"
        interval = "n/a" if d["ci_low"] is None else f"[{_points(d['ci_low'])}, {_points(d['ci_high'])}]"
        print(f"| {gap['step']} | {gap['train_seconds']:.0f} | {100 * gap['a_pass@1']:.1f} | {100 * gap['b_pass@1']:.1f} "
              f"| {_points(d['mean'])}{stderr} | {interval} | {gap['beyond_b']} |")


def single_run_figures(workdir: Path, out: Path) -> None:
    """The figures of one run per method (the layout `compare` without --seeds writes)."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="experiments/out/curves", help="the compare run's --workdir")
    parser.add_argument("--out", default=str(FIGURES))
    parser.add_argument("--methods", default=None, help="the two methods to compare, e.g. optpo_t28,ttrl "
                        "(default: those of the workdir's last compare)")
    args = parser.parse_args(argv)
    workdir, out = Path(args.workdir), Path(args.out)
    seeds, methods = discover(workdir, args.methods.split(",") if args.methods else None)
    if seeds is None:
        single_run_figures(workdir, out)
    curves = load_curves(workdir, methods, seeds)
    seed_names = seeds if seeds is not None else [read_config(workdir / methods[0])["seed"]]
    write_csv(compute_curve_rows(curves, methods), out / "compute_curves.csv")
    print(save_figure(plot_compute_curves(curves, methods), out / "compute_curves.png"))
    rows, matched = matched_rows(curves, methods, seed_names)
    write_csv(rows, out / "compute_matched.csv")
    print_matched(rows, matched, curves, methods)


if __name__ == "__main__":
    main()

"""Pareto plots of the stopping rules on recorded votes: rollouts per question against label quality.

Replays the recorded gpt-4o-mini answers of ../shared/data/vote_samples through
``sprt_update`` (``bench_stopping.replay_rules``) for every rule over a sweep of its
knob: thresholds for ``dirichlet`` and ``beta``, the window for ``esc``, and the budget
for ``fixed`` (the first k votes, TTRL's fixed budget at smaller sizes); thresholds for ``margin``
(p0 0.75) and ``predictive`` (prior 0.3). One figure per
data set: agreement of the early label with the all-votes majority, and its accuracy,
against mean rollouts per question.

    python experiments/plot_stopping.py [--wave-size 4] [--data-dir ../shared/data/vote_samples] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_stopping import replay_rules
from matplotlib.figure import Figure
from vote_replay import DATASETS, DEFAULT_DATA_DIR, load_vote_samples

from optpo_jax.report.plots import save_figure, write_csv

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
THRESHOLDS = (0.8, 0.9, 0.95, 0.99, 0.999)
SWEEP = {
    "dirichlet": [{"threshold": t} for t in THRESHOLDS],
    "beta": [{"threshold": t} for t in THRESHOLDS],
    "esc": [{"esc_window": w} for w in (2, 3, 4, 8, 16)],
    "margin": [{"threshold": t, "margin_p0": 0.75} for t in THRESHOLDS],
    "predictive": [{"threshold": t, "prior": 0.3} for t in (0.8, 0.9, 0.93, 0.95, 0.99)],
    "fixed": [{"max_samples": k} for k in (4, 8, 16, 24, 32, 40)],
}
# Drawn in this order: dirichlet last, on top of beta, which lies almost on it. offset: where each point's knob is written.
STYLE = {
    "fixed": {"color": "tab:orange", "marker": "D", "label": "fixed (TTRL), first k votes", "offset": (4, -9)},
    "esc": {"color": "tab:purple", "marker": "^", "label": "esc (ESC), window", "offset": (4, -9)},
    "beta": {"color": "tab:green", "marker": "s", "label": "beta (Adaptive-Consistency), threshold",
             "offset": (-6, 6), "linestyle": "--", "markerfacecolor": "none"},
    "margin": {"color": "tab:brown", "marker": "v", "label": "margin (paper's SPRT, p0 0.75), threshold",
               "offset": (4, 4)},
    "predictive": {"color": "tab:red", "marker": "*", "label": "predictive (prior 0.3), threshold", "offset": (-6, 6)},
    "dirichlet": {"color": "tab:blue", "marker": "o", "label": "dirichlet (OptPO), threshold", "offset": (4, -10)},
}


def knob_value(setting: str) -> str:
    """'threshold=0.95, prior=0.3' -> '0.95': the first knob's value, written next to each point."""
    return setting.split(",")[0].split("=")[1]


def plot_pareto(rows: list[dict], wave_size: int):
    """Agreement and accuracy against rollouts per question, one line per rule, for one data set."""
    figure = Figure(figsize=(12, 4.4), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True)
    panels = [("agreement", f"label agrees with the {rows[0]['votes']}-vote majority (%)"),
              ("accuracy", "label accuracy against the truth (%)")]
    for rule, style in STYLE.items():
        style = dict(style)
        offset = style.pop("offset")
        points = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["rollouts_per_question"])
        for axis, (key, _) in zip(axes, panels, strict=True):
            x = [r["rollouts_per_question"] for r in points]
            y = [100 * r[key] for r in points]
            axis.plot(x, y, markersize=5, linewidth=1.2, **style)
            for point, xi, yi in zip(points, x, y, strict=True):
                axis.annotate(knob_value(point["setting"]), (xi, yi), textcoords="offset points", xytext=offset,
                              fontsize=6.5, color=style["color"])
    for axis, (_, ylabel) in zip(axes, panels, strict=True):
        # Log scale: the adaptive rules crowd into 5-20 rollouts, the fixed budgets run to 40.
        axis.set_xscale("log", base=2)
        axis.set_xticks([4, 6, 8, 12, 16, 24, 32, 40], ["4", "6", "8", "12", "16", "24", "32", "40"])
        axis.set_xlabel("rollouts per question (mean, log scale)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles[::-1], labels[::-1], fontsize=8, loc="lower right")
    name, questions, votes = rows[0]["data"], rows[0]["questions"], rows[0]["votes"]
    figure.suptitle(f"Stopping rules on recorded gpt-4o-mini votes: {name} ({questions} questions, {votes} votes each, "
                    f"waves of {wave_size}); up and left is better")
    return figure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wave-size", type=int, default=4)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--out", default=str(FIGURES))
    args = parser.parse_args()
    started = time.perf_counter()
    rules = [(rule, knobs) for rule, settings in SWEEP.items() for knobs in settings]
    all_rows = []
    for name in DATASETS:
        rows = replay_rules(load_vote_samples(name, args.data_dir), rules, args.wave_size)
        print(save_figure(plot_pareto(rows, args.wave_size), Path(args.out) / f"stopping_pareto_{name}.png"))
        all_rows += rows
    write_csv(all_rows, Path(args.out) / "stopping_pareto.csv")
    print("| data | rule | setting | rollouts/question | agrees with full vote | accuracy |")
    print("|---|---|---|---:|---:|---:|")
    for row in all_rows:
        print(f"| {row['data']} | {row['rule']} | {row['setting']} | {row['rollouts_per_question']:.2f} "
              f"| {row['agreement']:.2%} | {row['accuracy']:.2%} |")
    print(f"\n({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()

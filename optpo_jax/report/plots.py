"""Figures of training runs: pass@1 curves of a ``compare`` run, against compute over seeds, and rollouts per prompt.

The functions read what ``train.loop.train`` writes (``metrics.jsonl`` and
``config.json`` in a run's workdir; ``plot_compute_curves`` takes the curves that
``report.compare.load_curves`` reads from a multi-seed compare) and return matplotlib ``Figure`` objects built
without pyplot, so they neither need a display nor keep global state; ``save_figure``
writes one as PNG. The experiments/ scripts and colab/quickstart.ipynb share them.
matplotlib is the optional extra ``plots`` (``pip install 'optpo-jax[plots]'``);
importing ``optpo_jax`` does not import it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from optpo_jax.report.seed_stats import AXIS_LABELS, COMPUTE_AXES, evaluation_curve, final_point, mean_curve
from optpo_jax.train.metrics_log import read_metrics
from optpo_jax.train.workdir import read_json

try:
    from matplotlib.figure import Figure
except ImportError as error:  # an optional extra: the library itself never draws
    raise ImportError("optpo_jax.report.plots needs matplotlib: pip install 'optpo-jax[plots]'") from error

METHOD_COLORS = {"optpo": "tab:blue", "ttrl": "tab:orange"}
METHOD_NAMES = {"optpo": "OptPO", "ttrl": "TTRL"}
METHOD_LABELS = {"optpo": "OptPO (Dirichlet stop at 0.95)", "ttrl": "TTRL (fixed 64 votes)"}


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Writes ``figure`` as a PNG at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Writes dict rows as CSV with the first row's keys as the header, floats to 6 decimals; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return path


def read_config(workdir: str | Path) -> dict:
    """The config a run was started with (``workdir/config.json``; a cut file is a WorkdirError naming it)."""
    return read_json(Path(workdir) / "config.json", "put back the run's config.json, or train the run again")


def training_curve(workdir: str | Path) -> list[dict]:
    """pass@1 at every evaluation of one run, with the training spent up to it, as rows.

    One row per evaluation (before training, every ``eval.every_steps`` steps, after) of
    ``seed_stats.evaluation_curve``: method, step, cumulative rollouts, cumulative training
    seconds (evaluation excluded), pass@1 and its standard error over prompts, and the
    samples per prompt it was averaged over.
    """
    config = read_config(workdir)
    curve = evaluation_curve(read_metrics(workdir))
    rows = []
    for index, step in enumerate(curve["step"].astype(int)):
        # Before and after use final_samples per prompt; evaluations during training use eval.samples.
        during = step not in (0, config["steps"])
        rows.append({
            "method": config["method"], "step": int(step), "rollouts": int(curve["rollouts"][index]),
            "train_seconds": round(float(curve["train_seconds"][index]), 2),
            "pass@1": float(curve["pass@1"][index]), "pass@1_stderr": float(curve["pass@1_stderr"][index]),
            "eval_samples": config["eval"]["samples" if during else "final_samples"],
        })
    return rows


def plot_training_curves(compare_dir: str | Path, methods: tuple[str, ...] = ("optpo", "ttrl")) -> Figure:
    """pass@1 against steps, rollouts and training wall-clock for each method of a ``compare`` run.

    ``compare_dir`` holds one workdir per method (``compare_dir/optpo``, ``compare_dir/ttrl``).
    The band is +- one standard error over prompts.
    """
    figure = Figure(figsize=(13, 3.9), layout="constrained")
    axes = figure.subplots(1, 3, sharey=True)
    x_axes = [("step", "training step"), ("rollouts", "rollouts drawn (cumulative)"),
              ("train_seconds", "training wall-clock, evaluation excluded (s)")]
    samples = set()
    for method in methods:
        curve = training_curve(Path(compare_dir) / method)
        samples.update(row["eval_samples"] for row in curve)
        pass_at_1 = 100 * np.array([row["pass@1"] for row in curve])
        stderr = 100 * np.array([row["pass@1_stderr"] for row in curve])
        label = f"{METHOD_LABELS.get(method, method)}: {curve[-1]['rollouts']:,} rollouts"
        for axis, (key, _) in zip(axes, x_axes, strict=True):
            x = np.array([row[key] for row in curve])
            color = METHOD_COLORS.get(method)
            axis.plot(x, pass_at_1, marker="o", markersize=4, color=color, label=label)
            axis.fill_between(x, pass_at_1 - stderr, pass_at_1 + stderr, color=color, alpha=0.15)
    for axis, (_, xlabel) in zip(axes, x_axes, strict=True):
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("pass@1 on the test prompts (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    counts = "/".join(str(k) for k in sorted(samples))
    figure.suptitle(f"Test-time RL on the embedded arithmetic task: pass@1 (avg@{counts} samples per prompt, "
                    "band = ± 1 standard error)")
    return figure


def rollouts_histogram(workdir: str | Path) -> np.ndarray:
    """[n + 1] int64: how many (step, prompt) pairs of a run drew exactly n rollouts."""
    histograms = [record["rollouts_per_prompt_histogram"] for record in read_metrics(workdir)
                  if "rollouts_per_prompt_histogram" in record]
    total = np.zeros(max(len(h) for h in histograms), np.int64)
    for histogram in histograms:
        total[: len(histogram)] += histogram
    return total


def plot_rollouts_histogram(workdir: str | Path) -> Figure:
    """Histogram of rollouts per prompt over every training step of one run, with its mean and budget."""
    counts = rollouts_histogram(workdir)
    config = read_config(workdir)
    budget = config["sprt"]["max_samples"]
    rollouts = np.arange(len(counts))
    mean = float((rollouts * counts).sum() / counts.sum())
    figure = Figure(figsize=(7, 3.9), layout="constrained")
    axis = figure.subplots()
    axis.bar(rollouts, counts, width=0.9, color=METHOD_COLORS.get(config["method"], "tab:blue"),
             label=f"{METHOD_LABELS.get(config['method'], config['method'])}, {counts.sum():,} prompt-steps")
    axis.axvline(mean, color="black", linestyle="--", label=f"mean: {mean:.1f} rollouts per prompt")
    axis.axvline(budget, color="tab:red", linestyle=":", label=f"budget (TTRL draws all): {budget}")
    axis.set_xlabel("rollouts drawn for a prompt in a training step")
    axis.set_ylabel("prompt-steps (count)")
    axis.set_xlim(-0.5, budget + 2)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    axis.set_title(f"Rollouts per prompt under {METHOD_NAMES.get(config['method'], config['method'])} on the embedded task "
                   f"({config['steps']} steps x {config['prompts_per_step']} prompts)")
    return figure


def compute_curve_rows(curves: list[list[dict]], methods: list[str], axes: tuple[str, ...] = tuple(COMPUTE_AXES)) -> list[dict]:
    """The mean curves of ``plot_compute_curves`` as rows: method, axis, x, mean pass@1, its stderr over seeds, seeds.

    ``curves[m][s]``: ``seed_stats.evaluation_curve`` of seed s of ``methods[m]``. The mean is
    over seeds on a grid every seed covers (``seed_stats.mean_curve``); stderr is empty with one seed.
    """
    rows = []
    for method, method_curves in zip(methods, curves, strict=True):
        for axis in axes:
            mean = mean_curve(method_curves, axis)
            for index, x in enumerate(mean["grid"]):
                stderr = "" if mean["stderr"] is None else float(mean["stderr"][index])
                rows.append({"method": method, "axis": axis, "x": float(x), "pass@1": float(mean["mean"][index]),
                             "pass@1_stderr_over_seeds": stderr, "seeds": mean["n"]})
    return rows


def plot_compute_curves(curves: list[list[dict]], methods: list[str], axes: tuple[str, ...] = tuple(COMPUTE_AXES)) -> Figure:
    """pass@1 against each compute axis (one panel each), every method on every panel, mean over seeds.

    ``curves[m][s]``: ``seed_stats.evaluation_curve`` of seed s of ``methods[m]``
    (``report.compare.load_curves`` reads them from a compare workdir). Per method: each
    seed's curve (thin), the mean over seeds on the range every seed covers (seeds' x values
    differ, so each curve is interpolated linearly between its evaluations onto a common grid
    first) with a +- 1 standard error band over seeds, and the seeds' final point (mean, with
    +- 1 stderr bars in x and y).
    """
    columns = min(len(axes), 2)
    rows = -(-len(axes) // columns)
    figure = Figure(figsize=(6.2 * columns, 4.2 * rows), layout="constrained")
    panels = np.atleast_1d(figure.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    seeds = {len(method_curves) for method_curves in curves}
    for method, method_curves in zip(methods, curves, strict=True):
        color = METHOD_COLORS.get(method)
        for panel, axis in zip(panels, axes, strict=False):
            for curve in method_curves:
                panel.plot(curve[axis], 100 * curve["pass@1"], color=color, alpha=0.25, linewidth=0.8)
            mean, end = mean_curve(method_curves, axis), final_point(method_curves, axis)
            label = f"{METHOD_LABELS.get(method, method)}, {len(method_curves)} seeds"
            panel.plot(mean["grid"], 100 * mean["mean"], color=color, linewidth=2, label=label)
            if mean["stderr"] is not None:
                panel.fill_between(mean["grid"], 100 * (mean["mean"] - mean["stderr"]),
                                   100 * (mean["mean"] + mean["stderr"]), color=color, alpha=0.2)
            panel.errorbar(end["x"]["mean"], 100 * end["pass@1"]["mean"], xerr=end["x"]["stderr"],
                           yerr=None if end["pass@1"]["stderr"] is None else 100 * end["pass@1"]["stderr"],
                           color=color, marker="o", markersize=5, capsize=3)
    for panel, axis in zip(panels, axes, strict=False):
        panel.set_xlabel(AXIS_LABELS[axis])
        panel.grid(alpha=0.3)
    for panel in panels[len(axes):]:
        panel.set_visible(False)
    for panel in panels[::columns]:
        panel.set_ylabel("pass@1 on the test prompts (%)")
    panels[0].legend(loc="lower right", fontsize=8)
    count = "/".join(str(n) for n in sorted(seeds))
    figure.suptitle(f"pass@1 against compute, mean over {count} seeds (band: ± 1 standard error over seeds; "
                    "thin: each seed; dot: final)")
    return figure

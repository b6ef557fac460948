"""Statistics of runs over training seeds: paired differences, curves on compute axes, compute-matched values.

Pure numpy / scipy over what ``train.loop.train`` writes into a run's workdir
(``metrics.jsonl``, ``summary.json``, ``final_eval.json``); ``report.compare`` runs the
seeds and ``report.plots`` draws the curves. Nothing here imports matplotlib or jax.

Pairing. Seed s of method A and seed s of method B share the seed (data order, the
sampling and update keys, the evaluation keys), the initial policy and the test prompts,
so their difference removes what the seed does to both; the statistics below are
those of the per-seed differences A - B (a paired t test and its interval).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

# The compute axes of the curves, in the order they are drawn: axis -> (running total in metrics.jsonl,
# per-step count it sums).
COMPUTE_AXES = {
    "rollouts": ("total_rollouts", "rollouts"),
    "generated_tokens": ("total_generated_tokens", "generated_tokens"),
    "trained_tokens": ("total_trained_tokens", "trained_tokens"),
    "train_seconds": ("train_seconds", None),
}
AXIS_LABELS = {
    "step": "training step",
    "rollouts": "rollouts drawn (cumulative)",
    "generated_tokens": "generated tokens (cumulative)",
    "trained_tokens": "trained tokens (cumulative)",
    "train_seconds": "training wall-clock, evaluation excluded (s)",
}


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def mean_stderr(values) -> dict:
    """n, mean and standard error of the mean (sample std with ddof=1 over sqrt n; None below 2 values)."""
    values = np.asarray(values, np.float64)
    n = len(values)
    stderr = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return {"n": n, "mean": float(values.mean()) if n else None, "stderr": stderr}


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """The paired difference ``a - b``: its mean, standard error and a t interval with n - 1 degrees of freedom.

    Args:
      a, b: [n] paired values (the same seed, or the same prompt, at the same index).
      confidence: of the two-sided interval.

    Returns a dict: n, mean, stderr, dof, ci_low, ci_high (the ``confidence`` interval
    ``mean +- t_{(1+confidence)/2, n-1} * stderr``), t and p_value (two-sided, the paired
    t test, as ``scipy.stats.ttest_rel(a, b)``), and the differences themselves. Below two
    pairs the spread is unknown: stderr, the interval, t and p are None. With no spread at
    all (every difference equal) the interval is the mean and t, p are None.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two [n] arrays of one length, got shapes {a.shape} and {b.shape}")
    differences = a - b
    result = {**mean_stderr(differences), "dof": len(differences) - 1, "ci_low": None, "ci_high": None,
              "t": None, "p_value": None, "confidence": confidence, "differences": differences.tolist()}
    stderr = result["stderr"]
    if stderr is None:
        return result
    if stderr == 0:
        return {**result, "ci_low": result["mean"], "ci_high": result["mean"]}
    half_width = stats.t.ppf((1 + confidence) / 2, result["dof"]) * stderr
    t = result["mean"] / stderr
    return {**result, "ci_low": result["mean"] - half_width, "ci_high": result["mean"] + half_width, "t": t,
            "p_value": float(2 * stats.t.sf(abs(t), result["dof"]))}


def pooled_prompt_difference(per_seed_a: list, per_seed_b: list, confidence: float = 0.95) -> dict:
    """The paired difference ``a - b`` of per-prompt values, pooled over seeds (n = seeds x prompts).

    ``per_seed_a[s]`` and ``per_seed_b[s]``: [P] per-prompt values (e.g. each prompt's
    pass@1) of seed s, the same prompts in the same order. Every (seed, prompt) difference
    counts as one observation. Caution: the prompts of one seed are not independent of that
    seed's training (one policy, trained once, answers all of them), so the seed-to-seed
    spread is missing from this standard error: its interval is narrower than it should be.
    The per-seed difference (``paired_difference`` of the seeds' means) is the primary one;
    this one says how much of the per-prompt noise the evaluation itself adds.
    """
    if len(per_seed_a) != len(per_seed_b):
        raise ValueError(f"{len(per_seed_a)} seeds against {len(per_seed_b)}")
    a = np.concatenate([np.asarray(x, np.float64) for x in per_seed_a]) if per_seed_a else np.zeros(0)
    b = np.concatenate([np.asarray(x, np.float64) for x in per_seed_b]) if per_seed_b else np.zeros(0)
    return paired_difference(a, b, confidence)


def read_run(run_dir: str | Path) -> dict:
    """A finished run's files: ``config`` (config.json), ``summary``, ``final_eval`` (None when absent) and
    ``curve`` (``evaluation_curve`` of its metrics.jsonl).

    A file cut by an interrupted write is a WorkdirError naming it and what to do, except the last
    line of metrics.jsonl, which is left out with a warning (its curve then ends one point early).
    """
    from optpo_jax.train.metrics_log import read_metrics  # here: this module imports no jax
    from optpo_jax.train.workdir import read_json

    run_dir = Path(run_dir)
    again = (f"resume the run ({run_dir}) with `train --resume` or `compare --resume` to write it again, "
             "or start it again with --overwrite")
    config = read_json(run_dir / "config.json", "put back the run's config.json, or start the run again with "
                                                "--overwrite")
    records = read_metrics(run_dir)
    final_eval = run_dir / "final_eval.json"
    return {"dir": str(run_dir), "config": config, "summary": read_json(run_dir / "summary.json", again),
            "final_eval": read_json(final_eval, again) if final_eval.exists() else None,
            "curve": evaluation_curve(records)}


def evaluation_curve(records: list[dict]) -> dict:
    """pass@1 at every evaluation of one run, with the compute spent up to it.

    ``records``: the lines of a run's metrics.jsonl. Returns [E] arrays over the E
    evaluations (before training at step 0, every ``eval.every_steps`` steps, after):
    ``step``, ``pass@1``, ``pass@1_stderr`` (over prompts) and one per ``COMPUTE_AXES`` entry:
    the running total at that evaluation (0 before training). Runs written before a
    running total existed fall back to summing the per-step count (NaN where neither exists).
    Mid-run evaluations use ``eval.samples`` per prompt, before and after ``eval.final_samples``.
    """
    totals = dict.fromkeys(COMPUTE_AXES, 0.0)
    points = []
    for record in records:
        if "rollouts" in record:  # a training step's metrics
            for axis, (total, per_step) in COMPUTE_AXES.items():
                totals[axis] = record[total] if total in record else totals[axis] + record.get(per_step, math.nan)
        for prefix in ("eval/", "final/"):
            if f"{prefix}pass@1" in record:
                points.append({"step": record["step"], "pass@1": record[f"{prefix}pass@1"],
                               "pass@1_stderr": record.get(f"{prefix}pass@1_stderr", math.nan), **totals})
    return {key: np.array([point[key] for point in points], np.float64) for key in
            ("step", "pass@1", "pass@1_stderr", *COMPUTE_AXES)}


def value_at(curve: dict, axis: str, x: float) -> tuple[float, bool]:
    """pass@1 of ``curve`` at ``x`` on ``axis``, linearly interpolated between its evaluations.

    Returns (value, beyond): past the run's last evaluation there is nothing to
    interpolate, so the value is the run's final pass@1 and ``beyond`` is True.
    """
    xs, ys = curve[axis], curve["pass@1"]
    return float(np.interp(x, xs, ys)), bool(x > xs[-1])


def mean_curve(curves: list[dict], axis: str) -> dict:
    """Mean pass@1 over seeds against ``axis``, the seeds' curves interpolated onto a common grid.

    Seeds reach different totals on every compute axis, so each seed's curve (linear
    between its evaluations) is read at every x where any seed was evaluated, within the
    range that every seed covers (from the largest first x to the smallest last x): the
    mean is exact there, with no extrapolation. Returns [G] arrays ``grid``, ``mean`` and
    ``stderr`` (over seeds, ddof=1; None with one seed), [S, G] ``values`` (each seed on
    the grid) and ``n`` (seeds). The curves' final points beyond the common range are in
    ``final_point``.
    """
    start = max(float(c[axis][0]) for c in curves)
    end = min(float(c[axis][-1]) for c in curves)
    xs = np.concatenate([c[axis] for c in curves])
    grid = np.union1d(xs[(xs >= start) & (xs <= end)], [start, end])
    values = np.stack([np.interp(grid, c[axis], c["pass@1"]) for c in curves])
    stderr = values.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else None
    return {"grid": grid, "mean": values.mean(axis=0), "stderr": stderr, "n": len(curves), "values": values}


def final_point(curves: list[dict], axis: str) -> dict:
    """The seeds' final evaluation: mean and stderr over seeds of ``axis``'s total and of pass@1."""
    return {"x": mean_stderr([c[axis][-1] for c in curves]), "pass@1": mean_stderr([c["pass@1"][-1] for c in curves])}


def compute_matched(curves_a: list[dict], curves_b: list[dict], axis: str = "train_seconds",
                    confidence: float = 0.95) -> dict:
    """Method B at method A's total compute: B's pass@1 interpolated at A's final ``axis`` total, per seed.

    ``curves_a[s]``, ``curves_b[s]``: the ``evaluation_curve`` of seed s of each method.
    B is not rerun with A's budget: its pass@1 at A's budget is read off its own evaluated
    points (before training, every ``eval.every_steps`` steps, final), linearly between
    them. Where A spent more than B's whole run, B's final value stands in and
    ``beyond_b`` is True for that seed (then B had less compute, not the same).

    Returns per-seed lists ``budget`` (A's total), ``b_total``, ``a_final``, ``b_at_budget``,
    ``beyond_b``, and ``difference``: ``paired_difference(a_final, b_at_budget)``.
    """
    if len(curves_a) != len(curves_b):
        raise ValueError(f"{len(curves_a)} seeds against {len(curves_b)}")
    budget = [float(c[axis][-1]) for c in curves_a]
    read = [value_at(curve, axis, x) for curve, x in zip(curves_b, budget, strict=True)]
    a_final = [float(c["pass@1"][-1]) for c in curves_a]
    b_at = [value for value, _ in read]
    return {"axis": axis, "budget": budget, "b_total": [float(c[axis][-1]) for c in curves_b], "a_final": a_final,
            "b_at_budget": b_at, "beyond_b": [beyond for _, beyond in read],
            "difference": paired_difference(a_final, b_at, confidence)}


def curve_gaps(curves_a: list[dict], curves_b: list[dict], axis: str = "train_seconds") -> list[dict]:
    """A against B at each of A's evaluations on ``axis``, paired by seed.

    For every evaluation step of A (the same steps in every seed) and every seed s: A_s's
    pass@1 there minus B_s's pass@1 at A_s's total on ``axis`` at that step (``value_at``:
    linear between B_s's evaluations; B_s's final value where A_s is past the end of B_s's
    run, counted in ``beyond_b``). Rows: step, A's mean total on ``axis`` there, A's and
    B's mean pass@1 (B's read at A's totals), ``difference`` (``paired_difference`` over
    seeds) and ``beyond_b``. At A's last evaluation this is ``compute_matched``.
    """
    if len({len(c["step"]) for c in curves_a}) != 1 or len(curves_a) != len(curves_b):
        raise ValueError("pairing needs the same seeds for both methods, each evaluated at the same steps")
    rows = []
    for index, step in enumerate(curves_a[0]["step"]):
        xs = [float(c[axis][index]) for c in curves_a]
        a_values = [float(c["pass@1"][index]) for c in curves_a]
        read = [value_at(curve, axis, x) for curve, x in zip(curves_b, xs, strict=True)]
        b_values = [value for value, _ in read]
        rows.append({"step": int(step), axis: float(np.mean(xs)), "a_pass@1": float(np.mean(a_values)),
                     "b_pass@1": float(np.mean(b_values)), "difference": paired_difference(a_values, b_values),
                     "beyond_b": sum(beyond for _, beyond in read)})
    return rows


def json_ready(value):
    """``value`` with numpy arrays and scalars as lists and numbers, and NaN / inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _finite_or_none(float(value))
    return value

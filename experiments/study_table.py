"""The table of a multi-method study in one compare workdir: every method against two baselines, paired by seed.

    python experiments/study_table.py --workdir experiments/out/study --baselines ttrl,optpo

For each method folder present in every ``seed{s}/`` (those seeds only): final pass@1 (mean
± stderr over seeds), the paired difference to each baseline with its 95% t interval, the
per-seed standard deviation of that difference (what sets how many seeds a study needs:
half-width = t(0.975, n-1) * sd / sqrt(n)), and rollouts and trained tokens per seed as
ratios to the first baseline. ``optpo-jax compare`` reports one pair at a time with every
detail; this is the overview of many.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from optpo_jax.report.seed_stats import mean_stderr, paired_difference


def study_runs(workdir: Path) -> tuple[list[int], dict[str, list[dict]]]:
    """(seeds, method -> [summary per seed]) over the seeds where every listed method has finished."""
    folders = {int(p.name[4:]): p for p in workdir.glob("seed*") if p.name[4:].isdigit()}
    methods = sorted({run.name for folder in folders.values() for run in folder.iterdir()
                      if (run / "summary.json").exists()})
    runs = {}
    for method in methods:
        seeds = sorted(s for s, folder in folders.items() if (folder / method / "summary.json").exists())
        runs[method] = {s: json.loads((folders[s] / method / "summary.json").read_text()) for s in seeds}
    return sorted(folders), runs


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _paired_cell(a: dict, b: dict) -> tuple[str, str]:
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return "n/a", "n/a"
    diff = paired_difference([a[s]["after"]["pass@1"] for s in seeds], [b[s]["after"]["pass@1"] for s in seeds])
    sd = diff["stderr"] * math.sqrt(diff["n"])
    return (f"{_points(diff['mean'])} [{_points(diff['ci_low'])}, {_points(diff['ci_high'])}] (n {diff['n']})",
            f"{100 * sd:.1f}")


def _ratio(runs: dict, baseline: dict, key: str) -> float:
    """Mean over the common seeds of ``runs[s][key] / baseline[s][key]``."""
    common = sorted(set(runs) & set(baseline))
    return float(np.mean([runs[s][key] / baseline[s][key] for s in common])) if common else math.nan


def study_table(workdir: Path, baselines: list[str]) -> str:
    """The markdown table (see the module docstring)."""
    _, runs = study_runs(workdir)
    missing = [b for b in baselines if b not in runs]
    if missing:
        raise SystemExit(f"{workdir} has no finished runs of {missing}; methods there: {sorted(runs)}")
    first = runs[baselines[0]]
    header = ["method", "seeds", "pass@1 after"]
    for baseline in baselines:
        header += [f"- {baseline} [95%]", f"sd of - {baseline}"]
    header += [f"rollouts / {baselines[0]}", f"trained tokens / {baselines[0]}", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method, by_seed in runs.items():
        finals = mean_stderr([r["after"]["pass@1"] for r in by_seed.values()])
        cells = [method, str(len(by_seed)), f"{100 * finals['mean']:.1f} ± {100 * (finals['stderr'] or 0):.1f}"]
        for baseline in baselines:
            cells += list(_paired_cell(by_seed, runs[baseline])) if method != baseline else ["", ""]
        steps = sorted({r["steps"] for r in by_seed.values()})
        cells += [f"{_ratio(by_seed, first, 'total_rollouts'):.2f}", f"{_ratio(by_seed, first, 'total_trained_tokens'):.2f}",
                  f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = stats.t.ppf(0.975, 9)
    lines.append(f"\nhalf-width of a 95% interval over n seed pairs = t(0.975, n-1) x sd / sqrt(n); "
                 f"at n = 10: {t / math.sqrt(10):.3f} x sd")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--baselines", default="ttrl,optpo", help="comma-separated methods to pair every method with")
    args = parser.parse_args()
    print(study_table(args.workdir, args.baselines.split(",")))


if __name__ == "__main__":
    main()

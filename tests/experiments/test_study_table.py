"""experiments/study_table.py: the overview table of a study's methods, paired by seed."""

import json

import numpy as np
import pytest
from scipy import stats

from tests.experiments.scripts import experiment_module


@pytest.fixture
def study_table():
    yield from experiment_module("study_table")


def _write_run(workdir, seed, method, pass_at_1, rollouts, steps=8):
    run = workdir / f"seed{seed}" / method
    run.mkdir(parents=True)
    summary = {"after": {"pass@1": pass_at_1}, "total_rollouts": rollouts, "total_trained_tokens": rollouts * 10,
               "steps": steps}
    (run / "summary.json").write_text(json.dumps(summary))


def test_the_table_pairs_every_method_with_each_baseline_by_seed(study_table, tmp_path):
    """Reference: scipy's paired t interval (``ttest_rel`` / ``t.ppf``) on the same per-seed values; a method
    that misses a seed is paired on the seeds it has."""
    ttrl = [0.70, 0.72, 0.75, 0.69]
    optpo = [0.68, 0.71, 0.71, 0.70]
    variant = [0.72, 0.70, 0.74]  # seed 3 not finished
    for seed in range(4):
        _write_run(tmp_path, seed, "ttrl", ttrl[seed], 1000)
        _write_run(tmp_path, seed, "optpo", optpo[seed], 300 + seed)
        if seed < 3:
            _write_run(tmp_path, seed, "optpo_v", variant[seed], 400, steps=12 + seed)
    table = study_table.study_table(tmp_path, ["ttrl", "optpo"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    differences = np.subtract(optpo, ttrl)
    half = stats.t.ppf(0.975, 3) * differences.std(ddof=1) / 2
    mean = differences.mean()
    assert rows["optpo"][3] == (f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] (n 4)")
    assert rows["optpo"][4] == f"{100 * differences.std(ddof=1):.1f}"
    assert rows["optpo"][7] == f"{np.mean([(300 + s) / 1000 for s in range(4)]):.2f}"
    assert rows["optpo_v"][1] == "3" and rows["optpo_v"][3].endswith("(n 3)") and rows["optpo_v"][9] == "12-14 |"
    against_optpo = np.subtract(variant, optpo[:3])
    assert rows["optpo_v"][5].startswith(f"{100 * against_optpo.mean():+.1f} [")
    with pytest.raises(SystemExit, match="no finished runs of \\['ppo'\\]"):
        study_table.study_table(tmp_path, ["ppo"])

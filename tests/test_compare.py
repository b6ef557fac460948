"""Multi-seed comparisons: paired statistics against scipy, curves on compute axes, the compute-matched row,
and `compare_methods` end to end on two seeds of a tiny config (including resume)."""

import json

import numpy as np
import pytest
from scipy import stats
from test_loop import tiny_config

from optpo_jax.train import seed_stats
from optpo_jax.train.compare import compare_methods, run_action
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.workdir import WorkdirError

# The three seeds (final pass@1, %): OptPO and TTRL.
OPTPO = [69.9, 71.5, 78.7]
TTRL = [71.5, 82.1, 82.1]


def test_paired_difference_matches_scipy():
    result = seed_stats.paired_difference(OPTPO, TTRL)
    test = stats.ttest_rel(OPTPO, TTRL)
    differences = np.subtract(OPTPO, TTRL)
    assert result["n"] == 3 and result["dof"] == 2
    np.testing.assert_allclose(result["differences"], differences)
    np.testing.assert_allclose(result["mean"], -5.2, atol=1e-12)
    np.testing.assert_allclose(result["stderr"], stats.sem(differences), rtol=1e-12)
    np.testing.assert_allclose(result["t"], test.statistic, rtol=1e-12)
    np.testing.assert_allclose(result["p_value"], test.pvalue, rtol=1e-10)
    interval = stats.t.interval(0.95, 2, loc=differences.mean(), scale=stats.sem(differences))
    np.testing.assert_allclose([result["ci_low"], result["ci_high"]], interval, rtol=1e-12)
    np.testing.assert_allclose([result["ci_low"], result["ci_high"]], test.confidence_interval(0.95), rtol=1e-12)
    np.testing.assert_allclose([result["ci_low"], result["ci_high"]], [-17.03, 6.63], atol=0.01)  # by hand
    ninety = seed_stats.paired_difference(OPTPO, TTRL, confidence=0.9)
    np.testing.assert_allclose([ninety["ci_low"], ninety["ci_high"]], test.confidence_interval(0.9), rtol=1e-12)


def test_paired_difference_edge_cases():
    one = seed_stats.paired_difference([0.7], [0.6])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1)
    assert one["stderr"] is one["ci_low"] is one["t"] is one["p_value"] is None
    constant = seed_stats.paired_difference([1.0, 3.0], [0.5, 2.5])
    assert constant["stderr"] == 0 and constant["ci_low"] == constant["ci_high"] == 0.5
    with pytest.raises(ValueError, match="paired"):
        seed_stats.paired_difference([1, 2], [1, 2, 3])
    mean = seed_stats.mean_stderr([3.0, 5.0, 10.0])
    assert mean["mean"] == pytest.approx(6.0) and mean["stderr"] == pytest.approx(stats.sem([3.0, 5.0, 10.0]))


def test_pooled_prompt_difference_pools_every_seed_and_prompt():
    rng = np.random.default_rng(0)
    a = [rng.uniform(size=5), rng.uniform(size=5)]
    b = [rng.uniform(size=5), rng.uniform(size=5)]
    pooled = seed_stats.pooled_prompt_difference(a, b)
    flat_a, flat_b = np.concatenate(a), np.concatenate(b)
    test = stats.ttest_rel(flat_a, flat_b)
    assert pooled["n"] == 10 and pooled["dof"] == 9
    np.testing.assert_allclose(pooled["mean"], (flat_a - flat_b).mean(), rtol=1e-12)
    np.testing.assert_allclose(pooled["p_value"], test.pvalue, rtol=1e-10)
    np.testing.assert_allclose([pooled["ci_low"], pooled["ci_high"]], test.confidence_interval(0.95), rtol=1e-12)


def metrics_records(evaluations: dict, steps: int, per_step: dict) -> list[dict]:
    """metrics.jsonl lines: step records with running totals (``per_step[name]`` per step), pass@1 at
    ``evaluations`` (step -> pass@1; step 0 before, ``steps`` the final evaluation)."""
    records = [{"step": 0, "eval/pass@1": evaluations[0], "eval/pass@1_stderr": 0.01}]
    totals = dict.fromkeys(per_step, 0.0)
    names = {"rollouts": "total_rollouts", "generated_tokens": "total_generated_tokens",
             "trained_tokens": "total_trained_tokens", "seconds": "train_seconds"}
    for step in range(1, steps + 1):
        record = {"step": step, "rollouts": per_step["rollouts"]}
        for name, value in per_step.items():
            totals[name] += value
            record[names[name]] = totals[name]
        if step in evaluations and step < steps:
            record.update({"eval/pass@1": evaluations[step], "eval/pass@1_stderr": 0.02})
        records.append(record)
    records.append({"step": steps, "final/pass@1": evaluations[steps], "final/pass@1_stderr": 0.01})
    return records


def curve(evaluations, steps=4, seconds=5.0, rollouts=100):
    per_step = {"rollouts": rollouts, "generated_tokens": 10 * rollouts, "trained_tokens": 5 * rollouts,
                "seconds": seconds}
    return seed_stats.evaluation_curve(metrics_records(evaluations, steps, per_step))


def test_evaluation_curve_reads_totals_at_every_evaluation():
    result = curve({0: 0.5, 2: 0.6, 4: 0.7}, seconds=5.0)
    np.testing.assert_array_equal(result["step"], [0, 2, 4])
    np.testing.assert_allclose(result["pass@1"], [0.5, 0.6, 0.7])
    np.testing.assert_allclose(result["train_seconds"], [0, 10, 20])
    np.testing.assert_allclose(result["rollouts"], [0, 200, 400])
    np.testing.assert_allclose(result["generated_tokens"], [0, 2000, 4000])
    np.testing.assert_allclose(result["trained_tokens"], [0, 1000, 2000])
    # Older runs wrote no token totals: the per-step counts are summed instead (NaN where there are none).
    old = [{k: v for k, v in r.items() if not k.startswith("total_") or k == "total_rollouts"}
           for r in metrics_records({0: 0.5, 4: 0.7}, 4, {"rollouts": 100, "seconds": 5.0})]
    for record in old[1:-1]:
        record["generated_tokens"] = 7
    legacy = seed_stats.evaluation_curve(old)
    np.testing.assert_allclose(legacy["generated_tokens"], [0, 28])
    assert np.isnan(legacy["trained_tokens"][-1])


def test_mean_curve_interpolates_seeds_onto_a_common_grid():
    # Seed 0 evaluated at 0, 10, 20 s; seed 1 at 0, 15, 30 s: the common range is [0, 20].
    seeds = [curve({0: 0.5, 2: 0.6, 4: 0.8}, seconds=5.0), curve({0: 0.5, 2: 0.7, 4: 0.9}, seconds=7.5)]
    mean = seed_stats.mean_curve(seeds, "train_seconds")
    np.testing.assert_allclose(mean["grid"], [0, 10, 15, 20])
    seed0 = np.array([0.5, 0.6, 0.7, 0.8])
    seed1 = np.array([0.5, 0.5 + 0.2 * 10 / 15, 0.7, 0.7 + 0.2 * 5 / 15])
    np.testing.assert_allclose(mean["values"], [seed0, seed1])
    np.testing.assert_allclose(mean["mean"], (seed0 + seed1) / 2)
    np.testing.assert_allclose(mean["stderr"], np.abs(seed0 - seed1) / 2)  # two values: std(ddof=1)/sqrt(2)
    alone = seed_stats.mean_curve(seeds[:1], "train_seconds")
    assert alone["stderr"] is None and alone["n"] == 1
    end = seed_stats.final_point(seeds, "train_seconds")
    assert end["x"]["mean"] == pytest.approx(25) and end["pass@1"]["mean"] == pytest.approx(0.85)


def test_compute_matched_reads_ttrl_at_optpo_seconds():
    # TTRL: 0.5 at 0 s, 0.6 at 10 s, 0.8 at 20 s in both seeds.
    ttrl = [curve({0: 0.5, 2: 0.6, 4: 0.8}, seconds=5.0)] * 2
    # OptPO seed 0 ends at 15 s with 0.75 (TTRL there: 0.7); seed 1 at 24 s with 0.78, past TTRL's run.
    optpo = [curve({0: 0.5, 4: 0.75}, seconds=3.75), curve({0: 0.5, 4: 0.78}, seconds=6.0)]
    matched = seed_stats.compute_matched(optpo, ttrl, "train_seconds")
    np.testing.assert_allclose(matched["budget"], [15, 24])
    np.testing.assert_allclose(matched["b_at_budget"], [0.7, 0.8])
    assert matched["beyond_b"] == [False, True]
    difference = matched["difference"]
    np.testing.assert_allclose(difference["differences"], [0.05, -0.02], atol=1e-12)
    test = stats.ttest_rel([0.75, 0.78], [0.7, 0.8])
    np.testing.assert_allclose([difference["ci_low"], difference["ci_high"]], test.confidence_interval(), rtol=1e-9)
    gaps = seed_stats.curve_gaps(optpo, ttrl, "train_seconds")
    assert [g["step"] for g in gaps] == [0, 4] and [g["beyond_b"] for g in gaps] == [0, 1]
    assert gaps[0]["difference"]["mean"] == 0
    assert gaps[1]["train_seconds"] == pytest.approx(19.5) and gaps[1]["b_pass@1"] == pytest.approx(0.75)
    assert gaps[1]["difference"] == difference  # the last evaluation is the compute-matched row
    # On rollouts (both at 100 a step) the budgets are TTRL's own totals.
    assert seed_stats.compute_matched(optpo, ttrl, "rollouts")["b_at_budget"] == pytest.approx([0.8, 0.8])


def tiny(method, **overrides):
    config = tiny_config(method, **{"steps": 1, **overrides})
    if "row_buckets" in config.policy_update:  # one update shape, so one compilation per run
        config.policy_update.update(width_bucket=0, row_buckets=1)
    return config


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    report = compare_methods([tiny("optpo"), tiny("ttrl")], workdir, seeds=[0, 1], progress=False)
    return workdir, report


def test_compare_runs_every_seed_and_reports_paired_statistics(two_seeds):
    workdir, report = two_seeds
    assert set(report["actions"].values()) == {"start"}
    for seed in (0, 1):
        for method in ("optpo", "ttrl"):
            run = workdir / f"seed{seed}" / method
            assert json.loads((run / "config.json").read_text())["seed"] == seed
            final = json.loads((run / "final_eval.json").read_text())
            assert len(final["per_prompt_pass@1"]) == 8 and final["samples"] == 4
    saved = json.loads((workdir / "comparison.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["methods"] == ["optpo", "ttrl"]
    assert (workdir / "comparison.md").read_text().strip() == report["markdown"]
    runs = [[json.loads((workdir / f"seed{s}" / m / "summary.json").read_text()) for s in (0, 1)]
            for m in ("optpo", "ttrl")]
    optpo_pass = [r["after"]["pass@1"] for r in runs[0]]
    ttrl_pass = [r["after"]["pass@1"] for r in runs[1]]
    stats_optpo = report["per_method"]["optpo"]
    assert stats_optpo["pass@1"]["mean"] == pytest.approx(np.mean(optpo_pass))
    assert stats_optpo["pass@1"]["stderr"] == pytest.approx(stats.sem(optpo_pass))
    assert stats_optpo["trained_tokens"]["values"] == [r["total_trained_tokens"] for r in runs[0]]
    assert report["per_method"]["ttrl"]["rollouts"]["values"] == [4 * 8] * 2  # 1 step x 4 prompts x 8 votes
    paired = report["paired"]["pass@1"]
    np.testing.assert_allclose(paired["differences"], np.subtract(optpo_pass, ttrl_pass))
    assert report["paired"]["pass@1_per_prompt"]["n"] == 2 * 8
    # Prompts pool to the same mean as the seeds (the same prompts in every run).
    assert report["paired"]["pass@1_per_prompt"]["mean"] == pytest.approx(paired["mean"])
    matched = report["compute_matched"]
    assert matched["b_evaluated_steps"] == [0, 1]
    assert matched["budget"] == pytest.approx([r["train_seconds"] for r in runs[0]])
    for line in ("pass@1, per seed (primary)", "per prompt pooled over seeds", "compute-matched", "| optpo / ttrl"):
        assert line in report["markdown"]


def test_compare_resumes_skipping_finished_seeds(two_seeds):
    workdir, report = two_seeds
    files = sorted(workdir.glob("seed*/*/metrics.jsonl"))
    stamps = [path.stat().st_mtime_ns for path in files]
    with pytest.raises(WorkdirError, match="--resume"):  # before any run starts
        compare_methods([tiny("optpo"), tiny("ttrl")], workdir, seeds=[0, 1, 2], progress=False)
    assert not (workdir / "seed2").exists()
    again = compare_methods([tiny("optpo"), tiny("ttrl")], workdir, seeds=[0, 1], resume=True, progress=False)
    assert set(again["actions"].values()) == {"skip"}
    assert [path.stat().st_mtime_ns for path in files] == stamps  # nothing trained again
    assert again["paired"] == report["paired"] and again["per_method"] == report["per_method"]
    # A started run (here: one with a checkpoint but no summary yet) would resume from its checkpoint
    # (train(resume=True), tested in test_loop.py); checked without training it again.
    summary = workdir / "seed1" / "ttrl" / "summary.json"
    saved = summary.read_text()
    summary.unlink()
    try:
        assert run_action(summary.parent, tiny("ttrl", seed=1), resume=True, overwrite=False) == "resume"
    finally:
        summary.write_text(saved)


def test_run_action_checks_before_any_work(tmp_path):
    config = tiny("optpo", steps=2)
    run = tmp_path / "run"
    assert run_action(run, config, resume=False, overwrite=False) == "start"
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort())
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(WorkdirError, match="holds a run"):
        run_action(run, config, resume=False, overwrite=False)
    assert run_action(run, config, resume=False, overwrite=True) == "start"
    assert run_action(run, config, resume=True, overwrite=False) == "restart"  # no checkpoint yet
    (run / "summary.json").write_text(json.dumps({"steps": 2}))
    assert run_action(run, config, resume=True, overwrite=False) == "skip"
    longer = tiny("optpo", steps=3)
    assert run_action(run, longer, resume=True, overwrite=False) == "resume"
    with pytest.raises(WorkdirError, match="fewer"):
        run_action(run, tiny("optpo", steps=1), resume=True, overwrite=False)
    other = tiny("optpo", steps=2, **{"sprt.threshold": 0.9})
    with pytest.raises(WorkdirError, match="sprt.threshold"):
        run_action(run, other, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="different config.method"):
        compare_methods([config, config], tmp_path / "same", seeds=[0])
    with pytest.raises(ConfigError, match="sprt.threshold"):
        compare_methods([config, tiny("ttrl", **{"sprt.threshold": 1.5})], tmp_path / "bad", seeds=[0, 1])
    assert not (tmp_path / "bad" / "seed0").exists()


def test_plot_training_draws_multi_seed_curves_and_the_matched_row(two_seeds, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "plot_training.py"
    spec = importlib.util.spec_from_file_location("plot_training", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workdir, report = two_seeds
    module.main(["--workdir", str(workdir), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / "compute_curves.png").stat().st_size > 0
    rows = (tmp_path / "compute_curves.csv").read_text().splitlines()
    assert rows[0] == "method,axis,x,pass@1,pass@1_stderr_over_seeds,seeds"
    assert {row.split(",")[1] for row in rows[1:]} == {"rollouts", "generated_tokens", "trained_tokens",
                                                       "train_seconds"}
    assert "interpolated linearly between ttrl's evaluations (steps 0, 1)" in printed
    assert "paired by seed" in printed
    matched = (tmp_path / "compute_matched.csv").read_text().splitlines()
    assert len(matched) == 3
    mean = report["compute_matched"]["difference"]["mean"]
    assert f"{100 * mean:+.1f} points" in printed

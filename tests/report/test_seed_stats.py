"""optpo_jax/report/seed_stats.py: paired statistics, curves and reading a run's files."""


import numpy as np
import pytest
from scipy import stats

from optpo_jax.report import seed_stats
from optpo_jax.train.workdir import WorkdirError
from tests.metrics_files import CUT_LINE, METRICS_LINES, jsonl, run_dir


def test_a_cut_last_metrics_line_is_dropped_when_a_run_is_read(tmp_path):
    run = run_dir(tmp_path / "run", jsonl(METRICS_LINES) + CUT_LINE)
    with pytest.warns(UserWarning, match="metrics.jsonl: its last line was cut"):
        curve = seed_stats.read_run(run)["curve"]
    assert curve["step"].tolist() == [0, 2] and curve["rollouts"].tolist() == [0, 16]


@pytest.mark.parametrize("name", ["config.json", "summary.json", "final_eval.json"])
@pytest.mark.parametrize("text", ["", '{"steps": 2, "af'])
def test_reading_a_run_with_an_empty_or_cut_json_file_is_a_named_error(tmp_path, name, text):
    run = run_dir(tmp_path / "run", jsonl(METRICS_LINES))
    (run / name).write_text(text)
    with pytest.raises(WorkdirError, match=rf"{name} is (empty|cut).*(--resume|--overwrite)"):
        seed_stats.read_run(run)


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

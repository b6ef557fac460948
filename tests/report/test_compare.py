"""optpo_jax/report/compare.py: compare_methods and run_action end to end on tiny runs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from optpo_jax.report.compare import compare_methods, discover, run_action
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.workdir import WorkdirError
from tests.run_configs import tiny_config


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

    script = Path(__file__).resolve().parents[2] / "experiments" / "plot_training.py"
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


def test_compare_checks_both_configs_before_training_anything(tmp_path):
    baseline = tiny_config("ttrl", **{"sprt.rule": "fixd"})
    with pytest.raises(ConfigError, match="fixd"):
        compare_methods([tiny_config(steps=1), baseline], tmp_path / "cmp", seeds=[0, 1], overwrite=True,
                        progress=False)
    assert not any((tmp_path / "cmp").rglob("metrics.jsonl"))  # no run was trained


def test_a_cut_comparison_json_is_a_named_error(tmp_path):
    (tmp_path / "comparison.json").write_text('{"methods": ["op')
    with pytest.raises(WorkdirError, match="comparison.json is cut"):
        discover(tmp_path)


@pytest.mark.parametrize("name", ["summary.json", "final_eval.json"])
def test_compare_resume_resumes_a_run_whose_summary_or_final_eval_was_cut(tmp_path, name):
    config = tiny_config(steps=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort())
    (run / "summary.json").write_text(json.dumps({"steps": 2}))
    (run / "final_eval.json").write_text(json.dumps({"per_prompt_pass@1": [0.5]}))
    assert run_action(run, config, resume=True, overwrite=False) == "skip"
    (run / name).write_text("")  # killed while writing it
    assert run_action(run, config, resume=True, overwrite=False) == "restart"  # no checkpoint: start again
    checkpointer = Checkpointer(run / "checkpoints")
    checkpointer.save(2, {"params": {"w": jnp.ones(2)}, "opt_state": {"m": jnp.ones(1)}}, {"step": 2})
    checkpointer.wait()
    assert run_action(run, config, resume=True, overwrite=False) == "resume"  # the final evaluation again


def test_match_rollouts_runs_the_first_method_on_to_the_baselines_rollouts(tmp_path):
    """--match rollouts continues each seed's OptPO run (its steps kept) until it has drawn TTRL's rollouts of
    that seed, stops at the step that reaches them, and reports the paired difference at equal rollouts."""
    from optpo_jax.report import rollout_match
    from optpo_jax.train.metrics_log import read_metrics

    workdir = tmp_path / "compare"
    # Waves of 8 rows and votes that stop at 2 agreeing answers: OptPO draws under TTRL's 4 x 8 rollouts a step.
    optpo = lambda: tiny("optpo", **{"sprt.threshold": 0.5, "rows_per_wave": 8, "lookahead": False})
    report = compare_methods([optpo(), tiny("ttrl")], workdir, seeds=[0], progress=False, match="rollouts")
    run = workdir / "seed0"
    assert report["actions"][str(run / "optpo_at_ttrl_rollouts")] == "start"
    budget = json.loads((run / "ttrl" / "summary.json").read_text())["total_rollouts"]
    matched = json.loads((run / "optpo_at_ttrl_rollouts" / "summary.json").read_text())
    steps = [r for r in read_metrics(run / "optpo_at_ttrl_rollouts") if "rollouts" in r]
    assert matched["steps"] == len(steps) > 1 and matched["total_rollouts"] == steps[-1]["total_rollouts"]
    assert steps[-1]["total_rollouts"] >= budget > steps[-2]["total_rollouts"]  # stopped at the step that reached it
    first = [r for r in read_metrics(run / "optpo") if "rollouts" in r]
    assert steps[0] == first[0]  # the equal-steps run, continued
    optpo_summary = json.loads((run / "optpo" / "summary.json").read_text())
    config = rollout_match.matched_config(optpo(), optpo_summary, budget)
    assert matched["steps"] < config.steps  # stopped by the budget: a finished run all the same
    assert run_action(run / "optpo_at_ttrl_rollouts", config, resume=True, overwrite=False) == "skip"
    ttrl_pass = json.loads((run / "ttrl" / "summary.json").read_text())["after"]["pass@1"]
    equal = report["equal_rollouts"]
    assert equal["paired"]["pass@1"]["differences"] == pytest.approx([matched["after"]["pass@1"] - ttrl_pass])
    assert equal["ratios"]["rollouts"]["mean"] >= 1.0
    assert "equal rollouts: optpo_at_ttrl_rollouts - ttrl, pass@1" in report["markdown"]
    again = compare_methods([optpo(), tiny("ttrl")], workdir, seeds=[0], resume=True, progress=False,
                            match="rollouts")
    assert set(again["actions"].values()) == {"skip"}
    with pytest.raises(ConfigError, match="match must be one of"):
        compare_methods([tiny("optpo"), tiny("ttrl")], workdir, seeds=None, match="rollouts")
    with pytest.raises(ConfigError, match="optimizer.schedule 'constant'"):
        compare_methods([tiny("optpo", **{"optimizer.schedule": "cosine"}), tiny("ttrl")], workdir, seeds=[0],
                        resume=True, match="rollouts")

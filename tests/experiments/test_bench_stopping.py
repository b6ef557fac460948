"""experiments/bench_stopping.py's flags on a small vote file: --data, --rule, --config, --wave, --json, online prior."""

import json

import pytest

from tests.experiments.scripts import EXPERIMENTS, experiment_module

ROOT = EXPERIMENTS.parent


@pytest.fixture(scope="module")
def bench():
    yield from experiment_module("bench_stopping")


@pytest.fixture
def votes_file(tmp_path):
    rows = [{"answers": ["7"] * 8, "truth": "7"},  # unanimous: stops after the first wave
            {"answers": ["1", "2", "1", "2", "1", "1", "1", "1"], "truth": "1"},
            {"answers": ["", "5", "5", "4", "5", "5", "5", "5"], "truth": "4"}]
    path = tmp_path / "votes.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_json_rows_of_one_rule(bench, votes_file, capsys):
    rows = bench.main(["--data", str(votes_file), "--rule", "margin", "--threshold", "0.9", "--margin_p0", "0.8",
                       "--wave", "2", "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(row) for row in printed] == [{"data", "rule", "setting", "rollouts_per_question", "agreement",
                                              "accuracy"}]
    row = printed[0]
    assert row["data"] == "votes" and row["rule"] == "margin" and row["setting"] == "threshold=0.9, margin_p0=0.8"
    # r = 4: two agreeing votes give 16 / 17 >= 0.9, so the unanimous question stops at the first wave of 2.
    assert 2 <= row["rollouts_per_question"] < 8 and row["agreement"] == 1.0
    assert rows[0]["rollouts_per_question"] == row["rollouts_per_question"]


def test_config_file_settings_and_online_prior(bench, votes_file, capsys):
    rows = bench.main(["--data", str(votes_file), "--config", str(ROOT / "configs" / "arith_optpo.py")])
    assert len(rows) == 1 and "max_samples=8" in rows[0]["setting"]  # the budget capped at the recorded votes
    learned = bench.main(["--data", str(votes_file), "--rule", "dirichlet", "--learn_prior", "--chunk", "1"])
    assert learned[0]["fitted_prior"] is not None
    assert "| votes (3, 8) | dirichlet |" in capsys.readouterr().out


def test_bad_flags_are_named(bench, votes_file):
    with pytest.raises(SystemExit, match="SPRTConfig.margin_p0 must"):
        bench.main(["--data", str(votes_file), "--rule", "margin", "--margin_p0", "2"])
    with pytest.raises(SystemExit):
        bench.main(["--data", str(votes_file), "--threshold", "0.9"])  # a setting without --rule

"""Run files cut by an interruption: JSON files are written atomically (temp file + rename), a cut
last line of metrics.jsonl is read as the interruption it is, and an empty or cut config.json /
summary.json / final_eval.json is a WorkdirError naming the file, never a JSONDecodeError traceback.

Synthetic run directories and direct calls: nothing here trains.
"""

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import pytest
from test_loop import tiny_config

from optpo_jax.train import seed_stats
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.compare import discover, run_action
from optpo_jax.train.metrics_log import MetricsLog
from optpo_jax.train.workdir import WorkdirError, check_resumable

TRAIN = Path(__file__).resolve().parents[1] / "optpo_jax" / "train"
LINES = [{"step": 0, "eval/pass@1": 0.25, "eval/pass@1_stderr": 0.1},
         {"step": 1, "rollouts": 8, "total_rollouts": 8, "train_seconds": 1.0},
         {"step": 2, "rollouts": 8, "total_rollouts": 16, "train_seconds": 2.0, "eval/pass@1": 0.5}]
CUT = '{"step": 3, "rollouts": 8, "total_roll'  # a kill while appending step 3


def _jsonl(records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _run_dir(path: Path, metrics: str) -> Path:
    """A finished run's files, as ``seed_stats.read_run`` reads them."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": 2, "data": {"mode": "test"}}))
    (path / "summary.json").write_text(json.dumps({"steps": 2, "after": {"pass@1": 0.5}}))
    (path / "final_eval.json").write_text(json.dumps({"per_prompt_pass@1": [0.5], "prompts_sha256": "x"}))
    (path / "metrics.jsonl").write_text(metrics)
    return path


# 1. Every file a run writes is written atomically.

def test_no_run_file_is_written_in_place():
    in_place = [f"{path.name}:{number}: {line.strip()}" for path in sorted(TRAIN.glob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), start=1)
                if re.search(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"']w", line)]
    assert in_place == []


def test_write_atomically_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from optpo_jax.train.workdir import write_atomically

    path = tmp_path / "summary.json"
    write_atomically(path, '{"steps": 1}')
    assert path.read_text() == '{"steps": 1}'
    write_atomically(path, '{"steps": 2}')
    assert path.read_text() == '{"steps": 2}' and os.listdir(tmp_path) == ["summary.json"]

    def killed(*args):
        raise KeyboardInterrupt  # stands in for a kill between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, '{"steps": 3, "after": {}}')
    assert path.read_text() == '{"steps": 2}' and os.listdir(tmp_path) == ["summary.json"]  # no temp file left


# 2. metrics.jsonl: a cut last line is an interruption; a malformed line before it is an error.

def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_jsonl(LINES) + CUT)
    log = MetricsLog(tmp_path, truncate_after=2)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == _jsonl(LINES)
    assert log.read() == LINES


def test_a_cut_last_metrics_line_is_dropped_when_a_run_is_read(tmp_path):
    run = _run_dir(tmp_path / "run", _jsonl(LINES) + CUT)
    with pytest.warns(UserWarning, match="metrics.jsonl: its last line was cut"):
        curve = seed_stats.read_run(run)["curve"]
    assert curve["step"].tolist() == [0, 2] and curve["rollouts"].tolist() == [0, 16]


@pytest.mark.parametrize("bad", ['{"step": 1, "rollou', "", "[1, 2]"])
def test_a_malformed_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path, bad):
    lines = _jsonl(LINES).splitlines(keepends=True)
    lines[1] = bad + "\x00\n" if bad == "" else bad + "\n"  # "": a line of NUL bytes
    run = _run_dir(tmp_path / "run", "".join(lines))
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        MetricsLog(run, truncate_after=2)
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        seed_stats.read_run(run)


# 3. An empty or cut config.json / summary.json / final_eval.json is a named error (or, for
#    compare --resume, a run to resume).

@pytest.mark.parametrize("text", ["", '{"method": "optpo", "seed": '])
def test_resume_with_an_empty_or_cut_config_json_is_a_named_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(WorkdirError, match=r"config.json is (empty|cut).*--overwrite"):
        check_resumable(tmp_path, tiny_config(steps=2))


@pytest.mark.parametrize("name", ["config.json", "summary.json", "final_eval.json"])
@pytest.mark.parametrize("text", ["", '{"steps": 2, "af'])
def test_reading_a_run_with_an_empty_or_cut_json_file_is_a_named_error(tmp_path, name, text):
    run = _run_dir(tmp_path / "run", _jsonl(LINES))
    (run / name).write_text(text)
    with pytest.raises(WorkdirError, match=rf"{name} is (empty|cut).*(--resume|--overwrite)"):
        seed_stats.read_run(run)


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

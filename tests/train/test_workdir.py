"""optpo_jax/train/workdir.py: fresh starts, resume checks, the lock and atomic writes of a run's files."""

import json
import os
import re
from pathlib import Path

import pytest

from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.loop import train
from optpo_jax.train.workdir import WorkdirError, WorkdirLock, check_resumable
from tests.run_configs import run_files, tiny_config


def test_a_second_run_into_a_used_workdir_is_refused_unless_overwritten(run_copy):
    with pytest.raises(WorkdirError, match=r"--resume.*--overwrite"):
        train(tiny_config(steps=2), run_copy, progress=False)
    summary = train(tiny_config(steps=1), run_copy, progress=False, overwrite=True)
    assert summary["steps"] == 1
    assert Checkpointer(run_copy / "checkpoints").manager.all_steps() == [1]  # the old run's step 2 is gone
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1]


@pytest.mark.parametrize("field, value", [("seed", 1), ("data.seed", 5), ("sprt.max_samples", 16),
                                          ("prompts_per_step", 2), ("sampling.max_new_tokens", 16)])
def test_resume_refuses_a_config_that_defines_another_run(run_copy, field, value):
    config = tiny_config(steps=3, **{field: value})
    with pytest.raises(WorkdirError, match=rf"config\.{field}: .* -> {value}") as error:
        train(config, run_copy, resume=True, progress=False)
    assert "Only these may change on resume: steps" in str(error.value)


def test_resume_may_extend_a_run_with_a_constant_schedule(run_copy):
    summary = train(tiny_config(steps=3, **{"eval.every_steps": 0}), run_copy, resume=True, progress=False)
    assert summary["steps"] == 3
    cosine = tiny_config(steps=4, **{"optimizer.schedule": "cosine"})
    json_path = run_copy / "config.json"
    json_path.write_text(tiny_config(steps=3, **{"optimizer.schedule": "cosine"}).to_json_best_effort())
    with pytest.raises(WorkdirError, match="config.steps: 3 -> 4"):
        train(cosine, run_copy, resume=True, progress=False)


def test_a_run_saved_before_a_field_existed_resumes_only_with_its_old_value(run_copy):
    """A config.json written before ``ADDED_FIELDS`` existed resumes when the new fields hold the
    values that reproduce it, and is refused when they do not."""
    from optpo_jax.train.workdir import ADDED_FIELDS, check_resumable

    saved = json.loads((run_copy / "config.json").read_text())
    for name in ADDED_FIELDS:
        *sections, field = name.split(".")
        parent = saved
        for section in sections:
            parent = parent[section]
        del parent[field]
    (run_copy / "config.json").write_text(json.dumps(saved))
    # pack_width's and subsample's defaults have changed since they were added: an old run resumes with the old
    # values.
    old_values = {name: ADDED_FIELDS[name] for name in ("policy_update.pack_width", "policy_update.subsample")}
    check_resumable(run_copy, tiny_config(steps=2, **old_values))
    with pytest.raises(WorkdirError, match=r"config.policy_update.pack_width: 0 -> 128"):
        check_resumable(run_copy, tiny_config(steps=2))
    with pytest.raises(WorkdirError, match=r"config.policy_update.min_rollouts_per_prompt: 0 -> 3"):
        check_resumable(run_copy, tiny_config(steps=2, **old_values, **{"policy_update.min_rollouts_per_prompt": 3}))


def test_a_run_saved_under_an_old_field_name_resumes_and_is_read_under_the_new_one(run_copy):
    """policy_update.advantage_mode was renamed advantage_estimator (``RENAMED_FIELDS``): a run saved with the
    old name resumes with the same value under the new one, refuses another value, and reads back renamed."""
    from optpo_jax.train.trained import load_run_config

    saved = json.loads((run_copy / "config.json").read_text())
    saved["policy_update"]["advantage_mode"] = saved["policy_update"].pop("advantage_estimator")
    saved["policy_update"]["advantage_mode"] = "drgrpo"
    (run_copy / "config.json").write_text(json.dumps(saved))
    drgrpo = {"policy_update.advantage_estimator": "drgrpo"}
    check_resumable(run_copy, tiny_config(steps=2, **drgrpo))
    with pytest.raises(WorkdirError, match=r"config.policy_update.advantage_estimator: 'drgrpo' -> 'grpo'"):
        check_resumable(run_copy, tiny_config(steps=2))
    config = load_run_config(run_copy)
    assert config.policy_update.advantage_estimator == "drgrpo" and "advantage_mode" not in config.policy_update


def test_a_second_run_in_a_locked_workdir_names_the_holder(run_copy):
    with WorkdirLock(run_copy), pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
        train(tiny_config(steps=2), run_copy, resume=True, progress=False)


def test_training_into_a_model_directory_is_refused_even_with_overwrite(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32}))
    before = run_files(model)
    with pytest.raises(WorkdirError, match="holds a qwen2 checkpoint, not a run"):
        train(tiny_config(steps=1), model, overwrite=True, progress=False)
    assert run_files(model) == before


def test_an_unusable_workdir_is_one_error_naming_it(tmp_path):
    """A workdir under a file, a workdir that is a file, a .lock that is a folder, a read-only parent: a
    WorkdirError (one line in the CLI), never an OSError traceback, and nothing left behind."""
    (tmp_path / "file").write_text("x")
    locked = tmp_path / "locked"
    (locked / ".lock").mkdir(parents=True)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [tmp_path / "file" / "run", tmp_path / "file", locked]
    if os.geteuid() != 0:  # root writes through a read-only mode
        cases.append(read_only / "run")
    for workdir in cases:
        with pytest.raises(WorkdirError, match=f"cannot use {workdir} as a workdir"):
            train(tiny_config(steps=1), workdir, progress=False)


TRAIN = Path(__file__).resolve().parents[2] / "optpo_jax" / "train"


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


@pytest.mark.parametrize("text", ["", '{"method": "optpo", "seed": '])
def test_resume_with_an_empty_or_cut_config_json_is_a_named_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(WorkdirError, match=r"config.json is (empty|cut).*--overwrite"):
        check_resumable(tmp_path, tiny_config(steps=2))

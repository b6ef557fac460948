"""Nothing lost and nothing silently wrong against an existing run (train/loop.py, train/workdir.py,
train/checkpoints.py, the eval and export commands): checks pass before anything is removed, eval and export read the
run's own config, a missing run or step is named as such, and a checkpoint of another layout is a config mismatch,
not damage."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from cli_in_process import run_command
from test_loop import tiny_config
from test_reliability_runs import copy_run

from optpo_jax.train.checkpoints import Checkpointer, CheckpointError
from optpo_jax.train.compare import compare_methods
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.loop import train
from optpo_jax.train.workdir import WorkdirError

LORA = {"lora.rank": 4, "lora.alpha": 16.0}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished 2-step LoRA run (copied by each test that changes it)."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    train(tiny_config(steps=2, **LORA), workdir, progress=False)
    return workdir


@pytest.fixture
def run_copy(lora_run, tmp_path):
    return copy_run(lora_run, tmp_path)


def _files(workdir: Path) -> dict:
    return {str(path.relative_to(workdir)): path.read_bytes() for path in sorted(workdir.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def _cli(*args):
    # check=False: the tests read the return code and the one-line error themselves.
    return subprocess.run([sys.executable, "-m", "optpo_jax.cli", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("override", [{"sprt.rule": "dirichelt"}, {"prompts_per_step": 200}])
def test_overwrite_with_a_config_error_leaves_the_old_run_as_it_was(run_copy, override):
    before = _files(run_copy)
    with pytest.raises(ConfigError):
        train(tiny_config(steps=2, **LORA, **override), run_copy, overwrite=True, progress=False)
    assert _files(run_copy) == before


def test_compare_checks_both_configs_before_training_anything(tmp_path):
    baseline = tiny_config("ttrl", **{"sprt.rule": "fixd"})
    with pytest.raises(ConfigError, match="fixd"):
        compare_methods([tiny_config(steps=1), baseline], tmp_path / "cmp", seeds=[0, 1], overwrite=True,
                        progress=False)
    assert not any((tmp_path / "cmp").rglob("metrics.jsonl"))  # no run was trained


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(run_copy):
    before = _files(run_copy)
    with pytest.raises(WorkdirError, match="checkpoint is at step 2 and config.steps is 1: a run cannot be shortened"):
        train(tiny_config(steps=1, **LORA), run_copy, resume=True, progress=False)
    with pytest.raises(WorkdirError, match=r"holds steps \[1, 2\], not 99"):
        train(tiny_config(steps=2, **LORA), run_copy, resume=True, resume_step=99, progress=False)
    assert _files(run_copy) == before


def test_a_checkpoint_of_another_layout_is_a_mismatch_and_a_missing_step_is_missing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    saved = {"params": {"a": jnp.ones((2, 3)), "b": jnp.zeros(4, jnp.bfloat16)}, "opt_state": (jnp.zeros(()),)}
    checkpointer.save(1, saved, {"step": 1})
    checkpointer.wait()
    other = {"params": {"a": jnp.ones((2, 3)), "b": jnp.zeros(4, jnp.float32)}, "opt_state": (jnp.zeros(()),)}
    for like, step, message in ((other, None, "not damaged: use the run's own config.json"),
                                (saved, 7, r"has no checkpoint at step 7; it holds steps \[1\]"),
                                (saved, -1, r"has no checkpoint at step -1")):
        with pytest.raises(CheckpointError, match=message) as error:
            checkpointer.restore(like, step)
        assert "--overwrite" not in str(error.value)


def test_training_into_a_model_directory_is_refused_even_with_overwrite(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32}))
    before = _files(model)
    with pytest.raises(WorkdirError, match="holds a qwen2 checkpoint, not a run"):
        train(tiny_config(steps=1), model, overwrite=True, progress=False)
    assert _files(model) == before


def test_eval_reads_the_runs_config_and_refuses_flags_that_differ(run_copy, capsys):
    """A LoRA run evaluated with no config flags reproduces its own final evaluation (same samples and seed);
    --config.lora.* that differ are refused, naming them (they once gave pass@1 0.0 and exit 0)."""
    summary = json.loads((run_copy / "summary.json").read_text())
    code, out, _ = run_command(capsys, "eval", f"--workdir={run_copy}")
    assert code == 0 and f"evaluating {run_copy} at step 2" in out
    assert json.loads(out[out.index("{"):]) == summary["after"]
    # Overrides reach ml_collections from the process's own command line, so these run as commands.
    refused = _cli("eval", f"--workdir={run_copy}", "--config.lora.rank=8", "--config.lora.alpha=1000")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("optpo-jax: error: eval uses the run's own config")
    assert "config.lora.alpha: 16.0 -> 1000" in refused.stderr and "config.lora.rank: 4 -> 8" in refused.stderr
    export = _cli("export", f"--workdir={run_copy}", f"--out={run_copy.parent / 'model'}", "--config.lora.alpha=1000")
    assert export.returncode != 0 and "config.lora.alpha" in export.stderr
    assert not (run_copy.parent / "model").exists()


def test_eval_of_a_workdir_without_a_run_is_an_error_and_export_never_writes_into_a_run(run_copy, tmp_path, capsys):
    code, _, _ = run_command(capsys, "eval", f"--workdir={tmp_path / 'reff'}")
    assert "holds no run" in code
    before = _files(run_copy)
    code, _, _ = run_command(capsys, "export", f"--workdir={run_copy}", f"--out={run_copy}")
    assert "holds a training run" in code and _files(run_copy) == before
    (tmp_path / "a_file").write_text("x")
    code, _, _ = run_command(capsys, "export", f"--workdir={run_copy}", f"--out={tmp_path / 'a_file'}")
    assert "is a file, not a directory" in code


def test_resume_after_the_data_or_the_model_changed_is_refused(tmp_path):
    """The same config reading other prompts (a replaced data file; here a task whose problems changed) or other
    initial weights (a replaced checkpoint directory) once resumed on them silently."""
    from optpo_jax.tasks.arithmetic import POLICY_DIR, SHIFTED, ArithmeticTask, generate_problems

    class Sums(ArithmeticTask):
        def __init__(self, seed):
            super().__init__()
            self.seed = seed

        def problems(self, config):
            return generate_problems(8, SHIFTED, seed=self.seed), None

    shutil.copytree(POLICY_DIR, tmp_path / "policy")
    config = tiny_config(steps=2, model_path=str(tmp_path / "policy"), checkpoint_every=1, **{"eval.every_steps": 0})
    train(tiny_config(steps=1, model_path=str(tmp_path / "policy"), **{"eval.every_steps": 0}), tmp_path / "run",
          progress=False, task=Sums(3))
    assert json.loads((tmp_path / "run" / "fingerprints.json").read_text())["train_prompts"]
    with pytest.raises(WorkdirError, match="--resume: the run's task, data or model differ.*train_prompts"):
        train(config, tmp_path / "run", resume=True, progress=False, task=Sums(4))
    # eval / export of it through the command line build the config's own task, not the one it trained with
    from optpo_jax.train.loop import check_fingerprints
    from optpo_jax.train.setup import build_setup

    with pytest.raises(WorkdirError, match=r"eval: .*task: test_run_safety.*Sums -> optpo_jax.tasks.arithmetic"):
        check_fingerprints(tmp_path / "run", build_setup(config), "eval")
    weights = tmp_path / "policy" / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(weights)
    save_file({name: value * 1.01 for name, value in tensors.items()}, str(weights))
    with pytest.raises(WorkdirError, match="initial_policy"):
        train(config, tmp_path / "run", resume=True, progress=False, task=Sums(3))


def test_a_lora_rank_above_the_models_width_is_named():
    from optpo_jax.train.setup import build_setup

    with pytest.raises(ConfigError, match=r"config.lora.rank=1000 exceeds \d+, the smaller side of the narrowest"):
        build_setup(tiny_config(**{"lora.rank": 1000}))


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


def test_a_failed_background_save_stops_the_run_at_the_next_step_and_a_failed_start_leaves_no_run(tmp_path,
                                                                                                  monkeypatch):
    """A full disk under Orbax's background save: one CheckpointError naming the cause and the intact steps at the
    next step (the run once trained on). A run that ended before its first step leaves nothing that would need
    --overwrite."""
    from optpo_jax.train import checkpoints as checkpoints_module

    calls = []

    def full_disk(self):
        calls.append(1)
        if len(calls) > 1:  # the first save's check passes; the second step finds it failed
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints_module.ocp.CheckpointManager, "check_for_errors", full_disk)
    with pytest.raises(CheckpointError, match=r"failed \(No space left on device\); the steps saved before it"):
        train(tiny_config(steps=3, **{"eval.every_steps": 0}), tmp_path / "run", progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # stopped before step 2 trained

    monkeypatch.undo()
    from optpo_jax.train import loop

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory in the first evaluation")

    monkeypatch.setattr(loop, "run_eval", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_config(steps=1), tmp_path / "fresh", progress=False)
    assert not [path.name for path in (tmp_path / "fresh").iterdir() if path.name != ".lock"]

"""optpo_jax/train/loop.py: train() end to end: resume, SIGKILL, fingerprints and config checks at the edge."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from optpo_jax.train.batches import batch_problems
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.loop import train
from optpo_jax.train.setup import build_setup
from optpo_jax.train.workdir import WorkdirError
from tests.doc_blocks import ROOT
from tests.run_configs import LORA, run_files, small_config, tiny_config


def test_checkpoint_keeps_the_totals_of_its_step(tmp_path):
    from optpo_jax.train.checkpoints import Checkpointer

    checkpoints = Checkpointer(tmp_path)
    state = {"params": {"w": jnp.ones(3)}, "opt_state": {"m": jnp.zeros(3)}}
    totals = {"step": 1, "rollouts": 10, "before": {"pass@1": 0.5}}
    checkpoints.save(1, state, totals)
    totals.update(step=2, rollouts=20)  # the loop goes on while Orbax writes in the background
    totals["before"]["pass@1"] = 0.0
    checkpoints.wait()
    _, restored, carry = checkpoints.restore(state)
    assert restored == {"step": 1, "rollouts": 10, "before": {"pass@1": 0.5}} and carry is None


def test_batches_cover_every_prompt_once_per_epoch():
    problems = list(range(12))
    epoch = [p for step in range(3) for p in batch_problems(problems, step, 4, seed=0)]
    assert sorted(epoch) == problems
    assert batch_problems(problems, 3, 4, seed=0) != batch_problems(problems, 0, 4, seed=0)


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "optpo_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_cli_overrides_and_rejects_bad_values(tmp_path):
    process = _cli("train", "--config", "configs/arith_optpo.py", "--config.sprt.threshold=1.5",
                   f"--workdir={tmp_path}")
    output, _ = process.communicate(timeout=120)
    # The override reached the named config file (it once stopped absl with "defined twice", which names the
    # field too).
    assert process.returncode != 0 and output.strip().splitlines()[-1] == (
        "optpo-jax: error: config.sprt.threshold must be a finite number in (0.0, 1.0), got 1.5")


def _final_metrics(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((workdir / "summary.json").read_text())


# PPO: the critic's adapters, value head and optimizer state resume too (its value loss is in every step's metrics).
RESUMED_RUN = {"sprt.learn_prior": True, "policy_update.min_rollouts_per_prompt": 4, "lora.rank": 8, "algorithm": "ppo"}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    """Also with the state a run carries besides params (the learned prior, in the checkpoint's totals; PPO's
    critic) and with LoRA (only the adapters and their optimizer state are saved; the base is reloaded). A
    continuous run stopped mid-batch (GRPO): tests/test_continuous.py."""
    config = tiny_config(steps=4, **RESUMED_RUN)
    full = tmp_path / "full"
    train(config, full, progress=False)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "from tests.train.test_loop import RESUMED_RUN, tiny_config\n\n"
        "def get_config():\n    return tiny_config(steps=4, **RESUMED_RUN)\n"
    )
    args = ("train", f"--config={config_file}", f"--workdir={tmp_path / 'killed'}")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    process = _cli(*args, env=env)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoints" / "2").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _cli(*args, "--resume", env=env)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    full_lines, full_summary = _final_metrics(full)
    resumed_lines, resumed_summary = _final_metrics(tmp_path / "killed")
    drop_times = lambda line: {k: v for k, v in line.items() if "seconds" not in k}
    assert [drop_times(line) for line in resumed_lines] == [drop_times(line) for line in full_lines]
    assert [line.get("fitted_prior") for line in full_lines[1:4]] != [None] * 3  # the prior was learned
    assert all(line["value_loss"] > 0 for line in full_lines if "loss" in line)  # the critic trained
    for name in ("after", "before", "total_rollouts", "total_generated_tokens", "label_accuracy"):
        assert resumed_summary[name] == full_summary[name]
    # The LoRA run exported: merged, and as PEFT adapters that merge into the same model.
    from optpo_jax.models import load_hf, load_peft_adapters, merge_adapters
    from optpo_jax.tasks.arithmetic import load_policy
    from tests.cli_in_process import run_command

    for out, extra in (("merged", ()), ("adapters", ("--adapters_only",))):  # in this process: no start-up each
        code, _, error = run_command(capsys, "export", f"--config={config_file}", f"--workdir={tmp_path / 'killed'}",
                                     f"--out={tmp_path / out}", *extra)
        assert code == 0, error
    base = load_policy()
    adapters, lora = load_peft_adapters(tmp_path / "adapters")
    tokens = np.array([[1, 5, 9, 12, 3, 7]], np.int32)
    merged = np.asarray(load_hf(tmp_path / "merged", load_tokenizer=False)(tokens))
    np.testing.assert_allclose(merged, np.asarray(type(base)(base.config, merge_adapters(base.params, adapters, lora))(
        tokens)), atol=1e-5)
    assert np.abs(merged - np.asarray(base(tokens))).max() > 1e-4  # training moved the adapters


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(WorkdirError, match="no checkpoint"):
        train(tiny_config(steps=2), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("field, value, shown", [
    ("optimizer.max_grad_norm", -1.0, "config.optimizer.max_grad_norm"),
    ("optimizer.max_grad_norm", 0.0, "config.optimizer.max_grad_norm"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate"),
    ("checkpoint_every", 0, "config.checkpoint_every"),
    ("sprt.prior", float("inf"), "config.sprt.prior"),
    ("sprt.max_samples", 10**6, "config.sprt.max_samples"),
    ("data.num_prompts", -1, "config.data.num_prompts"),
    ("sampling.temperature", 0.0, "config.sampling.temperature"),
    ("eval.top_p", 0.0, "config.eval.top_p"),
])
def test_config_values_are_checked_before_the_workdir_is_touched(tmp_path, field, value, shown):
    with pytest.raises(ConfigError, match=shown.replace(".", r"\.")):
        train(tiny_config(**{field: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before touching the workdir


@pytest.mark.parametrize("override", [{"sprt.rule": "dirichelt"}, {"prompts_per_step": 200}])
def test_overwrite_with_a_config_error_leaves_the_old_run_as_it_was(lora_run_copy, override):
    before = run_files(lora_run_copy)
    with pytest.raises(ConfigError):
        train(tiny_config(steps=2, **LORA, **override), lora_run_copy, overwrite=True, progress=False)
    assert run_files(lora_run_copy) == before


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(lora_run_copy):
    before = run_files(lora_run_copy)
    with pytest.raises(WorkdirError, match="checkpoint is at step 2 and config.steps is 1: a run cannot be shortened"):
        train(tiny_config(steps=1, **LORA), lora_run_copy, resume=True, progress=False)
    with pytest.raises(WorkdirError, match=r"holds steps \[1, 2\], not 99"):
        train(tiny_config(steps=2, **LORA), lora_run_copy, resume=True, resume_step=99, progress=False)
    assert run_files(lora_run_copy) == before


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
    from optpo_jax.train.fingerprints import check_fingerprints
    from optpo_jax.train.setup import build_setup

    with pytest.raises(WorkdirError, match=r"eval: .*task: tests.train.test_loop.*Sums -> optpo_jax.tasks.arithmetic"):
        check_fingerprints(tmp_path / "run", build_setup(config), "eval")
    weights = tmp_path / "policy" / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(weights)
    save_file({name: value * 1.01 for name, value in tensors.items()}, str(weights))
    with pytest.raises(WorkdirError, match="initial_policy"):
        train(config, tmp_path / "run", resume=True, progress=False, task=Sums(3))


def test_record_votes_reads_a_lora_run_with_its_own_config(tmp_path):
    """experiments/record_votes.py on a LoRA run (it once restored with a full-params optimizer template and could
    not): the votes are those of the base with the run's adapters merged in (reference: run_eval on the merge)."""
    import importlib.util

    import jax

    from optpo_jax.train.checkpoints import Checkpointer
    from optpo_jax.train.evaluation import run_eval

    config = small_config(**{"lora.rank": 4, "data.num_prompts": 4})
    setup = build_setup(config)
    state = setup.initial_state()
    adapters = jax.tree.map(lambda leaf: leaf + 0.05, state.params)  # B != 0: the merge differs from the base
    state = state.replace(params=adapters)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(1, state.checkpointed(), {"step": 1})
    checkpointer.wait()
    spec = importlib.util.spec_from_file_location("record_votes", ROOT / "experiments/record_votes.py")
    record_votes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_votes)
    out = tmp_path / "votes.jsonl"
    record_votes.main(["--out", str(out), "--samples", "4", "--workdir", str(workdir)])
    recorded = [json.loads(line)["answers"] for line in out.read_text().splitlines()]
    expected = run_eval(setup, state.policy_params(), 4, 0, progress=False).answers
    base = run_eval(setup, setup.policy.params, 4, 0, progress=False).answers
    assert recorded == [["" if a is None else str(a) for a in row] for row in expected]
    assert expected != base  # the adapters changed the policy, so reading them back mattered


def test_a_rollout_budget_stops_the_run_at_the_step_that_reaches_it(run_copy):
    """A finished 2-step run resumed with 20 steps and a budget of one rollout more than it drew takes exactly
    one more step; resumed again, it takes none (the budget is spent) and only evaluates again."""
    from optpo_jax.train.metrics_log import read_metrics

    drawn = json.loads((run_copy / "summary.json").read_text())["total_rollouts"]
    config = tiny_config(steps=20, rollout_budget=drawn + 1)
    summary = train(config, run_copy, resume=True, progress=False)
    assert summary["steps"] == 3 and summary["total_rollouts"] > drawn
    steps = [record["step"] for record in read_metrics(run_copy) if "rollouts" in record]
    assert steps == [1, 2, 3]
    again = train(config, run_copy, resume=True, progress=False)
    assert again["steps"] == 3 and again["total_rollouts"] == summary["total_rollouts"]
    assert [record["step"] for record in read_metrics(run_copy) if "rollouts" in record] == [1, 2, 3]

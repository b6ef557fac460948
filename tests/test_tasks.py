"""Your own task, model, data and reward: the Task protocol, module:factory, the reward registry, the README's
own-model-and-data command and custom task, run as printed."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from doc_blocks import ROOT, code_blocks

from optpo_jax.default_config import arithmetic_config
from optpo_jax.sprt import SPRTConfig, init_vote_state, sprt_update
from optpo_jax.tasks.arithmetic import SHIFTED, ArithmeticTask, generate_problems
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.rewards import REWARDS, consensus_rewards, ground_truth_rewards
from optpo_jax.train.rollouts import Rollouts
from optpo_jax.train.setup import build_setup


def _readme_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's "Your own model, data and task" section."""
    return code_blocks("README.md", language, "Your own model, data and task")


def _small_config(**overrides):
    config = arithmetic_config("optpo")
    config.data.num_prompts, config.prompts_per_step, config.rows_per_wave = 8, 4, 32
    config.update_from_flattened_dict(overrides)
    return config


def _rollouts(prompt_index, answers, num_slots=8):
    """Rollouts with only what rewards read: prompts, slots of ``answers``, the votes over them."""
    prompt_index = np.array(prompt_index, np.int32)
    answer_slots = AnswerSlots(int(prompt_index.max()) + 1, num_slots)
    slots = answer_slots.assign(prompt_index, answers)
    votes = sprt_update(init_vote_state(int(prompt_index.max()) + 1, num_slots), prompt_index, slots,
                        np.ones(len(slots), bool), SPRTConfig(max_samples=num_slots))
    empty = np.zeros((len(slots), 1), np.int32)
    return Rollouts(prompt_index, empty, np.ones(len(slots), np.int32), empty, np.ones(len(slots), np.int32),
                    empty.astype(np.float32), slots, votes, answer_slots, len(slots), len(slots), 1, 0.0)


def test_ground_truth_reward_grades_each_rollout_and_consensus_rewards_the_majority():
    """Hand-computed: prompt 0's majority (7) is wrong (the truth is 5), prompt 1's majority (9) is right."""
    problems = [type("P", (), {"answer": 5})(), type("P", (), {"answer": 9})()]
    rollouts = _rollouts([0, 0, 0, 0, 1, 1, 1], [7, 7, 5, None, 9, 9, 4])
    task = ArithmeticTask()
    np.testing.assert_array_equal(ground_truth_rewards(rollouts, problems, task), [0, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(consensus_rewards(rollouts, problems, task), [1, 1, 0, 0, 1, 1, 0])
    assert set(REWARDS) == {"consensus", "ground_truth"}


def test_ground_truth_reward_runs_in_training_and_an_unknown_reward_is_named(monkeypatch):
    """A training step rewards by the configured registry entry (spied on): ground truth, not the vote."""
    import jax

    from optpo_jax.train.loop import init_train_state
    from optpo_jax.train.step import training_step

    with pytest.raises(ConfigError, match=r"config.reward must be one of \('consensus', 'ground_truth'\), got 'gt'"):
        build_setup(_small_config(reward="gt"))
    setup = build_setup(_small_config(reward="ground_truth"))
    graded = []

    def spy(rollouts, problems, task):
        graded.append(ground_truth_rewards(rollouts, problems, task))
        return graded[-1]

    monkeypatch.setitem(REWARDS, "ground_truth", spy)
    problems = setup.train_problems[:4]
    _, output = training_step(init_train_state(setup), setup.learner, problems, jax.random.key(0),
                              np.random.default_rng(0))
    assert len(graded) == 1 and np.array_equal(output.rewards, graded[0])
    answers = [output.rollouts.answer_slots.answer(int(p), int(s))
               for p, s in zip(output.rollouts.prompt_index, output.rollouts.slots, strict=True)]
    truth = [float(a is not None and a == problems[p].answer) for a, p in zip(answers, output.rollouts.prompt_index,
                                                                              strict=True)]
    np.testing.assert_array_equal(output.rewards, truth)  # reference: the sums' exact answers


def test_a_task_object_replaces_config_task_and_steps_0_is_one_epoch():
    class Sums(ArithmeticTask):
        def problems(self, config):
            return generate_problems(12, SHIFTED, seed=3), None

    task = Sums()
    config = _small_config(steps=0)
    setup = build_setup(config, task)
    assert setup.task is task and len(setup.train_problems) == 12
    assert setup.config.steps == 12 // 4 and config.steps == 0  # resolved in the setup, the given config unchanged
    with pytest.raises(ConfigError, match=r"train\(task=...\): the task Broken lacks extract, is_correct"):
        build_setup(config, object.__new__(type("Broken", (), {"stop_token_ids": (2,), "pad_token_id": 0,
                                                                "prompt_tokens": lambda self, p: [1]})))


def test_config_task_module_factory_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        "from optpo_jax.tasks.arithmetic import ArithmeticTask\n"
        "class Mine(ArithmeticTask):\n    pass\n"
        "def make_task(config, tokenizer):\n    assert tokenizer is None  # the shipped policy has none\n"
        "    return Mine()\n"
        "def make_nothing(config, tokenizer):\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    setup = build_setup(_small_config(task="my_tasks:make_task"))
    assert type(setup.task).__name__ == "Mine"
    for spec, message in (("no_such_module:make", "cannot import module 'no_such_module'"),
                          ("my_tasks:missing", "module 'my_tasks' has no callable 'missing'"),
                          ("my_tasks:make_nothing", "the task int lacks stop_token_ids"),
                          ("arithmetics", "config.task must be one of \\('arithmetic', 'math'\\) or 'module:factory'")):
        with pytest.raises(ConfigError, match=message):
            build_setup(_small_config(task=spec))


def test_readme_own_model_and_data_command_runs_as_printed(tmp_path):
    """The README's command on a tiny random Qwen2 (my_model/) and a JSONL of 4 problems: steps=0 gives
    4 / 2 = 2 steps; a random model answers nothing, which the metrics and a warning say."""
    from tests.test_math import write_tiny_qwen

    questions = ["What is 2 + 3?", "What is 7 - 4?", "What is 3 * 3?", "What is 8 / 2?"]
    rows = [{"question": q, "answer": a} for q, a in zip(questions, ["5", "3", "9", "4"], strict=True)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_tiny_qwen(tmp_path / "my_model", questions)
    (command,) = _readme_blocks("bash")
    arguments = shlex.split(command.replace("\\\n", " "))
    assert arguments[0] == "optpo-jax"
    script = Path(sys.executable).with_name("optpo-jax")
    result = subprocess.run([str(script), *arguments[1:]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/mine/summary.json").read_text())
    assert summary["steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "runs/mine/metrics.jsonl").read_text().splitlines()]
    steps = [line for line in steps if "rollouts" in line]
    assert len(steps) == 2 and all(line["answered_fraction"] == 0.0 and line["trained_rollouts"] == 0
                                   for line in steps)
    assert "no rollout was trained on" in result.stderr


def test_readme_custom_task_runs_as_printed(tmp_path, monkeypatch):
    from optpo_jax.train import setup as setup_module

    (block,) = _readme_blocks("python")
    monkeypatch.chdir(tmp_path)
    checked = []
    monkeypatch.setattr(setup_module, "check_task", lambda task, source: checked.append(task) or task)
    namespace = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README as printed
    assert namespace["summary"]["steps"] == 2 and (tmp_path / "runs/last_digit/summary.json").exists()
    assert [type(task).__name__ for task in checked] == ["LastDigitTask"]  # the run used the README's task


def test_an_overlong_chat_prompt_keeps_the_chat_header_instruction_and_assistant_header(tmp_path):
    """The cut falls in the question: the template's first and last tokens (reference: the untruncated chat
    template of transformers' tokenizer) stay, and the cut is counted."""
    from optpo_jax.tasks.math import MathProblem, MathTask
    from tests.test_math import write_tiny_qwen

    question = " ".join(f"word{i}" for i in range(200))
    write_tiny_qwen(tmp_path, [question, "Please reason step by step"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    task = MathTask(tokenizer, max_prompt_tokens=90, multiple_choice=True)
    full = task._chat_tokens(question)
    assert len(full) > 90
    tokens = task.prompt_tokens(MathProblem(question, "1"))
    header, footer = task._chat_tokens("")[:3], full[-12:]  # "<|im_start|>user\n" ... instruction, assistant header
    assert len(tokens) <= 90 and tokens[:3] == header and tokens[-12:] == footer
    assert tokenizer.decode(tokens).count("word0") == 1 and task.truncated_prompts == 1
    with pytest.raises(ValueError, match=r"config.math.max_prompt_tokens=5 cannot hold the chat template"):
        MathTask(tokenizer, max_prompt_tokens=5, multiple_choice=True).prompt_tokens(MathProblem(question, "1"))


def test_evaluate_refuses_a_wave_with_fewer_answers_than_rows(monkeypatch):
    """A wave that lost answers is an error, not a shorter list zipped away (zip(strict=False) hid it)."""
    from optpo_jax.train import evaluation, waves

    setup = build_setup(_small_config())

    def short_wave(*args, **kwargs):
        wave = waves.sample_wave(*args, **kwargs)
        wave.answers = wave.answers[:3]
        return wave

    monkeypatch.setattr(evaluation, "sample_wave", short_wave)
    with pytest.raises(ValueError, match="zip"):
        evaluation.evaluate(setup.policy, setup.task, setup.eval_problems[:4], 2, __import__("jax").random.key(0),
                            setup.eval_sampling, rows_per_wave=8, progress=False)


def test_a_wave_that_loses_votes_is_an_error_even_under_python_O(monkeypatch):
    """The votes-counted check in the wave loop is a RuntimeError, not an assert (removed by -O)."""
    import jax

    from optpo_jax.train import rollouts as rollouts_module

    setup = build_setup(_small_config())
    real_count = rollouts_module.count_votes

    def losing_count(votes, answer_slots, wave, sprt, prior_state=None):
        wave.valid = wave.valid.copy()
        wave.valid[np.flatnonzero(wave.valid)[0]] = False  # one row's vote goes missing
        return real_count(votes, answer_slots, wave, sprt, prior_state)

    monkeypatch.setattr(rollouts_module, "count_votes", losing_count)
    with pytest.raises(RuntimeError, match="voting rows added"):
        rollouts_module.collect_rollouts(setup.policy.params, setup.policy.config, setup.task,
                                         setup.train_problems[:4], setup.learner.config, jax.random.key(0))


def test_record_votes_reads_a_lora_run_with_its_own_config(tmp_path):
    """experiments/record_votes.py on a LoRA run (it once restored with a full-params optimizer template and could
    not): the votes are those of the base with the run's adapters merged in (reference: run_eval on the merge)."""
    import importlib.util

    import jax

    from optpo_jax.train.checkpoints import Checkpointer
    from optpo_jax.train.loop import init_train_state, run_eval

    config = _small_config(**{"lora.rank": 4, "data.num_prompts": 4})
    setup = build_setup(config)
    state = init_train_state(setup)
    adapters = jax.tree.map(lambda leaf: leaf + 0.05, state.params)  # B != 0: the merge differs from the base
    state = state.replace(params=adapters)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(1, {"params": state.params, "opt_state": state.opt_state}, {"step": 1})
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

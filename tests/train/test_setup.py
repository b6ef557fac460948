"""optpo_jax/train/setup.py: build_setup's tasks, models, prompts and config checks before a run starts."""

import json
import sys
import types

import pytest

from optpo_jax.default_config import math_config
from optpo_jax.tasks.arithmetic import SHIFTED, ArithmeticTask, generate_problems
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.setup import build_setup, problems_of, resolve_model_path
from tests.doc_blocks import code_blocks
from tests.hf_checkpoints import write_checkpoint
from tests.run_configs import small_config, tiny_config


def _readme_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's "Your own model, data and task" section."""
    return code_blocks("README.md", language, "Your own model, data and task")


def test_a_task_object_replaces_config_task_and_steps_0_is_one_epoch():
    class Sums(ArithmeticTask):
        def problems(self, config):
            return generate_problems(12, SHIFTED, seed=3), None

    task = Sums()
    config = small_config(steps=0)
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
    setup = build_setup(small_config(task="my_tasks:make_task"))
    assert type(setup.task).__name__ == "Mine"
    for spec, message in (("no_such_module:make", "cannot import module 'no_such_module'"),
                          ("my_tasks:missing", "module 'my_tasks' has no callable 'missing'"),
                          ("my_tasks:make_nothing", "the task int lacks stop_token_ids"),
                          ("arithmetics", "config.task must be one of \\('arithmetic', 'math'\\) or 'module:factory'")):
        with pytest.raises(ConfigError, match=message):
            build_setup(small_config(task=spec))


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


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A tiny random Qwen2 with its tokenizer; its context (max_position_embeddings) is 256 tokens."""
    folder = tmp_path_factory.mktemp("qwen2")
    write_checkpoint("qwen2", folder)
    return folder


def _math(model_path, tmp_path, **overrides):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps([{"prompt": "w5 w9", "answer": "3"}, {"prompt": "w7", "answer": "4"}]))
    config = math_config("aime", "optpo")
    config.model_path, config.model_dtype = str(model_path), "float32"
    config.data.path, config.data.num_prompts = str(problems), 2
    config.prompts_per_step, config.rows_per_wave = 2, 8
    config.sampling.update({"max_new_tokens": 12, "prompt_buckets": (32,)})
    config.math.max_prompt_tokens = 32
    config.policy_update.update({"micro_batch_rows": 8, "grad_accumulation": 1})
    config.update_from_flattened_dict(overrides)
    return config


def test_a_wave_wider_than_the_shipped_policys_context_is_refused():
    """The shipped arithmetic policy has 128 positions: the bucket 24 + 120 new tokens does not fit."""
    with pytest.raises(ConfigError, match=r"largest of config\.sampling\.prompt_buckets=\(24,\) \+ "
                                          r"config\.sampling\.max_new_tokens=120 = 144 tokens exceed the context of "
                                          r"the shipped arithmetic policy \(max_position_embeddings=128\)"):
        build_setup(tiny_config(**{"sampling.max_new_tokens": 120}))


def test_a_checkpoints_context_is_read_before_its_weights(qwen2_folder, tmp_path):
    config = _math(qwen2_folder, tmp_path, **{"math.max_prompt_tokens": 300, "sampling.prompt_buckets": (128, 512)})
    with pytest.raises(ConfigError, match=r"config\.math\.max_prompt_tokens=300 \(padded to 512 .*= 524 tokens "
                                          r"exceed the context of config\.model_path=.*max_position_embeddings=256"):
        build_setup(config)


def test_prompts_longer_than_every_bucket_are_refused_before_the_run():
    """Before: the first wave raised in the middle of the run (a traceback from the CLI)."""
    with pytest.raises(ConfigError, match=r"config\.sampling\.prompt_buckets=\(2,\): a prompt of \d+ tokens .*"
                                          r"exceeds the largest bucket"):
        build_setup(tiny_config(**{"sampling.prompt_buckets": (2,)}))


def test_math_prompts_are_measured_as_cut_and_not_counted_as_cut(tmp_path):
    """max_prompt_tokens=1024 over a bucket of 64 runs while every prompt fits (the README's command);
    a longer prompt is named before the run, and nothing is counted as truncated meanwhile."""
    from optpo_jax.tasks.math import MathTask
    from tests.hf_checkpoints import tiny_tokenizer

    task = MathTask(tiny_tokenizer(), max_prompt_tokens=1024, multiple_choice=True)
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps([{"prompt": "w5 w9", "answer": "3"}, {"prompt": "w7 " * 100, "answer": "4"}]))
    config = tiny_config(task="math", **{"data.path": str(problems), "data.num_prompts": 0,
                                         "sampling.prompt_buckets": (64,)})
    with pytest.raises(ValueError, match=r"config\.sampling\.prompt_buckets=\(64,\): a prompt of 1\d\d tokens "
                                         r"\(problem 1\) exceeds the largest bucket; add a bucket >= 1\d\d"):
        problems_of(config, task)
    config.sampling.prompt_buckets = (64, 256)
    assert len(problems_of(config, task)[0]) == 2
    task.max_prompt_tokens = 32  # cut to 32 tokens: the bucket 64 holds every prompt
    config.sampling.prompt_buckets = (64,)
    assert len(problems_of(config, task)[0]) == 2
    assert task.truncated_prompts == 0


@pytest.mark.parametrize("name", ["./no/such/checkpoint", "/no/such/checkpoint", "~/no_such_checkpoint_dir"])
def test_a_model_path_that_does_not_exist_is_named(name):
    with pytest.raises(ValueError, match=rf"^config\.model_path: no such checkpoint directory: {name}$"):
        resolve_model_path(name)
    with pytest.raises(ConfigError, match=r"config\.model_path: no such checkpoint directory"):
        build_setup(tiny_config(model_path=name))  # the arithmetic task reads a directory too


def test_a_missing_tokenizer_says_what_to_do_from_the_cli(qwen2_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in qwen2_folder.iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and file.suffix != ".jinja":
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ConfigError, match=r"config\.model_path=.*bare.* has no tokenizer .*tokenizer\.json.*"
                                          r"copy its tokenizer files") as error:
        build_setup(_math(bare, tmp_path))
    assert "load_tokenizer" not in str(error.value)  # not an argument the CLI can pass


def test_held_out_mode_without_a_held_out_file_names_the_field(tmp_path):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps([{"prompt": "1+1", "answer": "2"}]))
    task = types.SimpleNamespace(truncated_prompts=0)  # a task without problems(): the files are read
    config = tiny_config(task="math", **{"data.path": str(problems), "data.mode": "held_out", "data.num_prompts": 0})
    with pytest.raises(ValueError, match=r"config\.data\.mode='held_out' needs config\.data\.held_out_path"):
        problems_of(config, task)
    config.data.held_out_path = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"^config\.data\.held_out_path: no such file: .*missing\.json"):
        problems_of(config, task)


def test_a_lora_rank_above_the_models_width_is_named():
    from optpo_jax.train.setup import build_setup

    with pytest.raises(ConfigError, match=r"config.lora.rank=1000 exceeds \d+, the smaller side of the narrowest"):
        build_setup(tiny_config(**{"lora.rank": 1000}))


def test_min_rollouts_per_prompt_above_the_budget_is_a_config_error():
    from optpo_jax.train.config_checks import ConfigError

    with pytest.raises(ConfigError, match=r"min_rollouts_per_prompt=9 must not exceed sprt.max_samples=8"):
        build_setup(tiny_config(**{"policy_update.min_rollouts_per_prompt": 9}))


@pytest.mark.parametrize(
    "field, value, message",
    [("sprt.threshold", 1.5, "threshold"), ("data.mode", "mixed", "data.mode"), ("steps", -1, "config.steps"),
     ("sampling.top_p", 0.0, "top_p"), ("optimizer.learning_rate", -1.0, "learning_rate"),
     ("policy_update.epochs", 0, "epochs")],
)
def test_invalid_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_setup(tiny_config(**{field: value}))

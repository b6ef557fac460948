"""Issue items 11 and 12 (reliability): values the checks used to accept that cannot run, and
mistakes that ended in a traceback instead of one line naming the field (or file) and the value.

Each test failed on the code before the fix.
"""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hf_checkpoints import write_checkpoint
from test_loop import tiny_config

from optpo_jax.default_config import math_config
from optpo_jax.models.config import PRESETS
from optpo_jax.tasks.data import load_problems
from optpo_jax.train.config_checks import ConfigError, validate_config
from optpo_jax.train.memory_plan import parse_bytes, run_shape
from optpo_jax.train.setup import build_setup, problems_of, resolve_model_path


def _cli(*args):
    # check=False: the tests read the return code and the one-line error themselves.
    return subprocess.run([sys.executable, "-m", "optpo_jax.cli", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def _one_line_error(result, start: str) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optpo-jax: error: {start}"), last
    return last


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


# Item 11: a wave wider than the model's context (an XLA out-of-memory, or positions past the model's).

def test_item11_the_issue_example_is_refused_by_the_plan_naming_the_fields():
    """math.max_prompt_tokens=5000 padded to the bucket 8192, on a 1,024-token model."""
    config = math_config("math500")
    config.math.max_prompt_tokens = 5000
    config.sampling.prompt_buckets = (128, 8192)
    model = dataclasses.replace(PRESETS["qwen2.5-math-1.5b"], max_position_embeddings=1024)
    with pytest.raises(ConfigError, match=r"config\.math\.max_prompt_tokens=5000 \(padded to 8192 .*"
                                          r"config\.sampling\.prompt_buckets=\(128, 8192\)\) \+ "
                                          r"config\.sampling\.max_new_tokens=3072 = 11264 tokens exceed .*"
                                          r"max_position_embeddings=1024"):
        run_shape(config, model)
    run_shape(math_config("math500"))  # the shipped config: 1024 + 3072 = the model's 4096 exactly


def test_item11_train_refuses_a_wave_wider_than_the_shipped_policys_context():
    """The shipped arithmetic policy has 128 positions: the bucket 24 + 120 new tokens does not fit."""
    with pytest.raises(ConfigError, match=r"largest of config\.sampling\.prompt_buckets=\(24,\) \+ "
                                          r"config\.sampling\.max_new_tokens=120 = 144 tokens exceed the context of "
                                          r"the shipped arithmetic policy \(max_position_embeddings=128\)"):
        build_setup(tiny_config(**{"sampling.max_new_tokens": 120}))


def test_item11_a_checkpoints_context_is_read_before_its_weights(qwen2_folder, tmp_path):
    config = _math(qwen2_folder, tmp_path, **{"math.max_prompt_tokens": 300, "sampling.prompt_buckets": (128, 512)})
    with pytest.raises(ConfigError, match=r"config\.math\.max_prompt_tokens=300 \(padded to 512 .*= 524 tokens "
                                          r"exceed the context of config\.model_path=.*max_position_embeddings=256"):
        build_setup(config)


def test_item11_data_num_prompts_has_an_upper_bound():
    with pytest.raises(ConfigError, match=r"config\.data\.num_prompts must be an integer in \[1, 1000000\].*"
                                          r"got 100000000"):
        validate_config(tiny_config(**{"data.num_prompts": 100_000_000}))
    validate_config(tiny_config(**{"data.num_prompts": 10**6}))


# Item 12: one line instead of a traceback.

def test_item12_prompts_longer_than_every_bucket_are_refused_before_the_run():
    """Before: the first wave raised in the middle of the run (a traceback from the CLI)."""
    with pytest.raises(ConfigError, match=r"config\.sampling\.prompt_buckets=\(2,\): a prompt of \d+ tokens .*"
                                          r"exceeds the largest bucket"):
        build_setup(tiny_config(**{"sampling.prompt_buckets": (2,)}))


def test_item12_math_prompts_are_measured_as_cut_and_not_counted_as_cut(tmp_path):
    """max_prompt_tokens=1024 over a bucket of 64 runs while every prompt fits (the README's command);
    a longer prompt is named before the run, and nothing is counted as truncated meanwhile."""
    from hf_checkpoints import tiny_tokenizer

    from optpo_jax.tasks.math import MathTask

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


def test_item12_distributed_on_one_host_is_one_line(tmp_path):
    result = _cli("train", "--config.distributed=True", f"--workdir={tmp_path / 'run'}")
    last = _one_line_error(result, "config.distributed=True")
    assert "config.distributed=False" in last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_item12_json_nested_100000_deep_is_a_value_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"deep\{suffix}: .*too deeply"):
        load_problems(str(path))


@pytest.mark.parametrize("name", ["./no/such/checkpoint", "/no/such/checkpoint", "~/no_such_checkpoint_dir"])
def test_item12_a_model_path_that_does_not_exist_is_named(name):
    with pytest.raises(ValueError, match=rf"^config\.model_path: no such checkpoint directory: {name}$"):
        resolve_model_path(name)
    with pytest.raises(ConfigError, match=r"config\.model_path: no such checkpoint directory"):
        build_setup(tiny_config(model_path=name))  # the arithmetic task reads a directory too


def test_item12_a_missing_tokenizer_says_what_to_do_from_the_cli(qwen2_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in qwen2_folder.iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and file.suffix != ".jinja":
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ConfigError, match=r"config\.model_path=.*bare.* has no tokenizer .*tokenizer\.json.*"
                                          r"copy its tokenizer files") as error:
        build_setup(_math(bare, tmp_path))
    assert "load_tokenizer" not in str(error.value)  # not an argument the CLI can pass


def test_item12_held_out_mode_without_a_held_out_file_names_the_field(tmp_path):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps([{"prompt": "1+1", "answer": "2"}]))
    task = types.SimpleNamespace(truncated_prompts=0)  # a task without problems(): the files are read
    config = tiny_config(task="math", **{"data.path": str(problems), "data.mode": "held_out", "data.num_prompts": 0})
    with pytest.raises(ValueError, match=r"config\.data\.mode='held_out' needs config\.data\.held_out_path"):
        problems_of(config, task)
    config.data.held_out_path = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"^config\.data\.held_out_path: no such file: .*missing\.json"):
        problems_of(config, task)


@pytest.mark.parametrize("text", ["abc", "1e400GB", "0GB", "1.2.3GB", "nanGB"])
def test_item12_a_bad_device_memory_is_a_config_error(text):
    with pytest.raises(ConfigError, match=rf"--device_memory must be .*got {text!r}"):
        parse_bytes(text)


def test_item12_plan_flags_end_as_one_line(capsys):
    """In this process (the command's one-line exit text); one run as a command shows there is no traceback."""
    from cli_in_process import run_command

    for memory in ("1e400GB", "abc"):
        code, _, _ = run_command(capsys, "plan", "--device_memory", memory)
        assert code.startswith("optpo-jax: error: --device_memory must be")
    for devices in ("0", "-1"):
        code, _, _ = run_command(capsys, "plan", "--devices", devices)
        assert code.startswith("optpo-jax: error: --devices must be a positive") and code.endswith(f"got {devices}")
    _one_line_error(_cli("plan", "--devices", "0"), "--devices must be a positive")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_5000_digit_integer_answer_loads_exactly(tmp_path, suffix):
    """Python refuses int <-> str over 4300 digits; the loader once raised that with no file or row."""
    from optpo_jax.tasks.data import load_problems

    record = '{"prompt": "p", "answer": ' + "9" * 5000 + "}"
    path = tmp_path / f"big{suffix}"
    path.write_text(f"[{record}]" if suffix == ".json" else record + "\n")
    assert load_problems(str(path))[0].answer == "9" * 5000

"""optpo_jax/cli.py: the command line's help, flags, one-line errors, and the eval / plan commands."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from optpo_jax.cli import COMMAND_FLAGS, COMMANDS
from tests.cli_in_process import run_command
from tests.doc_blocks import code_blocks
from tests.run_configs import run_files


def _help(*args):
    return subprocess.run([sys.executable, "-m", "optpo_jax.cli", *args], check=False, capture_output=True, text=True,
                          timeout=60)


def test_top_level_help_exits_0_and_lists_the_commands():
    result = _help("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"optpo-jax {name}" in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_exits_0_with_its_own_flags(name):
    """``optpo-jax plan --help`` once printed absl's generic usage and exited 1; now each command lists the flags
    it reads, with their help text and defaults."""
    result = _help(name, "--help" if name != "train" else "-h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: optpo-jax {name} [flags]")
    for flag in COMMAND_FLAGS[name]:
        assert f"  --{flag}: " in result.stdout
    other = {flag for flags in COMMAND_FLAGS.values() for flag in flags} - set(COMMAND_FLAGS[name])
    assert not any(f"  --{flag}: " in result.stdout for flag in other)


@pytest.mark.parametrize("override", ["--config.sprt.nonexistent=1", "--baseline_config.grpo.bogus=2"])
def test_an_override_of_a_field_the_config_lacks_is_one_line(override):
    """ml_collections applies overrides while the flags are defined and raised a bare AttributeError traceback."""
    result = _help("compare", override, "--workdir=/nonexistent/never")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"optpo-jax: error: {override.split('=')[0]}: the config has no such field (the fields are in "
        "optpo_jax/default_config.py)")


def _cli(*args):
    # check=False: the tests read the return code and the one-line error themselves.
    return subprocess.run([sys.executable, "-m", "optpo_jax.cli", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def _one_line_error(result, start: str) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optpo-jax: error: {start}"), last
    return last


def test_distributed_on_one_host_is_one_line(tmp_path):
    result = _cli("train", "--config.distributed=True", f"--workdir={tmp_path / 'run'}")
    last = _one_line_error(result, "config.distributed=True")
    assert "config.distributed=False" in last
    assert not (tmp_path / "run").exists()


def test_plan_flags_end_as_one_line(capsys):
    """In this process (the command's one-line exit text); one run as a command shows there is no traceback."""
    from tests.cli_in_process import run_command

    for memory in ("1e400GB", "abc"):
        code, _, _ = run_command(capsys, "plan", "--device_memory", memory)
        assert code.startswith("optpo-jax: error: --device_memory must be")
    for devices in ("0", "-1"):
        code, _, _ = run_command(capsys, "plan", "--devices", devices)
        assert code.startswith("optpo-jax: error: --devices must be a positive") and code.endswith(f"got {devices}")
    _one_line_error(_cli("plan", "--devices", "0"), "--devices must be a positive")


def test_the_cli_prints_a_config_error_as_one_line(tmp_path):
    result = _cli("train", "--config.optimizer.max_grad_norm=-1", f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("optpo-jax: error: config.optimizer.max_grad_norm")
    compare = _cli("compare", "--baseline_config.sprt.threshold=1.5", f"--workdir={tmp_path / 'cmp'}")
    assert compare.returncode != 0 and "config.sprt.threshold" in compare.stderr
    assert not (tmp_path / "cmp" / "optpo").exists()  # the baseline was checked before the first run


def test_eval_reads_the_runs_config_and_refuses_flags_that_differ(lora_run_copy, capsys):
    """A LoRA run evaluated with no config flags reproduces its own final evaluation (same samples and seed);
    --config.lora.* that differ are refused, naming them (they once gave pass@1 0.0 and exit 0)."""
    summary = json.loads((lora_run_copy / "summary.json").read_text())
    code, out, _ = run_command(capsys, "eval", f"--workdir={lora_run_copy}")
    assert code == 0 and f"evaluating {lora_run_copy} at step 2" in out
    assert json.loads(out[out.index("{"):]) == summary["after"]
    # Overrides reach ml_collections from the process's own command line, so these run as commands.
    refused = _cli("eval", f"--workdir={lora_run_copy}", "--config.lora.rank=8", "--config.lora.alpha=1000")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("optpo-jax: error: eval uses the run's own config")
    assert "config.lora.alpha: 16.0 -> 1000" in refused.stderr and "config.lora.rank: 4 -> 8" in refused.stderr
    export = _cli("export", f"--workdir={lora_run_copy}", f"--out={lora_run_copy.parent / 'model'}", "--config.lora.alpha=1000")
    assert export.returncode != 0 and "config.lora.alpha" in export.stderr
    assert not (lora_run_copy.parent / "model").exists()


def test_eval_of_a_workdir_without_a_run_is_an_error_and_export_never_writes_into_a_run(lora_run_copy, tmp_path, capsys):
    code, _, _ = run_command(capsys, "eval", f"--workdir={tmp_path / 'reff'}")
    assert "holds no run" in code
    before = run_files(lora_run_copy)
    code, _, _ = run_command(capsys, "export", f"--workdir={lora_run_copy}", f"--out={lora_run_copy}")
    assert "holds a training run" in code and run_files(lora_run_copy) == before
    (tmp_path / "a_file").write_text("x")
    code, _, _ = run_command(capsys, "export", f"--workdir={lora_run_copy}", f"--out={tmp_path / 'a_file'}")
    assert "is a file, not a directory" in code


def _readme_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's "Your own model, data and task" section."""
    return code_blocks("README.md", language, "Your own model, data and task")


def test_readme_own_model_and_data_command_runs_as_printed(tmp_path):
    """The README's command on a tiny random Qwen2 (my_model/) and a JSONL of 4 problems: steps=0 gives
    4 / 2 = 2 steps; a random model answers nothing, which the metrics and a warning say."""
    from tests.tasks.test_math import write_tiny_qwen

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


def test_compare_seed_from_and_match_are_checked_before_any_run(tmp_path, capsys):
    """--seed_from K --seeds N runs seeds K..K+N-1 (so one study's seeds can be spread over machines);
    --match rollouts needs the seeds layout. Both refusals come before a run starts."""
    result = _cli("compare", "--seeds", "2", "--seed_from", "5", "--config", "configs/arith_optpo.py",
                  "--config.seed=1", f"--workdir={tmp_path / 'cmp'}")
    assert _one_line_error(result, "--seeds 2") == (
        "optpo-jax: error: --seeds 2 runs config.seed 5..6 for both methods: leave config.seed at 0 (it would be "
        "replaced)")
    code, _, _ = run_command(capsys, "compare", "--match", "rollouts", f"--workdir={tmp_path / 'cmp'}")
    assert code.startswith("optpo-jax: error: match must be one of ('steps', 'rollouts')")
    assert not (tmp_path / "cmp").exists()

"""The command line's own surface: help for the whole command and for each subcommand."""

import subprocess
import sys

import pytest

from optpo_jax.cli import COMMAND_FLAGS, COMMANDS


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

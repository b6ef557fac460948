"""``optpo-jax COMMAND --flags`` run in the test's own process (no interpreter and JAX start-up per call)."""

from absl import flags

from optpo_jax import cli


def run_command(capsys, name: str, *args: str) -> tuple[object, str, str]:
    """(exit, stdout, stderr) of ``cli.COMMANDS[name]`` with ``args`` parsed as ``main`` would parse them; exit is
    0, or what the command passed to ``sys.exit`` (the one-line error text)."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["optpo-jax", *args])
    try:
        cli.COMMANDS[name]([])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        flags.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    return code, captured.out, captured.err

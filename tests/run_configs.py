"""Tiny run configs and run folders shared by the tests of whole runs."""

import fcntl
import os
import shutil
from pathlib import Path

from optpo_jax.default_config import arithmetic_config

LORA = {"lora.rank": 4, "lora.alpha": 16.0}


def tiny_config(method="optpo", **overrides):
    config = arithmetic_config(method)
    config.data.num_prompts = 8
    config.prompts_per_step = 4
    config.steps = 3
    config.rows_per_wave = 32
    config.sprt.max_samples = 8
    config.sprt.min_samples = 2
    config.policy_update.micro_batch_rows = 32
    config.policy_update.train_samples_per_prompt = 0 if method == "optpo" else 4
    config.eval.final_samples = 4
    config.eval.samples = 2
    config.eval.every_steps = 2
    config.checkpoint_every = 1
    # One update shape (every micro-batch padded to 32 rows at the full width), so a tiny run compiles its
    # update once: fitted micro-batches are tested on their own (test_fitted_micro_batches_train_like_padded_ones).
    config.policy_update.update(width_bucket=0, row_buckets=1)
    config.update_from_flattened_dict(overrides)
    return config


def small_config(**overrides):
    """The embedded OptPO config on 8 prompts, 4 a step, waves of 32 rows (its other settings as shipped)."""
    config = arithmetic_config("optpo")
    config.data.num_prompts, config.prompts_per_step, config.rows_per_wave = 8, 4, 32
    config.update_from_flattened_dict(overrides)
    return config


def run_files(workdir: Path) -> dict:
    """{relative path: bytes} of every file in ``workdir`` but its lock: what a refused command must leave as it was."""
    return {str(path.relative_to(workdir)): path.read_bytes() for path in sorted(workdir.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def shared_run(tmp_path_factory, name: str, config) -> Path:
    """The workdir of a run of ``config`` trained once per test session, however many xdist workers ask: the
    first trains it under a lock, the others wait and reuse it (tests copy it before changing it)."""
    from optpo_jax.train.loop import train

    base = tmp_path_factory.getbasetemp()
    # Workers' temp folders share the session's parent; without xdist the parent is shared by past sessions.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, workdir = root / f"shared_{name}", root / f"shared_{name}" / "run"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "trained").exists():
            shutil.rmtree(folder, ignore_errors=True)
            train(config, workdir, progress=False)
            (folder / "trained").touch()
    return workdir


def copy_run(source: Path, folder: Path) -> Path:
    """A copy of the run in ``source`` at ``folder / "run"``, without its lock file."""
    copy = folder / "run"
    shutil.copytree(source, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy

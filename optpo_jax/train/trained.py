"""A trained run read back from its workdir: its saved config, its setup and a checkpoint's state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.fingerprints import check_fingerprints
from optpo_jax.train.setup import Setup, build_setup
from optpo_jax.train.state import TrainState, restore_state
from optpo_jax.train.workdir import WorkdirError, read_json, with_current_names


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run saved in ``workdir`` (its config.json) as a ConfigDict, fields renamed since under their
    current names (``workdir.RENAMED_FIELDS``); WorkdirError without one."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise WorkdirError(f"{workdir} holds no run: {path} is missing")
    saved = read_json(path, "it was cut while being written: train the run again with --overwrite, or restore the file")
    return ml_collections.ConfigDict(with_current_names(saved))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's setup and the TrainState of one of its checkpoints (``step``)."""

    setup: Setup
    state: TrainState
    step: int

    def policy_params(self):
        """The trained policy's full params (with LoRA: the frozen base with the adapters merged in)."""
        return self.state.policy_params()


def load_trained(config, workdir: str | Path, step: int | None = None, doing: str = "load") -> TrainedRun:
    """The run in ``workdir`` under ``config`` (usually ``load_run_config(workdir)``) at a checkpoint (the latest,
    or ``step``), LoRA runs included.

    WorkdirError when the workdir holds no checkpoint, or when the task, data or initial policy
    ``config`` reads differ from the run's (``fingerprints.check_fingerprints``; ``doing`` names
    the command in that message); CheckpointError when the checkpoint does not verify.
    """
    setup = build_setup(config)
    check_fingerprints(workdir, setup, doing)
    if not (Path(workdir) / "checkpoints").is_dir():  # checked first: a Checkpointer would create the folder
        raise WorkdirError(f"{workdir} holds no checkpoint")
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise WorkdirError(f"{workdir} holds no checkpoint")
    state, _, _ = restore_state(checkpointer, setup.initial_state(), step)
    return TrainedRun(setup, state, step)

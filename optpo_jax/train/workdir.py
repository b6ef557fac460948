"""A run's working directory: one run at a time, never two runs mixed.

- ``WorkdirLock``: an exclusive lock (``fcntl.flock`` on ``workdir/.lock``), released by
  the kernel when the process ends, even on SIGKILL; a second run stops naming the pid.
- ``check_fresh_start``: training into a workdir that holds a run needs ``--resume`` or
  ``--overwrite`` (which removes the old run first).
- ``check_resumable``: a resumed run must be the same run: the saved ``config.json`` is
  compared with the new config, and only ``RESUMABLE_FIELDS`` may differ.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Self

from optpo_jax.models.lora import PROJECTIONS
from optpo_jax.tasks.math import TTRL_INSTRUCTION

# What a run writes; --overwrite removes exactly these.
RUN_FILES = ("checkpoints", "carry", "tb", "metrics.jsonl", "config.json", "summary.json", "final_eval.json")

# Fields a resumed run may change: they decide how long it runs and what it evaluates or
# how it is laid out on devices, not what it computes up to the restored step. ``steps``
# only where the learning-rate schedule does not depend on it (see ``check_resumable``).
RESUMABLE_FIELDS = ("steps", "eval.every_steps", "eval.samples", "checkpoint_every", "mesh.data", "mesh.fsdp",
                    "mesh.tensor", "remat", "distributed")


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked (held by another run, holds another run, ...)."""


class WorkdirLock:
    """Holds ``workdir/.lock`` exclusively while the run lives (context manager)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self.handle = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise WorkdirError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end "
                               "or use another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def holds_run(workdir: Path) -> bool:
    """Whether ``workdir`` holds files of an earlier run."""
    return any((Path(workdir) / name).exists() for name in RUN_FILES)


def check_fresh_start(workdir: Path, overwrite: bool) -> None:
    """Refuses to start a new run over an old one unless ``overwrite``, which removes the old run."""
    workdir = Path(workdir)
    if not holds_run(workdir):
        return
    if not overwrite:
        raise WorkdirError(f"{workdir} holds a run already: pass --resume to continue it, or --overwrite to "
                           "remove it and start again (or choose another --workdir)")
    for name in RUN_FILES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# Fields added after runs were saved, with the value that reproduces those runs: a saved config
# without the field resumes with this value (and only with it).
ADDED_FIELDS = {"policy_update.min_rollouts_per_prompt": 0, "policy_update.optimizer_steps": 0,
                "sprt.margin_p0": 0.75, "sprt.learn_prior": False,
                "lora.rank": 0, "lora.alpha": 16.0, "lora.targets": ",".join(PROJECTIONS),
                "reward": "consensus", "model_dtype": "float32", "data.path": "", "data.held_out_path": "",
                "data.prompt_field": "prompt", "data.answer_field": "answer", "math.instruction": TTRL_INSTRUCTION,
                "math.max_prompt_tokens": 1024, "math.multiple_choice": False, "math.timeout_seconds": 2}


def check_resumable(workdir: Path, config) -> None:
    """Refuses to resume with a config that defines another run than the one saved in ``workdir``.

    Raises WorkdirError listing every differing field that may not change (old -> new).
    """
    saved_path = Path(workdir) / "config.json"
    if not saved_path.exists():
        raise WorkdirError(f"--resume: {saved_path} is missing, so this cannot be checked to be the same run")
    saved = {**ADDED_FIELDS, **flatten(json.loads(saved_path.read_text()))}
    new = {**ADDED_FIELDS, **flatten(json.loads(config.to_json_best_effort()))}
    allowed = set(RESUMABLE_FIELDS)
    schedule_uses_steps = new.get("optimizer.schedule") != "constant" or new.get("optimizer.warmup_fraction", 0) > 0
    if schedule_uses_steps:
        allowed.discard("steps")  # the learning-rate schedule is laid out over the steps
    changed = [f"config.{name}: {saved.get(name, '<absent>')!r} -> {new.get(name, '<absent>')!r}"
               for name in sorted(set(saved) | set(new)) if saved.get(name) != new.get(name) and name not in allowed]
    if changed:
        raise WorkdirError(
            f"--resume with a config that defines another run than the one in {workdir}:\n  " + "\n  ".join(changed)
            + f"\nOnly these may change on resume: {', '.join(RESUMABLE_FIELDS)}"
            + (" (steps not with this learning-rate schedule, which spans the steps)" if schedule_uses_steps else "")
            + ". Use another --workdir, or --overwrite to start this one again."
        )

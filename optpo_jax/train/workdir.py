"""A run's working directory: one run at a time, never two runs mixed.

- ``WorkdirLock``: an exclusive lock (``fcntl.flock`` on ``workdir/.lock``), released by
  the kernel when the process ends, even on SIGKILL; a second run stops naming the pid.
- ``check_fresh_start``: training into a workdir that holds a run needs ``--resume`` or
  ``--overwrite`` (which removes the old run first).
- ``check_resumable``: a resumed run must be the same run: the saved ``config.json`` is
  compared with the new config, and only ``RESUMABLE_FIELDS`` may differ.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Self

from optpo_jax.models.lora import PROJECTIONS
from optpo_jax.tasks.math import TTRL_INSTRUCTION

# What a run writes; --overwrite removes exactly these.
RUN_FILES = ("checkpoints", "carry", "tb", "metrics.jsonl", "config.json", "summary.json", "final_eval.json",
             "fingerprints.json")

# Fields a resumed run may change: they decide how long it runs and what it evaluates or
# how it is laid out on devices, not what it computes up to the restored step. ``steps``
# only where the learning-rate schedule does not depend on it (see ``check_resumable``).
RESUMABLE_FIELDS = ("steps", "rollout_budget", "eval.every_steps", "eval.samples", "checkpoint_every", "mesh.data", "mesh.fsdp",
                    "mesh.tensor", "remat", "attention", "distributed")


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked (held by another run, holds another run, ...)."""


class WorkdirLock:
    """Holds ``workdir/.lock`` exclusively while the run lives (context manager)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self.handle = None

    def __enter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:  # a file where a folder should be, a read-only or full disk, a .lock folder
            raise WorkdirError(f"cannot use {self.path.parent} as a workdir: {error.strerror or error} "
                               f"({error.filename or self.path}); choose another --workdir") from None
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


def model_type_in(directory: Path) -> str | None:
    """What model ``directory`` holds when it holds a model rather than a run: "a <model_type> checkpoint"
    (a Hugging Face config.json), "LoRA adapters" (PEFT's adapter_config.json), or None."""
    directory = Path(directory)
    if (directory / "adapter_config.json").exists():
        return "LoRA adapters"
    try:
        saved = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and "model_type" in saved and "sprt" not in saved:
        return f"a {saved['model_type']} checkpoint"
    return "a checkpoint" if any(directory.glob("*.safetensors")) else None


def check_fresh_start(workdir: Path, overwrite: bool) -> None:
    """Refuses to start a new run over an old one unless ``overwrite`` (``remove_run`` removes it once every
    other check has passed), and refuses a model directory even then (its config.json is the model's)."""
    workdir = Path(workdir)
    model = model_type_in(workdir)
    if model is not None:
        raise WorkdirError(f"{workdir} holds {model}, not a run: choose another --workdir (--overwrite would "
                           "replace the model's config.json)")
    if holds_run(workdir) and not overwrite:
        raise WorkdirError(f"{workdir} holds a run already: pass --resume to continue it, or --overwrite to "
                           "remove it and start again (or choose another --workdir)")


def remove_run(workdir: Path) -> None:
    """Removes the files of the run in ``workdir`` (``--overwrite``, after every check has passed)."""
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
                "math.max_prompt_tokens": 1024, "math.multiple_choice": False, "math.timeout_seconds": 2,
                "sampling.schedule": "waves", "sampling.on_stop": "finish",
                "policy_update.pack_width": 0, "attention": "reference",
                "policy_update.subsample": "random", "policy_update.vote_weights": "all", "rollout_budget": 0,
                "algorithm": "grpo", "ppo.gamma": 1.0, "ppo.lam": 1.0, "ppo.value_clip": 0.5,
                "ppo.whiten_advantages": True, "ppo.critic_learning_rate": 1e-4}


# Fields renamed after runs were saved: old dotted name -> new. A saved config is read under the new names.
RENAMED_FIELDS = {"policy_update.advantage_mode": "policy_update.advantage_estimator"}


def with_current_names(saved: dict) -> dict:
    """A copy of the nested config dict ``saved`` with ``RENAMED_FIELDS`` under their new names."""
    renamed = copy.deepcopy(saved)
    for old, new in RENAMED_FIELDS.items():
        *old_sections, old_name = old.split(".")
        section = renamed
        for name in old_sections:
            section = section.get(name, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict) and old_name in section:
            value = section.pop(old_name)
            *new_sections, new_name = new.split(".")
            target = renamed
            for name in new_sections:
                target = target.setdefault(name, {})
            target[new_name] = value
    return renamed


def in_fields(name: str, fields) -> bool:
    """Whether the dotted field ``name`` is one of ``fields``: a name, or a section ending in "."."""
    return any(name == field or (field.endswith(".") and name.startswith(field)) for field in fields)


def config_differences(saved: dict, new: dict, allowed=()) -> list[str]:
    """``config.field: saved -> new`` for every field that differs (nested or already flattened dicts), except
    ``allowed`` fields (``in_fields``); fields added since ``saved`` was written take ``ADDED_FIELDS``, renamed
    ones their ``RENAMED_FIELDS`` name."""
    saved, new = {**ADDED_FIELDS, **flatten(with_current_names(saved))}, {**ADDED_FIELDS, **flatten(new)}
    return [f"config.{name}: {saved.get(name, '<absent>')!r} -> {new.get(name, '<absent>')!r}"
            for name in sorted(set(saved) | set(new))
            if saved.get(name) != new.get(name) and not in_fields(name, allowed)]


def check_resumable(workdir: Path, config) -> None:
    """Refuses to resume with a config that defines another run than the one saved in ``workdir``.

    Raises WorkdirError listing every differing field that may not change (old -> new).
    """
    saved_path = Path(workdir) / "config.json"
    if not saved_path.exists():
        raise WorkdirError(f"--resume: {saved_path} is missing, so this cannot be checked to be the same run")
    saved = read_json(saved_path, "it cannot be checked to be the same run: put back the run's config.json, "
                                  "or use --overwrite to start the run again (or another --workdir)")
    new = json.loads(config.to_json_best_effort())
    allowed = set(RESUMABLE_FIELDS)
    schedule_uses_steps = (config.optimizer.get("schedule") != "constant"
                           or config.optimizer.get("warmup_fraction", 0) > 0)
    if schedule_uses_steps:
        allowed.discard("steps")  # the learning-rate schedule is laid out over the steps
    changed = config_differences(saved, new, allowed)
    if changed:
        raise WorkdirError(
            f"--resume with a config that defines another run than the one in {workdir}:\n  " + "\n  ".join(changed)
            + f"\nOnly these may change on resume: {', '.join(RESUMABLE_FIELDS)}"
            + (" (steps not with this learning-rate schedule, which spans the steps)" if schedule_uses_steps else "")
            + ". Use another --workdir, or --overwrite to start this one again."
        )


def write_atomically(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a resumed run) finds the old file or the whole new one,
    never an empty or cut one: a temporary file in the same directory, flushed and fsynced, then renamed over
    ``path`` (``os.replace``, atomic within a filesystem). The new file gets the usual permissions (umask)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a crash once the folder is synced
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_json(path: str | Path, remedy: str):
    """The JSON in ``path``; WorkdirError naming the file and ``remedy`` (what to do) when it is empty or cut."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data)
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        state = "empty" if not data.strip() else f"cut or not JSON ({error})"
        raise WorkdirError(f"{path} is {state} (the run was interrupted while writing it?): {remedy}") from None


def read_json_lines(path: str | Path) -> tuple[list[dict], bool]:
    """(records, cut) of a JSON-lines file that is appended line by line (metrics.jsonl).

    A last line that is not a whole JSON record is what a kill while appending leaves: it is
    dropped and ``cut`` is True. A line before it that is not one is damage that no interruption
    explains: WorkdirError naming the file and the line number (nothing is skipped silently).
    Blank lines are ignored.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    records, cut = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            record, message = None, str(error)
        else:
            message = f"a JSON {type(record).__name__}, not a record"
        if isinstance(record, dict):
            records.append(record)
        elif number == last:  # the last line: an interrupted append
            cut = True
        else:
            raise WorkdirError(f"{path}, line {number}: not a JSON record ({message}); only a last line can be cut "
                               "by an interruption: repair or remove that line, or start the run again with "
                               "--overwrite")
    return records, cut

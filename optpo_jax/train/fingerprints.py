"""What a run's config alone does not pin down (task class, data, initial weights), saved and checked on reuse."""

from __future__ import annotations

import hashlib
from pathlib import Path

from optpo_jax.train.checkpoints import tree_checksums
from optpo_jax.train.setup import Setup
from optpo_jax.train.workdir import WorkdirError, read_json

FINGERPRINTS = "fingerprints.json"


def run_fingerprints(setup: Setup) -> dict:
    """What the config alone does not pin down: the task's class (``train(task=...)`` leaves config.task as it
    is), the prompts and answers (a replaced data file) and the initial policy's weights (checksums of every
    array), the last three as sha256 prefixes. Problems are read as given (their ``prompt`` and ``answer``, else
    their repr), not tokenized: tokenizing every prompt here would count truncations before any wave."""
    digest = lambda value: hashlib.sha256(repr(value).encode()).hexdigest()[:16]
    content = lambda problem: ((problem.prompt, getattr(problem, "answer", None)) if hasattr(problem, "prompt")
                               else problem)
    task = type(setup.task)
    return {"task": f"{task.__module__}.{task.__qualname__}",
            "train_prompts": digest([content(problem) for problem in setup.train_problems]),
            "eval_prompts": digest([content(problem) for problem in setup.eval_problems]),
            "initial_policy": digest(sorted(tree_checksums(setup.policy.params).items()))}


def check_fingerprints(workdir: str | Path, setup: Setup, doing: str) -> None:
    """Refuses to ``doing`` (resume, eval, export) the run in ``workdir`` with a setup whose task, prompts or
    initial policy differ from the run's (runs saved before fingerprints.json existed are not checked)."""
    path = Path(workdir) / FINGERPRINTS
    if not path.exists():
        return
    saved = read_json(path, "restore it, or start the run again with --overwrite")
    changed = [f"{name}: {saved[name]} -> {value}" for name, value in run_fingerprints(setup).items()
               if name in saved and saved[name] != value]
    if changed:
        raise WorkdirError(f"{doing}: the run's task, data or model differ from what this config now reads "
                           f"({'; '.join(changed)}): a data file or checkpoint directory was replaced, or the run "
                           "was trained with train(task=...) (use that task from Python). Put them back, or start "
                           "a new run in another --workdir")

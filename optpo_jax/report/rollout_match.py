"""``compare --match rollouts``: method A run on until it has drawn as many rollouts as method B's whole run.

On an accelerator generation dominates a step's cost (docs/accelerator.md), so the fair
question for a method that draws fewer rollouts is its pass@1 at B's rollouts. Per seed, A's
finished run (``seed{s}/{a}``) is copied to ``seed{s}/{a}_at_{b}_rollouts`` and resumed there
with ``rollout_budget`` = B's total rollouts and more steps (same prompts per step, the
batches continuing in order), so its first steps are A's equal-steps run itself and only the
extra steps cost time. It stops after the step at which it reaches the budget (overshooting by
under one step's rollouts, shown as the rollouts ratio of the report).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.loop import train
from optpo_jax.train.workdir import read_json

# The continued run may take this many times the steps a linear extrapolation of A's rollouts asks for:
# OptPO draws fewer rollouts per step as its policy sharpens.
STEP_HEADROOM = 4
_REMEDY = "run `optpo-jax compare --resume` with the same arguments to finish it"


def matched_dir(workdir: str | Path, methods, seed: int) -> Path:
    """``workdir/seed{seed}/{a}_at_{b}_rollouts``: where A's rollout-matched run of ``seed`` lives."""
    a, b = methods
    return Path(workdir) / f"seed{seed}" / f"{a}_at_{b}_rollouts"


def check_matchable(config) -> None:
    """``--match rollouts`` changes ``steps``, so the learning rate must not be laid out over them."""
    if config.optimizer.schedule != "constant" or config.optimizer.warmup_fraction > 0:
        raise ConfigError(f"--match rollouts runs config.method={config.method!r} for more steps than configured, "
                          f"which would stretch its learning-rate schedule: it needs optimizer.schedule 'constant' "
                          f"and warmup_fraction 0, got {config.optimizer.schedule!r} and "
                          f"{config.optimizer.warmup_fraction}")


def matched_config(config, a_summary: dict, budget: int):
    """A's config with ``rollout_budget`` = ``budget`` and room for the steps it takes to get there."""
    drawn, steps = int(a_summary["total_rollouts"]), int(a_summary["steps"])
    if drawn >= budget:
        raise ConfigError(f"--match rollouts: {config.method} drew {drawn:,} rollouts in {steps} steps, already at "
                          f"least the baseline's {budget:,}: running it on cannot match them")
    matched = config.copy_and_resolve_references()
    matched.rollout_budget = int(budget)
    matched.steps = STEP_HEADROOM * math.ceil(steps * budget / max(drawn, 1))
    return matched


def run_matched(config, a_dir: Path, b_dir: Path, directory: Path, resume: bool, overwrite: bool,
                progress: bool) -> str:
    """Runs A (``config``, finished in ``a_dir``) on to B's rollouts (``b_dir``) in ``directory``; returns
    what was done: ``skip`` (finished before), ``resume`` or ``start`` (copied from ``a_dir``, then run on)."""
    budget = int(read_json(b_dir / "summary.json", _REMEDY)["total_rollouts"])
    matched = matched_config(config, read_json(a_dir / "summary.json", _REMEDY), budget)
    if directory.exists() and not overwrite:
        if not resume:
            raise ConfigError(f"{directory} holds a run already: pass --resume to continue it, or --overwrite")
        if (directory / "summary.json").exists():
            summary = read_json(directory / "summary.json", _REMEDY)
            if summary["total_rollouts"] >= budget or summary["steps"] >= matched.steps:
                return "skip"
        action = "resume"
    else:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(a_dir, directory, ignore=shutil.ignore_patterns(".lock", "summary.json", "final_eval.json"))
        action = "start"
    train(matched, directory, resume=True, progress=progress, config_checked=True)
    return action

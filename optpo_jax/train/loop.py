"""The step loop: batches, training steps, evaluation, metrics, checkpoints and resume.

    train(config, workdir)
      for step:                      this module
        training_step                step.py
          collect_rollouts           rollouts.py: waves until every prompt's vote stops
            sample_wave              waves.py: one jitted sampler call (a while_loop over tokens)
          rewards -> advantages -> GRPO update
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from optpo_jax.prior import fitted_concentration, prior_to_json
from optpo_jax.train.batches import batch_problems
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.distributed import is_lead_process, process_share
from optpo_jax.train.evaluation import run_eval
from optpo_jax.train.fingerprints import FINGERPRINTS, check_fingerprints, run_fingerprints
from optpo_jax.train.memory_plan import check_fits, device_memory_limit
from optpo_jax.train.metrics import step_metrics
from optpo_jax.train.metrics_log import MetricsLog, read_metrics
from optpo_jax.train.rollouts import LookaheadCarry
from optpo_jax.train.run_totals import RunTotals
from optpo_jax.train.setup import Setup, check_config, load_setup
from optpo_jax.train.state import TrainState, restore_state
from optpo_jax.train.step import training_step
from optpo_jax.train.workdir import (
    WorkdirError,
    WorkdirLock,
    check_fresh_start,
    check_resumable,
    remove_run,
    write_atomically,
)


def _step_batches(setup: Setup, step: int) -> tuple[list, list]:
    """This process's share of the batch of ``step`` and of the next one (its lookahead)."""
    config = setup.config
    batch = lambda at: process_share(batch_problems(setup.train_problems, at, config.prompts_per_step, config.seed))
    lookahead = batch(step + 1) if config.lookahead and step + 1 < config.steps else []
    return batch(step), lookahead


def _run_step(setup: Setup, state: TrainState, step: int, carry: LookaheadCarry | None, totals: RunTotals,
              progress: bool) -> tuple[TrainState, LookaheadCarry | None, RunTotals, dict]:
    """One step of the loop: (state, carry, totals) after it and its metrics (with a mid-run evaluation)."""
    config = setup.config
    start = time.perf_counter()
    # Each process votes on, grades and trains on its own share of the batch.
    problems, lookahead = _step_batches(setup, step)
    state, output = training_step(state, setup.learner, problems, jax.random.fold_in(jax.random.key(config.seed), step),
                                  np.random.default_rng([config.seed, step, 1]), lookahead, carry, progress)
    metrics = step_metrics(output, problems, setup.task)
    # The prior is saved with the step's totals, so a resumed run stops as this one would.
    prior = prior_to_json(state.prior_state) if state.prior_state is not None else None
    totals = totals.after_step(metrics, time.perf_counter() - start, prior)
    if state.prior_state is not None:
        metrics["fitted_prior"] = fitted_concentration(state.prior_state, config.sprt.prior)
    # Running totals, so curves can be drawn against compute (evaluation excluded from the seconds).
    metrics.update(total_rollouts=totals.rollouts, total_generated_tokens=totals.generated_tokens,
                   total_trained_tokens=totals.trained_tokens, train_seconds=totals.seconds)
    if config.eval.every_steps and (step + 1) % config.eval.every_steps == 0 and step + 1 < config.steps:
        result = run_eval(setup, state.policy_params(), config.eval.samples, config.seed + 2 + step, progress)
        metrics.update({f"eval/{k}": v for k, v in result.summary().items()})
    return state, output.carry, totals, metrics


def train(config, workdir: str | Path, resume: bool = False, progress: bool = True, overwrite: bool = False,
          resume_step: int | None = None, task=None, config_checked: bool = False) -> dict:
    """Runs ``config`` in ``workdir``; returns the summary (also written to summary.json).

    ``task``: your own ``tasks.base.Task`` object instead of the task ``config.task`` names.
    ``config_checked``: the caller has passed ``config`` through ``setup.check_config`` (``compare`` checks
    every run's config before the first starts), so it is not checked again.

    A workdir holds one run: a new run refuses a workdir that holds one unless ``overwrite``
    (which removes it first); ``resume`` continues the saved run (from its latest checkpoint,
    or ``resume_step``) and refuses a config that defines another run; two runs never share
    a workdir at once (a lock held while this runs).
    """
    workdir = Path(workdir)
    if not config_checked:
        check_config(config)
    with WorkdirLock(workdir) if is_lead_process() else contextlib.nullcontext():
        _check_workdir(workdir, config, resume, overwrite, resume_step)
        setup = load_setup(config, task)
        check_fits(config, setup.policy.config, device_memory_limit())  # before an out-of-memory in XLA
        if resume:
            _check_resume_step(workdir, setup.config.steps, resume_step)
            check_fingerprints(workdir, setup, "--resume")
        elif overwrite and is_lead_process():
            remove_run(workdir)  # only now: a config error above leaves the old run as it was
        if is_lead_process():
            write_atomically(workdir / "config.json", config.to_json_best_effort(indent=1))
            write_atomically(workdir / FINGERPRINTS, json.dumps(run_fingerprints(setup), indent=1))
        try:
            return _train(setup, workdir, resume, resume_step, progress)
        except BaseException:
            if not resume and is_lead_process() and _nothing_trained(workdir):
                remove_run(workdir)  # so the next try needs no --overwrite: there was nothing to keep
            raise


def _check_workdir(workdir: Path, config, resume: bool, overwrite: bool, resume_step: int | None) -> None:
    """The workdir checks that come before any work (see ``workdir.py``)."""
    if resume_step is not None and not resume:
        raise WorkdirError("--resume_step needs --resume")
    if not resume:
        if is_lead_process():
            check_fresh_start(workdir, overwrite)
        return
    if overwrite:
        raise WorkdirError("--resume continues the run in the workdir and --overwrite removes it: choose one")
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir() or Checkpointer(checkpoints).latest_step() is None:
        raise WorkdirError(f"--resume: there is no checkpoint in {checkpoints} to resume from; run without --resume "
                           "(with --overwrite if the workdir holds files of a run that saved none)")
    check_resumable(workdir, config)


def _nothing_trained(workdir: Path) -> bool:
    """Whether a new run in ``workdir`` ended before its first training step was logged or checkpointed."""
    try:
        records = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
        checkpoints = workdir / "checkpoints"
        # Step folders on disk (Orbax names a finished step by its number), not a CheckpointManager: creating one
        # waits for every process, and only the lead process is here.
        saved = checkpoints.is_dir() and any(child.name.isdigit() for child in checkpoints.iterdir())
    except (WorkdirError, OSError):
        return False  # unsure: keep the files
    return not saved and not any(record.get("step", 0) > 0 for record in records)


def _check_resume_step(workdir: Path, steps: int, resume_step: int | None) -> None:
    """The checkpoint to resume exists and is not past ``steps`` (a run is extended, never shortened)."""
    checkpointer = Checkpointer(workdir / "checkpoints")
    saved = sorted(checkpointer.manager.all_steps())
    step = saved[-1] if resume_step is None else resume_step
    if step not in saved:
        raise WorkdirError(f"--resume_step={resume_step}: {workdir / 'checkpoints'} holds steps {saved}, not {step}")
    if step > steps:
        raise WorkdirError(f"--resume: the checkpoint is at step {step} and config.steps is {steps}: a run cannot be "
                           f"shortened; pass --config.steps >= {step} (or --resume_step), or use another --workdir")


def _train(setup: Setup, workdir: Path, resume: bool, resume_step: int | None, progress: bool) -> dict:
    config = setup.config
    state, carry, totals = setup.initial_state(), None, RunTotals()
    checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
    if resume:
        state, saved_totals, carry = restore_state(checkpointer, state, resume_step)
        totals = RunTotals.from_json(saved_totals)
        checkpointer.rewind(totals.step)  # a run resumed from an earlier step saves the later ones anew
    log = MetricsLog(workdir, truncate_after=totals.step if resume else -1, enabled=is_lead_process())
    if totals.step == 0:
        before = run_eval(setup, state.policy_params(), config.eval.final_samples, config.seed + 1, progress)
        totals = dataclasses.replace(totals, before=before.summary())
        log.write(0, {f"eval/{k}": v for k, v in totals.before.items()})
    steps = tqdm(range(totals.step, config.steps), desc=f"train {config.method}", disable=not progress,
                 initial=totals.step, total=config.steps)
    for step in steps:
        if budget_spent(config, totals):
            break
        checkpointer.check_background()  # a failed background save stops the run here, not steps later
        state, carry, totals, metrics = _run_step(setup, state, step, carry, totals, progress)
        log.write(step + 1, metrics)
        if metrics["trained_rollouts"] == 0 and is_lead_process():
            _warn_nothing_trained(step + 1, metrics)
        steps.set_postfix(rollouts=f"{metrics['rollouts_per_prompt']:.1f}", label=f"{metrics['label_accuracy']:.2f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps or budget_spent(config, totals):
            checkpointer.save(step + 1, state.checkpointed(), totals.to_json(), carry)
    checkpointer.wait()
    return _finish(setup, state, totals, log, workdir, progress)


def budget_spent(config, totals: RunTotals) -> bool:
    """Whether a run with ``config.rollout_budget`` > 0 has drawn that many rollouts (it then stops, before
    ``config.steps``: the budget may be overshot by the last step's rollouts, never undershot)."""
    budget = int(config.get("rollout_budget", 0))
    return budget > 0 and totals.rollouts >= budget


def _warn_nothing_trained(step: int, metrics: dict) -> None:
    """Says on stderr that a step left the policy as it was, and the likely cause."""
    if metrics["answered_fraction"] == 0:
        cause = ("no rollout had an answer the task could extract (answered_fraction 0): check the prompt format, "
                 "max_new_tokens and the task's extract()")
    else:
        cause = ("every prompt's rollouts all got the same reward (a unanimous vote gives advantage 0); "
                 f"answered_fraction {metrics['answered_fraction']:.2f}")
    tqdm.write(f"optpo-jax: step {step}: no rollout was trained on: {cause}", file=sys.stderr)


def _finish(setup: Setup, state: TrainState, totals: RunTotals, log: MetricsLog, workdir: Path,
            progress: bool) -> dict:
    """The final evaluation, logged and summarised in summary.json; its per-prompt results in final_eval.json.

    final_eval.json (written before summary.json, so a summary always has the per-prompt
    results of the same evaluation) holds, in the order of the evaluation prompts, each
    prompt's pass@1 (share of its samples right) and whether its majority vote was right,
    with a fingerprint of the prompts: ``report.seed_stats`` pairs runs prompt by prompt.
    """
    config = setup.config
    after = run_eval(setup, state.policy_params(), config.eval.final_samples, config.seed + 1, progress)
    log.write(totals.step, {f"final/{k}": v for k, v in after.summary().items()})
    log.close()
    summary = {
        "method": config.method, "steps": totals.step, "before": totals.before,
        "after": after.summary(), "total_rollouts": totals.rollouts,
        "total_generated_tokens": totals.generated_tokens, "total_trained_tokens": totals.trained_tokens,
        "train_seconds": totals.seconds,
        "label_accuracy": totals.label_accuracy_sum / max(totals.step, 1),
    }
    if is_lead_process():
        prompts = hashlib.sha256(repr(list(setup.eval_problems)).encode()).hexdigest()[:16]
        final_eval = {"samples": int(after.correct.shape[1]), "prompts_sha256": prompts,
                      "per_prompt_pass@1": after.per_prompt_accuracy.tolist(),
                      "per_prompt_majority_correct": after.majority_correct.tolist()}
        write_atomically(workdir / "final_eval.json", json.dumps(final_eval))
        write_atomically(workdir / "summary.json", json.dumps(summary, indent=1))
    return summary

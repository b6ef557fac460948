"""Runs an experiment config: the training loop with evaluation, metrics, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from optpo_jax.checkpoints import Checkpointer
from optpo_jax.distributed import (
    check_row_layout,
    is_lead_process,
    local_row_count,
    mesh_of,
    process_share,
    process_sum,
    replicate_unplaced,
)
from optpo_jax.evaluation import EvalResult, evaluate
from optpo_jax.grpo import GRPOConfig
from optpo_jax.loop import UpdateConfig, make_update_step, training_step
from optpo_jax.metrics_log import MetricsLog
from optpo_jax.optim import float32_master
from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig
from optpo_jax.tasks.arithmetic import SHIFTED, ArithmeticTask, generate_problems, load_policy

DATA_MODES = ("transductive", "held_out")


def _build(kind, fields, name: str):
    """``kind(**fields)`` with errors that name the config section."""
    try:
        return kind(**(fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.{name}: {error}") from error


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built and validated from a config before any work starts."""

    config: object
    task: object
    policy: object
    model_config: object
    sprt: SPRTConfig
    sampling: SamplingConfig
    eval_sampling: SamplingConfig
    grpo: GRPOConfig
    update: UpdateConfig
    optimizer: optax.GradientTransformation
    rows_per_wave: int
    train_problems: list
    eval_problems: list
    update_step: object = None
    ref_params: object = None


def resolve_model_path(name: str) -> str:
    """A local checkpoint directory as is; otherwise a hub name, downloaded (config, safetensors, tokenizer)."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def make_task(config):
    """(task, policy, train problems, eval problems) for ``config.task``."""
    if config.task == "arithmetic":
        task = ArithmeticTask()
        policy = load_policy(config.model_path) if config.model_path else load_policy()
        train_problems = generate_problems(config.data.num_prompts, SHIFTED, seed=config.data.seed)
        held_out = generate_problems(config.data.num_prompts, SHIFTED, seed=config.data.held_out_seed)
    elif config.task == "math":
        from optpo_jax.data import load_problems
        from optpo_jax.models import load_hf
        from optpo_jax.tasks.math import MathTask

        if not config.model_path:
            raise ValueError("config.model_path must name a checkpoint directory or hub model for task 'math'")
        policy = load_hf(resolve_model_path(config.model_path), dtype=config.model_dtype)
        task = MathTask(policy.tokenizer, config.math.instruction, config.math.max_prompt_tokens,
                        config.math.multiple_choice, config.math.timeout_seconds)
        fields = {"prompt_field": config.data.prompt_field, "answer_field": config.data.answer_field,
                  "limit": config.data.num_prompts}
        train_problems = load_problems(config.data.path, **fields)
        held_out = load_problems(config.data.held_out_path, **fields) if config.data.mode == "held_out" else None
    else:
        raise ValueError(f"config.task must be 'arithmetic' or 'math', got {config.task!r}")
    eval_problems = train_problems if config.data.mode == "transductive" else held_out
    return task, policy, train_problems, eval_problems


def place_policy(policy, config):
    """The policy with ``config.remat`` applied and its params sharded over ``config.mesh`` (if > 1 device)."""
    from optpo_jax.distributed import make_mesh, shard_params

    model_config = dataclasses.replace(policy.config, remat=bool(config.get("remat", False)))
    params = policy.params
    mesh_sizes = dict(config.get("mesh", {}))
    if mesh_sizes and mesh_sizes != {"data": 1, "fsdp": 1, "tensor": 1}:
        try:
            mesh = make_mesh(**mesh_sizes)
        except ValueError as error:
            raise ValueError(f"config.mesh: {error}") from error
        params = shard_params(params, mesh)
    return dataclasses.replace(policy, config=model_config, params=params)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with a constant or cosine schedule and linear warmup (``warmup_fraction`` of the steps).

    With ``optimizer.float32_master`` the optimizer works on a float32 copy of the params
    (for bfloat16 params: ``model_dtype = "bfloat16"``).
    """
    settings = config.optimizer
    if settings.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.optimizer.schedule must be 'constant' or 'cosine', got {settings.schedule!r}")
    warmup = round(settings.warmup_fraction * config.steps)
    if settings.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup, max(config.steps, warmup + 1))
    elif warmup:
        schedule = optax.warmup_constant_schedule(0.0, settings.learning_rate, warmup)
    else:
        schedule = settings.learning_rate
    optimizer = optax.chain(optax.clip_by_global_norm(settings.max_grad_norm),
                            optax.adamw(schedule, weight_decay=settings.weight_decay))
    return float32_master(optimizer) if settings.get("float32_master", False) else optimizer


def build_setup(config) -> Setup:
    """Validates ``config`` (errors name the field and value) and loads the task and policy."""
    if config.data.mode not in DATA_MODES:
        raise ValueError(f"config.data.mode must be one of {DATA_MODES}, got {config.data.mode!r}")
    for name in ("steps", "prompts_per_step", "rows_per_wave"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]!r}")
    # Split evenly over the processes (each fills its share of every wave and micro-batch).
    local_row_count(int(config.prompts_per_step), "config.prompts_per_step")
    fields = {"config.rows_per_wave": config.rows_per_wave,
              "config.policy_update.micro_batch_rows": config.policy_update.micro_batch_rows}
    rows_per_process = {name: local_row_count(int(value), name) for name, value in fields.items()}
    if config.optimizer.learning_rate <= 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate!r}")
    task, policy, train_problems, eval_problems = make_task(config)
    policy = place_policy(policy, config)
    check_row_layout(mesh_of(policy.params), rows_per_process)
    if config.prompts_per_step > len(train_problems):
        raise ValueError(f"config.prompts_per_step={config.prompts_per_step} exceeds the "
                         f"{len(train_problems)} training prompts")
    common = {"stop_token_ids": task.stop_token_ids, "pad_token_id": task.pad_token_id}
    sampling = _build(SamplingConfig, dict(config.sampling, **common), "sampling")
    eval_sampling = dataclasses.replace(sampling, temperature=config.eval.temperature, top_p=config.eval.top_p)
    grpo = _build(GRPOConfig, dict(config.grpo, temperature=sampling.temperature,
                                   token_scale=sampling.max_new_tokens), "grpo")
    optimizer = make_optimizer(config)
    setup = Setup(
        config=config, task=task, policy=policy, model_config=policy.config,
        sprt=_build(SPRTConfig, config.sprt, "sprt"), sampling=sampling, eval_sampling=eval_sampling, grpo=grpo,
        update=_build(UpdateConfig, config.policy_update, "policy_update"), optimizer=optimizer,
        rows_per_wave=int(config.rows_per_wave), train_problems=train_problems, eval_problems=eval_problems,
    )
    setup.update_step = make_update_step(policy.config, optimizer, grpo, setup.update.grad_accumulation)
    # A copy: the update step donates the params it is given.
    setup.ref_params = jax.tree.map(jnp.copy, policy.params)
    return setup


def batch_problems(problems: list, step: int, prompts_per_step: int, seed: int) -> list:
    """The prompts of ``step``: epochs of seeded permutations of ``problems`` (a pure function of step)."""
    per_epoch = len(problems) // prompts_per_step
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(problems))
    return [problems[i] for i in order[index * prompts_per_step : (index + 1) * prompts_per_step]]


def run_eval(setup: Setup, params, num_samples: int, seed: int) -> EvalResult:
    policy = dataclasses.replace(setup.policy, params=params)
    return evaluate(policy, setup.task, setup.eval_problems, num_samples, jax.random.key(seed), setup.eval_sampling,
                    rows_per_wave=setup.rows_per_wave)


_SUMMED = ("prompts", "rollouts", "generated_tokens", "rows_used", "rows_total", "labels_right", "rewards_right",
           "majority_share_sum", "negative_logprob_sum")


def step_metrics(rollouts, rewards, leader, problems, task, update_metrics) -> dict:
    """Per-step metrics over every process's prompts; the only place ground truth is read during training.

    Each process grades its own prompts and their sums and the task's counters are added
    over processes; ``waves`` is common to all and the ``*_seconds`` timings are this process's.
    """
    per_prompt = np.bincount(rollouts.prompt_index, minlength=len(problems))
    labels = [rollouts.answer_slots.answer(p, int(leader[p])) for p in range(len(problems))]
    label_right = np.array([task.is_correct(label, problem) for label, problem in zip(labels, problems, strict=True)])
    answer_right = np.array([task.is_correct(rollouts.answer_slots.answer(p, int(s)), problems[p])
                             for p, s in zip(rollouts.prompt_index, rollouts.slots, strict=True)])
    counts = np.asarray(rollouts.votes.counts)
    local = [len(problems), len(rollouts.prompt_index), rollouts.completion_lengths.sum(), rollouts.rows_used,
             rollouts.rows_total, label_right.sum(), np.sum(rewards == answer_right),
             np.sum(counts.max(axis=1) / np.maximum(per_prompt, 1)), -np.sum(rollouts.policy_logprobs)]
    total = dict(zip(_SUMMED, process_sum(np.array(local, np.float64)).tolist(), strict=True))
    # A prompt keeps at most max_samples (= vote slots) rollouts: one histogram length on every process.
    histogram = np.trim_zeros(process_sum(np.bincount(per_prompt, minlength=counts.shape[1] + 1)), "b")
    return {
        "rollouts": int(total["rollouts"]), "rollouts_per_prompt": total["rollouts"] / total["prompts"],
        "rollouts_per_prompt_histogram": histogram.tolist(),
        "generated_tokens": int(total["generated_tokens"]), "waves": rollouts.waves,
        "wave_utilization": total["rows_used"] / max(total["rows_total"], 1),
        "label_accuracy": total["labels_right"] / total["prompts"],
        "reward_accuracy": total["rewards_right"] / max(total["rollouts"], 1),
        "majority_share": total["majority_share_sum"] / total["prompts"],
        "entropy": total["negative_logprob_sum"] / max(total["generated_tokens"], 1),
        "sampling_seconds": rollouts.sampling_seconds, **task_counters(task), **update_metrics,
    }


def task_counters(task) -> dict:
    """Running counts a task keeps, added over every process's share of the prompts: prompts
    truncated to fit, equivalence checks that timed out."""
    counters = {}
    if hasattr(task, "truncated_prompts"):
        counters["truncated_prompts"] = task.truncated_prompts
    if hasattr(getattr(task, "equivalent", None), "timeouts"):
        counters["equivalence_timeouts"] = task.equivalent.timeouts
    return dict(zip(counters, process_sum(np.array(list(counters.values()), np.int64)).tolist(), strict=True))


def train(config, workdir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Runs ``config`` in ``workdir``; returns the summary (also written to summary.json)."""
    setup = build_setup(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_lead_process():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    params = setup.policy.params
    opt_state = replicate_unplaced(setup.optimizer.init(params), mesh_of(params))
    state = {"params": params, "opt_state": opt_state}
    totals = {"step": 0, "rollouts": 0, "generated_tokens": 0, "seconds": 0.0, "label_accuracy_sum": 0.0}
    checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
    resumed = resume and checkpointer.latest_step() is not None
    carry = None
    if resumed:
        state, totals, carry = checkpointer.restore(state)
    log = MetricsLog(workdir, truncate_after=totals["step"] if resumed else -1, enabled=is_lead_process())
    if totals["step"] == 0:
        before = run_eval(setup, state["params"], config.eval.final_samples, config.seed + 1)
        totals["before"] = before.summary()
        log.write(0, {f"eval/{k}": v for k, v in totals["before"].items()})
    steps = tqdm(range(totals["step"], config.steps), desc=f"train {config.method}", disable=not progress,
                 initial=totals["step"], total=config.steps)
    for step in steps:
        start = time.perf_counter()
        # Each process votes on, grades and trains on its own share of the batch.
        problems = process_share(batch_problems(setup.train_problems, step, config.prompts_per_step, config.seed))
        lookahead = []
        if config.lookahead and step + 1 < config.steps:
            lookahead = process_share(batch_problems(setup.train_problems, step + 1, config.prompts_per_step,
                                                     config.seed))
        state, rollouts, rewards, leader, update_metrics, carry = training_step(
            state, problems, setup.task, setup, jax.random.fold_in(jax.random.key(config.seed), step),
            np.random.default_rng([config.seed, step, 1]), lookahead, carry, progress,
        )
        metrics = step_metrics(rollouts, rewards, leader, problems, setup.task, update_metrics)
        totals.update(step=step + 1, rollouts=totals["rollouts"] + metrics["rollouts"],
                      generated_tokens=totals["generated_tokens"] + metrics["generated_tokens"],
                      seconds=totals["seconds"] + time.perf_counter() - start,
                      label_accuracy_sum=totals["label_accuracy_sum"] + metrics["label_accuracy"])
        # Running totals, so curves can be drawn against rollouts and training wall-clock (evaluation excluded).
        metrics.update(total_rollouts=totals["rollouts"], train_seconds=totals["seconds"])
        if config.eval.every_steps and (step + 1) % config.eval.every_steps == 0 and step + 1 < config.steps:
            result = run_eval(setup, state["params"], config.eval.samples, config.seed + 2 + step)
            metrics.update({f"eval/{k}": v for k, v in result.summary().items()})
        log.write(step + 1, metrics)
        steps.set_postfix(rollouts=f"{metrics['rollouts_per_prompt']:.1f}", label=f"{metrics['label_accuracy']:.2f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpointer.save(step + 1, state, totals, carry)
    checkpointer.wait()
    after = run_eval(setup, state["params"], config.eval.final_samples, config.seed + 1)
    log.write(config.steps, {f"final/{k}": v for k, v in after.summary().items()})
    log.close()
    summary = {
        "method": config.method, "steps": config.steps, "before": totals.get("before"),
        "after": after.summary(), "total_rollouts": totals["rollouts"],
        "total_generated_tokens": totals["generated_tokens"], "train_seconds": totals["seconds"],
        "label_accuracy": totals["label_accuracy_sum"] / max(config.steps, 1),
    }
    if is_lead_process():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

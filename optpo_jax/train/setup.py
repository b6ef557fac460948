"""From an experiment config (ml_collections) to the objects a run needs, validated before any work."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jax
import ml_collections
import optax

from optpo_jax.field_ranges import FieldError
from optpo_jax.grpo import GRPOConfig
from optpo_jax.models.config import ATTENTION_KERNELS
from optpo_jax.models.hf_io import HFModel
from optpo_jax.models.lora import LoRAConfig, targeted_kernels
from optpo_jax.models.sharding import MESH_AXES
from optpo_jax.optim import float32_master
from optpo_jax.ppo import PPOConfig
from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig
from optpo_jax.tasks.arithmetic import ArithmeticTask, load_policy
from optpo_jax.tasks.base import Task, check_task, import_factory
from optpo_jax.train.config_checks import ConfigError, check_experiment_fields
from optpo_jax.train.distributed import check_row_layout, local_row_count, make_mesh, mesh_of, shard_params
from optpo_jax.train.learner import Learner
from optpo_jax.train.rewards import REWARDS
from optpo_jax.train.state import TrainState, init_train_state
from optpo_jax.train.step_config import StepConfig, UpdateConfig
from optpo_jax.train.update import make_update_step

DATA_MODES = ("transductive", "held_out")


def _build(kind, fields, section: str):
    """``kind(**fields)`` with errors that name the config section (``section`` "" for top-level fields)."""
    prefix = f"config.{section}." if section else "config."
    try:
        return kind(**(fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)))
    except FieldError as error:
        raise ConfigError(f"{prefix}{error.field}{error.problem}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.')}: {error}") from error


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs, built and validated from a config before any work starts.

    Attributes:
      config: the experiment config it was built from.
      policy: the initial policy (``config``, ``params`` placed on the mesh; ``tokenizer`` for HF models).
      learner: the task, architecture, StepConfig and jitted update of every training step.
      eval_sampling: the SamplingConfig of evaluation.
      optimizer: the optax transformation (its state starts from ``policy.params``).
      train_problems, eval_problems: the prompts trained on and evaluated on.
      critic_optimizer: PPO's critic's own transformation (``config.ppo.critic_learning_rate``), None for GRPO.
    """

    config: ml_collections.ConfigDict
    policy: HFModel
    learner: Learner
    eval_sampling: SamplingConfig
    optimizer: optax.GradientTransformation
    train_problems: list
    eval_problems: list
    critic_optimizer: optax.GradientTransformation | None = None

    @property
    def task(self) -> Task:
        return self.learner.task

    def initial_state(self) -> TrainState:
        """The run's TrainState before its first step (``state.init_train_state`` of the initial policy)."""
        return init_train_state(self.policy.params, self.optimizer, self.learner.config, lora_config(self.config),
                                int(self.config.seed), self.critic_optimizer)


def resolve_model_path(name: str) -> str:
    """A local checkpoint directory as is; otherwise a hub name, downloaded (config, safetensors, tokenizer).

    A name that can only be a path (starts with ".", "/" or "~", or is no hub id "org/name") and does not
    exist, a file, and a hub name that cannot be fetched are ValueErrors naming ``config.model_path``.
    """
    import re

    if Path(name).is_dir():
        return name
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if Path(name).expanduser().exists():
        raise ValueError(f"config.model_path={name!r} is a file; it must name a checkpoint directory (config.json, "
                         "*.safetensors, tokenizer) or a hub model 'org/name'")
    if name.startswith((".", "/", "~")) or "\\" in name or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise ValueError(f"config.model_path: no such checkpoint directory: {name}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except (OSError, HFValidationError) as error:  # the hub's HTTP, not-found and offline errors are OSErrors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"config.model_path: no such checkpoint directory: {name}, and no hub model of that name "
                         f"could be fetched ({type(error).__name__}: {reason})") from error


BUILTIN_TASKS = ("arithmetic", "math")


def load_policy_of(config):
    """The policy of ``config``: the shipped arithmetic policy when ``model_path`` is "" (any task but
    ``math``), else the checkpoint at ``model_path`` (a directory or a hub name) in ``model_dtype``.

    A checkpoint's tokenizer is loaded where it has one (required for ``math``). Errors (no such
    directory, no config.json or weights, no tokenizer for ``math``, a wave wider than the model's
    context: ``config_checks.check_context``) are ValueErrors naming ``config.model_path`` or the fields.
    """
    import json

    from optpo_jax.train.config_checks import check_context

    if not config.model_path:
        if config.task == "math":
            raise ValueError("config.model_path must name a checkpoint directory or hub model for task 'math'")
        policy = load_policy()
        check_context(config, policy.config.max_position_embeddings, "the shipped arithmetic policy")
        return policy
    from optpo_jax.models import load_hf
    from optpo_jax.models.hf_io import TOKENIZER_FILES

    if config.task == "arithmetic" and not Path(config.model_path).is_dir():
        raise ValueError(f"config.model_path: no such checkpoint directory: {config.model_path}")
    path = config.model_path if config.task == "arithmetic" else resolve_model_path(config.model_path)
    has_tokenizer = any((Path(path) / name).exists() for name in TOKENIZER_FILES)
    if config.task == "math" and not has_tokenizer:
        raise ValueError(f"config.model_path={config.model_path!r} has no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)} in {path}); task 'math' needs the model's tokenizer: copy "
                         f"its tokenizer files (tokenizer.json, tokenizer_config.json, ...) into {path}")
    model = f"config.model_path={config.model_path!r}"
    try:  # before the weights are read: the context as config.json states it
        context = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        context = None  # load_hf names what is wrong with config.json
    if isinstance(context, int):
        check_context(config, context, model)
    try:
        if config.task == "arithmetic":
            policy = load_policy(path)
        else:
            policy = load_hf(path, dtype=config.get("model_dtype", "float32"), load_tokenizer=has_tokenizer)
    except FileNotFoundError as error:  # no config.json, no weights: the file is named
        raise ValueError(f"config.model_path={config.model_path!r}: {error}") from error
    check_context(config, policy.config.max_position_embeddings, model)
    return policy


def task_of(config, tokenizer) -> Task:
    """The task ``config.task`` names: a built-in (``arithmetic``, ``math``) or ``module:factory``,
    called as ``factory(config, tokenizer)``."""
    if config.task == "arithmetic":
        return ArithmeticTask()
    if config.task == "math":
        from optpo_jax.tasks.math import MathTask

        return MathTask(tokenizer, config.math.instruction, config.math.max_prompt_tokens,
                        config.math.multiple_choice, config.math.timeout_seconds)
    if not isinstance(config.task, str) or ":" not in config.task:
        raise ValueError(f"config.task must be one of {BUILTIN_TASKS} or 'module:factory', got {config.task!r}")
    return check_task(import_factory(config.task)(config, tokenizer), f"config.task={config.task!r}")


def problems_of(config, task) -> tuple[list, list | None]:
    """(training problems, held-out problems or None): the task's own ``problems(config)`` where it has one,
    else the JSON / JSONL files ``config.data.path`` and ``config.data.held_out_path``.

    With ``config.sampling.prompt_buckets``, every prompt must fit the largest bucket (a ValueError naming
    the field and the prompt's width), so that no wave stops the run mid-way. ``MathTask``'s prompts are
    measured as it will cut them (to ``math.max_prompt_tokens``) without counting them as truncated.
    """
    if hasattr(task, "problems"):
        train_problems, held_out = task.problems(config)
    else:
        from optpo_jax.tasks.data import load_problems

        if not config.data.get("path"):
            raise ValueError(f"config.data.path must name a problem file (JSON / JSONL) for task {config.task!r}")
        if config.data.mode == "held_out" and not config.data.get("held_out_path"):
            raise ValueError("config.data.mode='held_out' needs config.data.held_out_path, the problem file "
                             "(JSON / JSONL) to evaluate on")
        fields = {"prompt_field": config.data.prompt_field, "answer_field": config.data.answer_field,
                  "limit": config.data.num_prompts}
        loaded = {}
        for name in ("path", "held_out_path") if config.data.mode == "held_out" else ("path",):
            try:
                loaded[name] = load_problems(config.data[name], **fields)
            except (FileNotFoundError, ImportError) as error:  # no such file, or a hub dataset without `datasets`
                raise ValueError(f"config.data.{name}: {error}") from error
        train_problems, held_out = loaded["path"], loaded.get("held_out_path")
    check_prompt_buckets(config, task, [*train_problems, *(held_out or [])])
    return train_problems, held_out


def check_prompt_buckets(config, task, problems: list) -> None:
    """Every prompt fits the largest of ``config.sampling.prompt_buckets`` (a ValueError naming the field and the
    prompt's width), so that no wave stops the run mid-way. A task's ``prompt_length(problem)`` measures where it
    has one (``MathTask``: as it will cut the prompt, without counting a cut); a task that counts its cuts
    (``truncated_prompts``) but cannot measure without one is not checked; other tasks are measured by
    ``prompt_tokens``."""
    buckets = tuple(int(bucket) for bucket in config.sampling.get("prompt_buckets", ()))
    measure = getattr(task, "prompt_length", None)
    if measure is None and hasattr(task, "truncated_prompts"):
        return
    measure = measure or (lambda problem: len(task.prompt_tokens(problem)))
    for problem in problems if buckets else ():
        width = measure(problem)
        if width > max(buckets):
            label = getattr(problem, "id", None) or repr(getattr(problem, "prompt", problem))[:60]
            raise ValueError(f"config.sampling.prompt_buckets={buckets}: a prompt of {width} tokens (problem "
                             f"{label}) exceeds the largest bucket; add a bucket >= {width}")


def make_task(config, task: Task | None = None):
    """(task, policy, train problems, eval problems) for ``config`` (``task``: a Task object instead of
    ``config.task``'s)."""
    policy = load_policy_of(config)
    task = task_of(config, policy.tokenizer) if task is None else check_task(task, "train(task=...)")
    train_problems, held_out = problems_of(config, task)
    eval_problems = train_problems if config.data.mode == "transductive" else held_out
    return task, policy, train_problems, eval_problems


def place_policy(policy, config):
    """The policy with ``config.remat`` and ``config.attention`` applied and its params sharded over
    ``config.mesh`` (if > 1 device)."""
    model_config = dataclasses.replace(policy.config, remat=bool(config.get("remat", False)),
                                       attention=config.get("attention", "reference"))
    params = policy.params
    mesh_sizes = dict(config.get("mesh", {}))
    if any(int(mesh_sizes.get(axis, 1)) != 1 for axis in MESH_AXES):
        try:
            mesh = make_mesh(**mesh_sizes)
        except ValueError as error:
            raise ValueError(f"config.mesh: {error}") from error
        params = shard_params(params, mesh)
    return dataclasses.replace(policy, config=model_config, params=params)


def make_optimizer(config, learning_rate: float | None = None) -> optax.GradientTransformation:
    """AdamW with a constant or cosine schedule and linear warmup (``warmup_fraction`` of the steps).

    With ``optimizer.float32_master`` the optimizer works on a float32 copy of the params
    (for bfloat16 params: ``model_dtype = "bfloat16"``). ``learning_rate``: another peak rate
    with the same settings (the critic's).
    """
    settings = config.optimizer
    if learning_rate is not None:
        settings = ml_collections.ConfigDict(dict(settings.to_dict(), learning_rate=learning_rate))
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


def critic_optimizer_of(config) -> optax.GradientTransformation | None:
    """PPO's critic optimizer: ``make_optimizer`` at ``config.ppo.critic_learning_rate``; None for GRPO."""
    if config.get("algorithm", "grpo") != "ppo":
        return None
    return make_optimizer(config, float(config.ppo.critic_learning_rate))


def ppo_config_of(config) -> PPOConfig:
    """``config.ppo`` as a PPOConfig (its optimizer field, ``critic_learning_rate``, is the optimizer's); the
    defaults when the config has no such section (a run saved before PPO)."""
    settings = config.get("ppo")
    if settings is None:
        return PPOConfig()
    return _build(PPOConfig, {name: value for name, value in settings.items() if name != "critic_learning_rate"},
                  "ppo")


def lora_config(config) -> LoRAConfig | None:
    """``config.lora`` as a LoRAConfig, or None for full fine-tuning (rank 0, or no section)."""
    settings = config.get("lora")
    if settings is None or int(settings.rank) == 0:
        return None
    return _build(LoRAConfig, settings, "lora")


def _with_config_errors(check):
    """``check`` with its ValueErrors (each names a config field) raised as ConfigError."""

    def checked(*args):
        try:
            return check(*args)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from error

    return checked


def step_config_of(config, stop_token_ids=(), pad_token_id: int = 0) -> tuple[StepConfig, SamplingConfig]:
    """(the StepConfig of every training step, the evaluation's SamplingConfig) of ``config``, with the task's
    stop and pad tokens (placeholders when only checking). Each dataclass checks its fields' ranges."""
    common = {"stop_token_ids": stop_token_ids, "pad_token_id": pad_token_id}
    sampling = _build(SamplingConfig, dict(config.sampling, **common), "sampling")
    eval_sampling = _build(SamplingConfig, dict(config.sampling, **common, temperature=config.eval.temperature,
                                                top_p=config.eval.top_p), "eval")
    if not sampling.temperature > 0:  # checked here: GRPOConfig, built from it, would name its own field
        raise ConfigError(f"config.sampling.temperature must be > 0 for training (greedy sampling cannot be trained "
                          f"on: the update divides logits by it), got {config.sampling.temperature!r}")
    grpo = _build(GRPOConfig, dict(config.grpo, temperature=sampling.temperature,
                                   token_scale=sampling.max_new_tokens), "grpo")
    parts = {"sprt": _build(SPRTConfig, config.sprt, "sprt"), "sampling": sampling, "grpo": grpo,
             "update": _build(UpdateConfig, config.policy_update, "policy_update")}
    step_config = _build(StepConfig, dict(parts, rows_per_wave=config.rows_per_wave,
                                          reward=config.get("reward", "consensus"),
                                          algorithm=config.get("algorithm", "grpo"), ppo=ppo_config_of(config)), "")
    return step_config, eval_sampling


@_with_config_errors
def check_config(config) -> None:
    """Every check of ``config`` that needs neither the model nor the data (ConfigError naming the field), run
    once per run: what ``train`` and ``compare`` pass before anything in a workdir is removed or trained."""
    check_experiment_fields(config)
    step_config_of(config)
    if config.get("reward", "consensus") not in REWARDS:
        raise ValueError(f"config.reward must be one of {tuple(REWARDS)}, got {config.reward!r}")
    if config.data.mode not in DATA_MODES:
        raise ValueError(f"config.data.mode must be one of {DATA_MODES}, got {config.data.mode!r}")
    num_prompts = int(config.data.get("num_prompts", 0))
    if num_prompts and config.prompts_per_step > num_prompts:
        raise ValueError(f"config.prompts_per_step={config.prompts_per_step} exceeds config.data.num_prompts="
                         f"{num_prompts}")
    # Split evenly over the processes (each fills its share of every wave and micro-batch).
    local_row_count(int(config.prompts_per_step), "config.prompts_per_step")
    local_row_count(int(config.rows_per_wave), "config.rows_per_wave")
    local_row_count(int(config.policy_update.micro_batch_rows), "config.policy_update.micro_batch_rows")
    if config.sampling.get("schedule", "waves") == "continuous" and jax.process_count() > 1:
        raise ValueError(f"config.sampling.schedule='continuous' runs on one process, this run has "
                         f"{jax.process_count()}: set config.sampling.schedule='waves'")
    if config.get("attention", "reference") not in ATTENTION_KERNELS:
        raise ValueError(f"config.attention must be one of {ATTENTION_KERNELS}, got {config.attention!r}")
    make_optimizer(config)
    critic_optimizer_of(config)
    lora_config(config)


def build_setup(config, task: Task | None = None) -> Setup:
    """``check_config`` then ``load_setup``: the Setup of an unchecked ``config`` (ConfigError naming the field)."""
    check_config(config)
    return load_setup(config, task)


@_with_config_errors
def load_setup(config, task: Task | None = None) -> Setup:
    """Loads the task and policy of a ``config`` that passed ``check_config`` and builds the run's parts.

    ``task``: a ``tasks.base.Task`` object to use instead of the one ``config.task`` names.
    ``config.steps = 0`` is one epoch of the training prompts (``Setup.config`` holds the number).
    """
    task, policy, train_problems, eval_problems = make_task(config, task)
    if eval_problems is None:
        raise ValueError("config.data.mode='held_out' needs held-out problems: set config.data.held_out_path")
    if int(config.steps) == 0:
        config = copy.deepcopy(config)
        config.steps = max(len(train_problems) // int(config.prompts_per_step), 1)
    policy = place_policy(policy, config)
    check_row_layout(mesh_of(policy.params), {
        "config.rows_per_wave": local_row_count(int(config.rows_per_wave), "config.rows_per_wave"),
        "config.policy_update.micro_batch_rows": local_row_count(int(config.policy_update.micro_batch_rows),
                                                                 "config.policy_update.micro_batch_rows")})
    if config.prompts_per_step > len(train_problems):
        raise ValueError(f"config.prompts_per_step={config.prompts_per_step} exceeds the "
                         f"{len(train_problems)} training prompts")
    step_config, eval_sampling = step_config_of(config, task.stop_token_ids, task.pad_token_id)
    optimizer = make_optimizer(config)
    lora = lora_config(config)
    if lora is not None:
        narrowest = min(min(shape) for _, shape in targeted_kernels(policy.params, lora))
        if lora.rank > narrowest:  # a rank above a kernel's smaller side adds parameters, not expressiveness
            raise ValueError(f"config.lora.rank={lora.rank} exceeds {narrowest}, the smaller side of the narrowest "
                             f"targeted projection of this model: at most {narrowest}")
    critic_optimizer = critic_optimizer_of(config)
    update_step = make_update_step(policy.config, optimizer, step_config.grpo, step_config.update.grad_accumulation,
                                   lora, critic_optimizer, step_config.ppo)
    return Setup(config=config, policy=policy, learner=Learner(task, policy.config, step_config, update_step),
                 eval_sampling=eval_sampling, optimizer=optimizer, train_problems=train_problems,
                 eval_problems=eval_problems, critic_optimizer=critic_optimizer)

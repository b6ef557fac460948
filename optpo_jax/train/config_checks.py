"""The fields of an experiment config that no dataclass holds, checked at the edge before any work.

Fields that build a dataclass (``config.sprt`` -> ``SPRTConfig``, ``sampling``, ``grpo``,
``policy_update``, ``lora``, ``rows_per_wave``) carry their ranges on it (``field_ranges``)
and are checked when ``train.setup`` builds it. The rest (run length, data, optimizer,
evaluation, the math task) have theirs in ``EXPERIMENT_RANGES``. Each error names the
field as the user writes it (``config.optimizer.learning_rate``) with the value given and
the range accepted.
"""

from __future__ import annotations

import numbers

from optpo_jax.field_ranges import INT, REAL, FieldError, Range
from optpo_jax.models.config import dtype_name
from optpo_jax.models.sharding import MESH_AXES

_BIG = 10**9
MAX_GENERATED_PROMPTS = 10**6

EXPERIMENT_RANGES = {
    "seed": Range(INT, 0, 2**31 - 1),
    "steps": Range(INT, 0, 10**7),  # 0: one epoch of the training prompts
    "rollout_budget": Range(INT, 0, 10**12),  # 0: no budget
    "prompts_per_step": Range(INT, 1, 10**6),
    "checkpoint_every": Range(INT, 1, _BIG),
    "data.seed": Range(INT, 0, 2**31 - 1),
    "data.held_out_seed": Range(INT, 0, 2**31 - 1),
    "optimizer.learning_rate": Range(REAL, 0.0, 1.0, low_inclusive=False),
    "optimizer.warmup_fraction": Range(REAL, 0.0, 1.0, high_inclusive=False),
    "optimizer.weight_decay": Range(REAL, 0.0, 1e3),
    "optimizer.max_grad_norm": Range(REAL, 0.0, 1e9, low_inclusive=False),
    "ppo.critic_learning_rate": Range(REAL, 0.0, 1.0, low_inclusive=False),
    "eval.every_steps": Range(INT, 0, _BIG),
    "eval.samples": Range(INT, 1, 4096),
    "eval.final_samples": Range(INT, 1, 4096),
    "math.max_prompt_tokens": Range(INT, 1, 131072),
    "math.timeout_seconds": Range(REAL, 0.0, 3600.0, low_inclusive=False),
}


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and the value."""


def _lookup(config, field: str):
    """The value at dotted ``field``, or KeyError."""
    value = config
    for part in field.split("."):
        if part not in value:
            raise KeyError(field)
        value = value[part]
    return value


def check_experiment_fields(config) -> None:
    """Checks the fields of ``EXPERIMENT_RANGES`` present in ``config`` and the ones with a rule of their own
    (``data.num_prompts``, ``model_dtype``, ``mesh``); ConfigError naming the field."""
    for field, bounds in EXPERIMENT_RANGES.items():
        try:
            value = _lookup(config, field)
        except KeyError:
            continue
        try:
            bounds.check("config", field, value)
        except FieldError as error:
            raise ConfigError(str(error)) from None
    num_prompts = config.data.get("num_prompts", 0)
    lowest = 1 if config.task == "arithmetic" else 0  # 0 = every problem of a benchmark file
    # The arithmetic task generates num_prompts sums per split before any work (10**6: about half a minute).
    highest = MAX_GENERATED_PROMPTS if config.task == "arithmetic" else _BIG
    if (not isinstance(num_prompts, numbers.Integral) or isinstance(num_prompts, bool)
            or not lowest <= num_prompts <= highest):
        raise ConfigError(f"config.data.num_prompts must be an integer in [{lowest}, {highest}]"
                          f"{' (0 = all)' if lowest == 0 else ' (the sums generated per split)'}, got {num_prompts!r}")
    if "model_dtype" in config:
        try:
            dtype_name(config.model_dtype, "config.model_dtype")
        except ValueError as error:
            raise ConfigError(str(error)) from error
    for axis in MESH_AXES:
        size = config.get("mesh", {}).get(axis, 1)
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"config.mesh.{axis} must be a positive integer or -1 (the rest), got {size!r}")


def _buckets(config) -> tuple[int, ...] | None:
    """``config.sampling.prompt_buckets`` as sorted integers; None when they are not integers (SamplingConfig
    names that)."""
    try:
        return tuple(sorted(int(bucket) for bucket in config.sampling.get("prompt_buckets", ())))
    except (TypeError, ValueError):
        return None


def _prompt_cap(config) -> int | None:
    """The most tokens a prompt can have when the config bounds it (task "math": ``math.max_prompt_tokens``)."""
    if config.get("task") == "math" and "math" in config:
        return int(config.math.max_prompt_tokens)
    return None


def widest_prompt(config) -> tuple[int | None, str]:
    """(the widest padded prompt a wave of ``config`` can have, the fields that set it), or (None, "") where only
    the prompts themselves say (no buckets, no cap)."""
    buckets, cap = _buckets(config), _prompt_cap(config)
    if buckets:
        holding = [bucket for bucket in buckets if cap is not None and bucket >= cap]
        if holding:
            return holding[0], (f"config.math.max_prompt_tokens={cap} (padded to {holding[0]} by "
                                f"config.sampling.prompt_buckets={tuple(buckets)})")
        return buckets[-1], f"the largest of config.sampling.prompt_buckets={tuple(buckets)}"
    if cap is not None:
        return cap, f"config.math.max_prompt_tokens={cap}"
    return None, ""


def check_context(config, context: int, model: str = "the model") -> None:
    """Raises ConfigError when a wave's widest row, padded prompt + ``sampling.max_new_tokens``, exceeds the
    model's context (``context``: its ``max_position_embeddings``), naming the fields that set the width."""
    prompt, fields = widest_prompt(config)
    if prompt is None:
        return
    new_tokens = int(config.sampling.max_new_tokens)
    if prompt + new_tokens > context:
        raise ConfigError(f"{fields} + config.sampling.max_new_tokens={new_tokens} = {prompt + new_tokens} tokens "
                          f"exceed the context of {model} (max_position_embeddings={context}): lower them until a "
                          f"prompt and its completion fit in {context} tokens")

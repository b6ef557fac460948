"""Every numeric field of an experiment config checked at the edge, before any work.

Each error names the field as the user writes it (``config.sprt.prior``) with the value
given and the range accepted. Ranges are what the code can run: positive sizes, finite
rates, and sizes bounded by what fits (``sprt.max_samples`` sets the vote tables' width,
so 10**6 would allocate tens of GiB before the first wave).
"""

from __future__ import annotations

import math
import numbers

from optpo_jax.models.config import dtype_name
from optpo_jax.sprt import PRIOR_RANGE

_INT, _REAL = "an integer", "a finite number"
_BIG = 10**9
MAX_GENERATED_PROMPTS = 10**6

# field: (kind, low, high, low_inclusive, high_inclusive)
LIMITS = {
    "seed": (_INT, 0, 2**31 - 1, True, True),
    "steps": (_INT, 0, 10**7, True, True),  # 0: one epoch of the training prompts
    "prompts_per_step": (_INT, 1, 10**6, True, True),
    "rows_per_wave": (_INT, 1, 65536, True, True),
    "checkpoint_every": (_INT, 1, _BIG, True, True),
    "data.seed": (_INT, 0, 2**31 - 1, True, True),
    "data.held_out_seed": (_INT, 0, 2**31 - 1, True, True),
    "sprt.threshold": (_REAL, 0.0, 1.0, False, False),
    "sprt.prior": (_REAL, *PRIOR_RANGE, True, True),  # what every stopping rule computes with (sprt.py)
    "sprt.min_samples": (_INT, 1, 1024, True, True),
    "sprt.max_samples": (_INT, 1, 1024, True, True),
    "sprt.esc_window": (_INT, 1, 1024, True, True),
    "sprt.margin_p0": (_REAL, 0.5, 1.0, False, False),
    "sampling.max_new_tokens": (_INT, 1, 131072, True, True),
    # Training divides logits by it and trains on the sampled distribution: greedy (0) cannot be trained on.
    "sampling.temperature": (_REAL, 0.0, 100.0, False, True),
    "sampling.top_p": (_REAL, 0.0, 1.0, False, True),
    "sampling.top_k": (_INT, 0, _BIG, True, True),
    "grpo.clip_eps": (_REAL, 0.0, 1.0, False, False),
    "grpo.clip_eps_high": (_REAL, 0.0, 100.0, False, True),
    "grpo.kl_coef": (_REAL, 0.0, 1e6, True, True),
    "policy_update.train_samples_per_prompt": (_INT, 0, 1024, True, True),
    "policy_update.min_rollouts_per_prompt": (_INT, 0, 1024, True, True),
    "policy_update.micro_batch_rows": (_INT, 1, 65536, True, True),
    "policy_update.optimizer_steps": (_INT, 0, 65536, True, True),
    "policy_update.grad_accumulation": (_INT, 1, 65536, True, True),
    "policy_update.epochs": (_INT, 1, 1000, True, True),
    "policy_update.width_bucket": (_INT, 0, 65536, True, True),
    "policy_update.row_buckets": (_INT, 1, 16, True, True),
    "policy_update.pack_width": (_INT, 0, 1 << 20, True, True),
    "optimizer.learning_rate": (_REAL, 0.0, 1.0, False, True),
    "lora.rank": (_INT, 0, 65536, True, True),
    "lora.alpha": (_REAL, 0.0, 1e6, False, True),
    "optimizer.warmup_fraction": (_REAL, 0.0, 1.0, True, False),
    "optimizer.weight_decay": (_REAL, 0.0, 1e3, True, True),
    "optimizer.max_grad_norm": (_REAL, 0.0, 1e9, False, True),
    "eval.every_steps": (_INT, 0, _BIG, True, True),
    "eval.samples": (_INT, 1, 4096, True, True),
    "eval.final_samples": (_INT, 1, 4096, True, True),
    "eval.temperature": (_REAL, 0.0, 100.0, True, True),
    "eval.top_p": (_REAL, 0.0, 1.0, False, True),
    "math.max_prompt_tokens": (_INT, 1, 131072, True, True),
    "math.timeout_seconds": (_REAL, 0.0, 3600.0, False, True),
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


def _range_text(low, high, low_inclusive: bool, high_inclusive: bool) -> str:
    return f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"


def check_value(field: str, value) -> None:
    """Raises ConfigError unless ``value`` has the kind and range of ``LIMITS[field]``."""
    kind, low, high, low_inclusive, high_inclusive = LIMITS[field]
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok_kind = is_int if kind == _INT else is_real
    in_range = ok_kind and (low <= value if low_inclusive else low < value) and (
        value <= high if high_inclusive else value < high)
    if not in_range:
        raise ConfigError(f"config.{field} must be {kind} in {_range_text(low, high, low_inclusive, high_inclusive)},"
                          f" got {value!r}")


def validate_config(config) -> None:
    """Checks every numeric field present in ``config`` and the relations between them."""
    for field in LIMITS:
        try:
            value = _lookup(config, field)
        except KeyError:
            continue
        check_value(field, value)
    num_prompts = config.data.get("num_prompts", 0)
    lowest = 1 if config.task == "arithmetic" else 0  # 0 = every problem of a benchmark file
    # The arithmetic task generates num_prompts sums per split before any work (10**6: about half a minute).
    highest = MAX_GENERATED_PROMPTS if config.task == "arithmetic" else _BIG
    if (not isinstance(num_prompts, numbers.Integral) or isinstance(num_prompts, bool)
            or not lowest <= num_prompts <= highest):
        raise ConfigError(f"config.data.num_prompts must be an integer in [{lowest}, {highest}]"
                          f"{' (0 = all)' if lowest == 0 else ' (the sums generated per split)'}, got {num_prompts!r}")
    if config.sprt.min_samples > config.sprt.max_samples:
        raise ConfigError(f"config.sprt.min_samples={config.sprt.min_samples} must not exceed "
                          f"config.sprt.max_samples={config.sprt.max_samples}")
    if "model_dtype" in config:
        try:
            dtype_name(config.model_dtype, "config.model_dtype")
        except ValueError as error:
            raise ConfigError(str(error)) from error
    for axis in ("data", "fsdp", "tensor"):
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

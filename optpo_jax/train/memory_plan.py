"""Bytes per device of a run, from its config alone, before any weight is loaded or compiled.

A run holds, all the time: the policy's params, the KL reference when ``grpo.kl_coef`` > 0
(a copy for full fine-tuning; the frozen base itself with LoRA), the trained leaves' optimizer state (and
a float32 master copy with ``optimizer.float32_master``). On top of that, one phase at a
time: sampling a wave (its KV cache, one layer's keys and values again as they are
rewritten, the logits; with LoRA the merged params) or one
update micro-batch (gradients, the activations kept for the backward pass; with LoRA the
merged params). The plan is the persistent bytes plus the larger phase.

PPO (``algorithm = "ppo"``) adds its critic (``train.critic``): held throughout, a copy of
the weights (full fine-tuning) or its own adapters (LoRA) and their optimizer state; in the
update, its gradients, its activations (the same blocks again, a value head instead of
the vocabulary's) and, with LoRA, its merged kernels.

Activations per token and layer are counted from what the backward pass needs: the
block's inputs and norms, q/k/v before and after rope, the attention weights (float32
and compute dtype, [heads, row width] per token), the attention output, and the MLP's
gate, up, their product and silu's output. With remat a block keeps only its input and
one block is live at a time. The head: packed micro-batches (``policy_update.pack_width``
> 0) compute the log-probabilities in chunks of ``models.logprobs.logit_chunk_tokens``
targets, so their float32 logits, log-softmax and gradient are one chunk's, plus the
gathered hidden states of the targets; one rollout per row keeps them for every token.
The tokens of a micro-batch are its rollouts at full length (prompt bucket +
max_new_tokens), an upper bound on what packing feeds.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
from flax import nnx

from optpo_jax.models.config import DTYPES, ModelConfig
from optpo_jax.models.decoder import init_decoder
from optpo_jax.models.logprobs import logit_chunk_tokens
from optpo_jax.models.lora import LoRAConfig, targeted_kernels
from optpo_jax.models.sharding import MESH_AXES

_GIB = 1024**3
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


_MAX_BYTES = 1024**5  # 1 PiB: more than any one device holds


def parse_bytes(text: str) -> int:
    """'16GB' (10^9), '16GiB' (2^30), '1.5e9' -> bytes; a ConfigError (a ValueError) naming the text
    otherwise, and for a size that is not positive or beyond 1 PiB."""
    from optpo_jax.train.config_checks import ConfigError

    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    try:
        size = float(match.group(1)) * _UNITS[unit] if match and unit in _UNITS else None
    except ValueError:  # "1.2.3GB", "e9"
        size = None
    if size is None:
        raise ConfigError(f"--device_memory must be a size such as 16GB or 16GiB, got {text!r}")
    if not 1 <= size <= _MAX_BYTES:  # also inf ("1e400GB") and nan
        raise ConfigError(f"--device_memory must be a size from 1B to 1PiB, got {text!r}")
    return int(size)


def _bytes_of(dtype_name: str) -> int:
    return DTYPES[dtype_name](0).dtype.itemsize


@dataclasses.dataclass(frozen=True)
class RunShape:
    """The sizes a plan needs, read from an experiment config (see ``run_shape``)."""

    model: ModelConfig
    rows_per_wave: int
    prompt_tokens: int
    max_new_tokens: int
    micro_batch_rows: int
    grad_accumulation: int
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    float32_master: bool = False
    remat: bool = False
    batch_shards: int = 1  # devices the rows are split over (mesh data x fsdp)
    model_shards: int = 1  # devices each weight is split over (mesh fsdp x tensor)
    pack_width: int = 0  # policy_update.pack_width: 0 = one rollout per row
    kl_reference: bool = False  # grpo.kl_coef > 0: full fine-tuning keeps a copy of the initial params
    critic: bool = False  # algorithm "ppo": a critic model beside the policy

    @property
    def row_width(self) -> int:
        """Tokens per update row: a packed row, or one rollout's prompt bucket + max_new_tokens."""
        return max(self.pack_width, self.prompt_tokens + self.max_new_tokens)


def lora_sizes(model: ModelConfig, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(adapter parameters, parameters of the kernels they adapt), from the decoder's abstract
    shapes (``models.lora.targeted_kernels``; nothing allocated)."""
    abstract = nnx.split(nnx.eval_shape(lambda: init_decoder(model)))[1]
    kernels = [shape for _, shape in targeted_kernels(abstract, LoRAConfig(rank=rank, targets=targets))]
    return sum(rank * (size_in + size_out) for size_in, size_out in kernels), sum(math.prod(k) for k in kernels)


def _activation_bytes_per_token(model: ModelConfig, width: int, remat: bool) -> int:
    """Bytes one token keeps for the backward pass in the blocks (whole model; see the module docstring)."""
    compute = _bytes_of(model.compute_dtype)
    hidden, inner = model.hidden_size, model.intermediate_size
    queries, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    per_layer = (compute * (4 * hidden + 2 * (queries + 2 * kv) + queries + 4 * inner)
                 + 4 * 2 * hidden  # the norms' float32 inputs
                 + (4 + compute) * model.num_heads * width)
    if remat:
        return compute * hidden * model.num_layers + per_layer
    return per_layer * model.num_layers


def head_bytes(model: ModelConfig, tokens: int, targets: int, packed: bool) -> int:
    """The head's share of the update: float32 logits, log-softmax and gradient of every token (one rollout per
    row), or of one chunk of the ``targets`` plus their gathered hidden states and its gradient (packed)."""
    logits = 3 * 4 * model.vocab_size
    if not packed:
        return tokens * logits
    return logit_chunk_tokens(model.vocab_size, targets) * logits + 2 * targets * model.hidden_size * 4


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. ``persistent`` is held throughout; each phase adds its own part."""

    params: int
    reference: int
    trained: int
    optimizer_state: int
    critic: int  # PPO's critic weights or adapters (its optimizer state is in optimizer_state)
    kv_cache: int
    sampling_other: int
    gradients: int
    activations: int
    activations_with_remat: int
    update_other: int
    remat: bool
    update_rows: int  # rows of one update micro-batch

    @property
    def persistent(self) -> int:
        return self.params + self.reference + self.trained + self.optimizer_state + self.critic

    @property
    def sampling(self) -> int:
        return self.kv_cache + self.sampling_other

    @property
    def update(self) -> int:
        return self.gradients + (self.activations_with_remat if self.remat else self.activations) + self.update_other

    @property
    def total(self) -> int:
        return self.persistent + max(self.sampling, self.update)


def plan_memory(shape: RunShape) -> MemoryPlan:
    """The per-device bytes of a run of ``shape`` (see the module docstring for what is counted)."""
    model = shape.model
    param_bytes = _bytes_of(model.param_dtype)
    params = model.num_params() * param_bytes // shape.model_shards
    if shape.lora_rank:
        trained_count, kernel_count = lora_sizes(model, shape.lora_rank, shape.lora_targets)
        trained, trained_bytes, reference = trained_count * 4, 4, 0
        merged = kernel_count * param_bytes // shape.model_shards
    else:
        trained_count = model.num_params() // shape.model_shards
        trained, trained_bytes, merged = 0, param_bytes, 0
        reference = params if shape.kl_reference else 0
    master = 4 * trained_count if shape.float32_master and trained_bytes < 4 else 0
    moments = 2 * trained_count * (4 if master else trained_bytes)
    sequence = shape.prompt_tokens + shape.max_new_tokens
    wave_rows = math.ceil(shape.rows_per_wave / shape.batch_shards)
    kv_cache = (wave_rows * sequence * model.num_layers * 2 * model.num_kv_heads * model.head_dim
                * _bytes_of(model.compute_dtype))
    micro_rows = math.ceil(shape.micro_batch_rows / shape.grad_accumulation / shape.batch_shards)
    tokens = micro_rows * sequence
    head = head_bytes(model, tokens, micro_rows * shape.max_new_tokens, packed=shape.pack_width > 0)
    gradients = trained_count * (4 if master else trained_bytes) * (2 if shape.grad_accumulation > 1 else 1)
    models = 2 if shape.critic else 1  # the critic trains the same number of weights or adapters as the policy
    critic = (trained if shape.lora_rank else params) if shape.critic else 0
    # The critic's value head: the hidden states of its targets and their gradient, in float32.
    value_head = 2 * micro_rows * shape.max_new_tokens * model.hidden_size * 4 if shape.critic else 0
    activations = lambda remat: models * tokens * _activation_bytes_per_token(model, shape.row_width, remat) + head
    return MemoryPlan(
        params=params, reference=reference, trained=trained, optimizer_state=models * (master + moments),
        critic=critic, kv_cache=kv_cache,
        # Besides the cache: one layer's keys and values as they are rewritten, and the float32 logits.
        sampling_other=merged + kv_cache // model.num_layers + 2 * 4 * wave_rows * model.vocab_size,
        gradients=models * gradients,
        activations=activations(False) + value_head, activations_with_remat=activations(True) + value_head,
        update_other=models * merged, remat=shape.remat, update_rows=micro_rows,
    )


def _gib(value: int) -> str:
    return f"{value / _GIB:8.2f} GiB"


def format_plan(plan: MemoryPlan, device_bytes: int | None = None) -> str:
    """The plan as a table; with ``device_bytes``, whether it fits and, if not, what to change."""
    rows = [
        ("params", plan.params, ""), ("KL reference (copy)", plan.reference, ""),
        ("trained adapters", plan.trained, ""), ("critic (PPO)", plan.critic, ""),
        ("optimizer state", plan.optimizer_state, ""),
        ("= held throughout", plan.persistent, ""), ("sampling: KV cache of a wave", plan.kv_cache, ""),
        ("sampling: other", plan.sampling_other, ""), ("update: gradients", plan.gradients, ""),
        ("update: activations", plan.activations, f"  (with remat {_gib(plan.activations_with_remat).strip()})"),
        ("update: other", plan.update_other, ""),
        ("= total per device", plan.total, f"  (remat {'on' if plan.remat else 'off'})"),
    ]
    if device_bytes is not None:
        rows.append(("device memory", device_bytes, ": fits" if plan.total <= device_bytes else ": does NOT fit"))
    lines = [f"{label:<29}{_gib(value)}{note}" for label, value, note in rows]
    if device_bytes is not None and plan.total > device_bytes:
        lines.append(suggestions(plan, device_bytes))
    return "\n".join(lines)


def suggestions(plan: MemoryPlan, device_bytes: int) -> str:
    """Which config fields to change, largest saving first, when ``plan`` exceeds ``device_bytes``."""
    ideas = []
    if not plan.remat and plan.activations > plan.activations_with_remat:
        ideas.append((plan.activations - plan.activations_with_remat, "config.remat = True"))
    update_share = plan.activations_with_remat if plan.remat else plan.activations
    if plan.update_rows > 1:
        ideas.append((update_share // 2, ("halve the update's micro-batch rows: double "
                      "config.policy_update.grad_accumulation (or halve policy_update.micro_batch_rows)")))
    else:
        ideas.append((update_share // 4, ("shorter sequences: lower config.sampling.max_new_tokens "
                      "(activations grow with its square through attention)")))
    ideas.append((plan.kv_cache // 2, "halve config.rows_per_wave (or sampling.max_new_tokens)"))
    if plan.reference or plan.optimizer_state > plan.params:
        ideas.append((plan.reference + plan.optimizer_state, "train LoRA adapters: config.lora.rank = 16 (or 64)"))
    ideas.append((plan.persistent // 2, "shard the weights: config.mesh.fsdp = number of devices"))
    ideas.sort(key=lambda idea: -idea[0])
    over = plan.total - device_bytes
    return (f"over by {over / _GIB:.2f} GiB; change (saving per device, largest first):\n"
            + "\n".join(f"  - {text} (about {saving / _GIB:.2f} GiB)" for saving, text in ideas if saving > 0))


def _plan_model_config(config) -> ModelConfig:
    """The policy's architecture without loading weights: config.json of a local checkpoint, a preset
    named like the hub model (so planning needs no download), else the hub's config.json."""
    from pathlib import Path

    from transformers import AutoConfig

    from optpo_jax.models.config import PRESETS, from_hf_config
    from optpo_jax.tasks.arithmetic import POLICY_DIR

    dtype = config.get("model_dtype", "float32")
    path = config.model_path or (str(POLICY_DIR) if config.task == "arithmetic" else "")
    if not path:
        raise ValueError("config.model_path must name a checkpoint directory or hub model")
    preset_name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    if not Path(path).is_dir() and preset_name in PRESETS:
        return dataclasses.replace(PRESETS[preset_name], param_dtype=dtype, compute_dtype=dtype)
    return from_hf_config(AutoConfig.from_pretrained(path), param_dtype=dtype, compute_dtype=dtype)


def _mesh_shards(mesh_sizes: dict, num_devices: int) -> tuple[int, int]:
    sizes = {name: int(mesh_sizes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if free:
        sizes[free[0]] = max(num_devices // math.prod(s for s in sizes.values() if s != -1), 1)
    return sizes["data"] * sizes["fsdp"], sizes["fsdp"] * sizes["tensor"]


def run_shape(config, model: ModelConfig | None = None, num_devices: int = 1) -> RunShape:
    """The RunShape of an experiment config (``model`` defaults to the config's policy architecture)."""
    from optpo_jax.train.config_checks import check_context

    model = _plan_model_config(config) if model is None else model
    check_context(config, model.max_position_embeddings, f"the {model.model_type} model")
    buckets = tuple(config.sampling.prompt_buckets)
    prompt_tokens = max(buckets) if buckets else int(config.math.max_prompt_tokens)
    lora = config.get("lora")
    batch_shards, model_shards = _mesh_shards(dict(config.get("mesh", {})), num_devices)
    return RunShape(
        model=model, rows_per_wave=int(config.rows_per_wave), prompt_tokens=prompt_tokens,
        max_new_tokens=int(config.sampling.max_new_tokens),
        micro_batch_rows=int(config.policy_update.micro_batch_rows),
        grad_accumulation=int(config.policy_update.grad_accumulation),
        lora_rank=int(lora.rank) if lora is not None else 0,
        lora_targets=tuple(t for t in str(lora.targets).split(",") if t) if lora is not None else (),
        float32_master=bool(config.optimizer.get("float32_master", False)), remat=bool(config.get("remat", False)),
        batch_shards=batch_shards, model_shards=model_shards,
        pack_width=int(config.policy_update.get("pack_width", 0)), kl_reference=float(config.grpo.kl_coef) > 0,
        critic=config.get("algorithm", "grpo") == "ppo",
    )


def device_memory_limit() -> int | None:
    """Bytes the first accelerator may allocate (``memory_stats``), or None where unknown (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}  # another process's device raises here
    return stats.get("bytes_limit")


def check_fits(config, model: ModelConfig, device_bytes: int | None) -> None:
    """Raises ConfigError with the plan and what to change when the run would not fit ``device_bytes``
    (None: unknown, nothing checked)."""
    if device_bytes is None:
        return
    from optpo_jax.train.config_checks import ConfigError

    plan = plan_memory(run_shape(config, model, jax.device_count()))
    if plan.total > device_bytes:
        raise ConfigError("the run does not fit the device's memory (optpo-jax plan):\n"
                          + format_plan(plan, device_bytes))

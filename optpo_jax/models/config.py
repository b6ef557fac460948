"""Static architecture of the decoder, read from and written to transformers configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_KERNELS = ("reference", "dot_product")  # decoder.ATTENTION


def dtype_name(value: Any, argument: str = "dtype") -> str:
    """The name in ``DTYPES`` of a dtype given as a string or as JAX / numpy users pass it.

    Accepts "float32" / "bfloat16", ``jnp.float32`` / ``jnp.bfloat16``, ``np.float32``,
    ``jnp.dtype("bfloat16")`` and the like; anything else is a ValueError naming ``argument``
    and listing what is accepted.
    """
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    if name not in DTYPES:
        raise ValueError(
            f"{argument} must be one of {tuple(DTYPES)} (a string, jnp.float32 / jnp.bfloat16, np.float32, "
            f"or jnp.dtype('bfloat16')), got {value!r}"
        )
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Qwen3 decoder (hashable, static under jit).

    ``llama3_scaling`` is None or (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) of Llama 3's rope scaling. ``param_dtype`` and
    ``compute_dtype`` are "float32" or "bfloat16" (``jnp.bfloat16``, ``np.float32`` and other
    dtype objects are accepted and stored as these names); softmax and logits are float32.
    ``remat`` recomputes each block's activations in the backward pass (memory for time);
    ``attention`` names the kernel of ``decoder.ATTENTION``; ``fused_mlp`` computes the MLP's
    gate and up projections as one matmul and silu(gate) * up with ``decoder.gated_silu``'s
    hand-written gradient (False: two matmuls and XLA's gradient, the reference). All three
    are run options, not part of the checkpoint.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    llama3_scaling: tuple[float, float, float, int] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    attention: str = "reference"
    fused_mlp: bool = True

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        for name in ("param_dtype", "compute_dtype"):
            # Stored as the name (hashable, static under jit) whatever form of dtype was passed.
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"ModelConfig.{name}"))

    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attention += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size


def _rope_settings(hf_config: Any) -> tuple[float, tuple[float, float, float, int] | None]:
    """rope_theta and Llama 3 scaling from a transformers 4 or 5 config."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        scaling = (
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
        return theta, scaling
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")


def from_hf_config(hf_config: Any, param_dtype: Any = "float32", compute_dtype: Any = None) -> ModelConfig:
    """ModelConfig from a transformers PretrainedConfig of a Llama, Qwen2 or Qwen3 model.

    ``param_dtype`` / ``compute_dtype``: a name ("float32", "bfloat16") or a dtype
    (``jnp.bfloat16``, ``np.float32``, ...); ``compute_dtype`` defaults to ``param_dtype``.
    """
    param_dtype = dtype_name(param_dtype, "param_dtype")
    compute_dtype = param_dtype if compute_dtype is None else dtype_name(compute_dtype, "compute_dtype")
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (all layers use full attention here)")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {hf_config.hidden_act!r}")
    theta, scaling = _rope_settings(hf_config)
    num_heads = hf_config.num_attention_heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=theta,
        llama3_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 32768)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
    )


def to_hf_config(config: ModelConfig, **extra: Any):
    """A transformers config of the right class that describes ``config``."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.llama3_scaling is not None:
        factor, low, high, original = config.llama3_scaling
        rope = dict(rope, rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        dtype=config.param_dtype,
        **extra,
    )
    if config.model_type == "qwen2":
        return Qwen2Config(**common)
    if config.model_type == "qwen3":
        return Qwen3Config(attention_bias=config.qkv_bias, **common)
    return LlamaConfig(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, **common)


# Published config values (config.json on the hub), so models of real size can be built offline.
PRESETS = {
    "qwen2.5-math-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=4096,
    ),
    "qwen2.5-0.5b-instruct": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        llama3_scaling=(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True, max_position_embeddings=131072,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A published architecture by name, with optional field overrides (e.g. dtypes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

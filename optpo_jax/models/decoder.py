"""Flax NNX decoder of the Llama / Qwen2 / Qwen3 family and its functional forward.

One code path serves training forwards, padded prefill and one-token decode: every
token carries a position (-1 for padding), keys and values are written into a fixed
size cache whose slots remember their positions, and a query at position p attends to
the slots with 0 <= position <= p of its own row. Padding therefore never leaks into
real tokens, whether prompts are padded on the left or on the right.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from optpo_jax.models.config import ATTENTION_KERNELS, DTYPES, ModelConfig

_MASKED = float(np.finfo(np.float32).min)


@struct.dataclass
class KVCache:
    """Fixed-shape cache of S slots.

    Attributes:
      keys, values: per layer, [B, KV heads, S, head dim] in the compute dtype (the layout
        attention reads, so decoding never transposes the cache).
      slot_positions: [B, S] int32 position of the token in each slot, -1 if empty.
      lengths: [B] int32 real tokens cached per row (the next token's position).
      write_index: [] int32 first free slot (shared by all rows).
    """

    keys: tuple
    values: tuple
    slot_positions: jax.Array
    lengths: jax.Array
    write_index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, num_slots: int) -> KVCache:
    """An empty cache for ``batch_size`` rows and ``num_slots`` tokens."""
    shape = (batch_size, config.num_kv_heads, num_slots, config.head_dim)
    dtype = DTYPES[config.compute_dtype]
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        slot_positions=jnp.full((batch_size, num_slots), -1, jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        write_index=jnp.zeros((), jnp.int32),
    )


def grow_cache(cache: KVCache, num_slots: int) -> KVCache:
    """``cache`` with empty slots appended up to ``num_slots`` (one copy of it; the wave sampler grows
    its cache between decode segments so that every step reads only the filled part)."""
    extra = num_slots - cache.slot_positions.shape[1]
    if extra < 0:
        raise ValueError(f"cannot grow a cache of {cache.slot_positions.shape[1]} slots to {num_slots}")
    pad = lambda array: jnp.pad(array, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return cache.replace(keys=tuple(map(pad, cache.keys)), values=tuple(map(pad, cache.values)),
                         slot_positions=jnp.pad(cache.slot_positions, ((0, 0), (0, extra)), constant_values=-1))


@functools.lru_cache(maxsize=16)
def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim / 2] inverse frequencies, with Llama 3 scaling when configured."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inverse = 1.0 / (config.rope_theta**exponents)
    if config.llama3_scaling is None:
        return inverse.astype(np.float32)
    factor, low_freq_factor, high_freq_factor, original_context = config.llama3_scaling
    wavelength = 2 * np.pi / inverse
    scaled = np.where(wavelength > original_context / low_freq_factor, inverse / factor, inverse)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original_context / high_freq_factor) & (wavelength <= original_context / low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inverse_frequencies: np.ndarray) -> jax.Array:
    """Rotary embedding in the rotate-half layout of transformers. x [B, T, N, D]."""
    angles = positions[..., None].astype(jnp.float32) * inverse_frequencies
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32 as transformers does."""

    def __init__(self, size: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def _linear(config: ModelConfig, rngs, size_in: int, size_out: int, bias: bool) -> nnx.Linear:
    return nnx.Linear(
        size_in, size_out, use_bias=bias, dtype=DTYPES[config.compute_dtype],
        param_dtype=DTYPES[config.param_dtype], rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02),
    )


def attention_mask(query_positions, slot_positions, groups=None, branches=None) -> jax.Array:
    """[B, T, S] bool: which cache slot each query may attend to.

    A query at position p sees the slots of its own row holding positions 0..p. Packed
    training rows (``groups`` and ``branches`` [B, T], with the slots being the queries
    themselves) hold several prompts, each followed by several completions: a token sees
    only its own group, and within it the shared prompt (branch 0) and its own branch.
    """
    visible = (slot_positions[:, None, :] >= 0) & (slot_positions[:, None, :] <= query_positions[:, :, None])
    if groups is not None:
        same_group = groups[:, :, None] == groups[:, None, :]
        on_path = (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])
        visible = visible & same_group & on_path
    return visible


def attend(queries, keys, values, visible) -> jax.Array:
    """Grouped-query attention under a mask; scores and softmax in float32 (the reference path).

    queries [B, T, H, D], keys/values [B, KVH, S, D], visible [B, T, S] (``attention_mask``)
    -> [B, T, H, D].
    """
    batch, num_tokens, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", grouped, keys, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(head_dim).astype(np.float32)
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # Batch dimensions first and the result in the dot's natural order: a plain batched
    # matmul on every backend; the transpose after it touches only [B, T, H, D].
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, values)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, num_tokens, num_heads, head_dim)


def attend_dot_product(queries, keys, values, visible) -> jax.Array:
    """``attend`` through ``jax.nn.dot_product_attention``: cuDNN's fused attention on a GPU where it
    applies, XLA's otherwise; scores in the compute dtype, softmax in float32. Same shapes as ``attend``."""
    return jax.nn.dot_product_attention(queries, keys.swapaxes(1, 2), values.swapaxes(1, 2), mask=visible[:, None])


# Attention kernels by ModelConfig.attention; "reference" is the one the others are tested against.
ATTENTION = {"reference": attend, "dot_product": attend_dot_product}
assert tuple(ATTENTION) == ATTENTION_KERNELS, "ModelConfig validates attention against ATTENTION_KERNELS"


def _fused_projection(x: jax.Array, projections) -> list[jax.Array]:
    """Applies several Linear layers of one input as one matmul.

    Small-batch decoding is bound by per-matmul overheads; the concatenated kernel is
    loop-invariant, so XLA builds it once outside a decode loop.
    """
    kernel = jnp.concatenate([p.kernel[...] for p in projections], axis=1).astype(x.dtype)
    out = jnp.dot(x, kernel)
    if projections[0].bias is not None:
        out = out + jnp.concatenate([p.bias[...] for p in projections]).astype(x.dtype)
    sizes = np.cumsum([p.kernel.shape[1] for p in projections])[:-1]
    return jnp.split(out, sizes, axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = _linear(config, rngs, hidden, config.num_heads * head_dim, config.qkv_bias)
        self.k_proj = _linear(config, rngs, hidden, config.num_kv_heads * head_dim, config.qkv_bias)
        self.v_proj = _linear(config, rngs, hidden, config.num_kv_heads * head_dim, config.qkv_bias)
        self.o_proj = _linear(config, rngs, config.num_heads * head_dim, hidden, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, DTYPES[config.param_dtype])
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, DTYPES[config.param_dtype])

    def __call__(self, x, positions, layer_keys, layer_values, visible, write_index):
        """x [B, T, hidden] -> (out [B, T, hidden], keys, values) with this step written."""
        config = self.config
        batch, num_tokens, _ = x.shape
        queries, keys, values = _fused_projection(x, (self.q_proj, self.k_proj, self.v_proj))
        queries = queries.reshape(batch, num_tokens, config.num_heads, config.head_dim)
        keys = keys.reshape(batch, num_tokens, config.num_kv_heads, config.head_dim)
        values = values.reshape(batch, num_tokens, config.num_kv_heads, config.head_dim)
        if config.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        frequencies = rope_inverse_frequencies(config)
        queries = apply_rope(queries, positions, frequencies)
        keys = apply_rope(keys, positions, frequencies).transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)
        # Named scopes label the profile (experiments/profile_decode.py); they change no computation.
        if layer_keys is None:
            all_keys, all_values = keys, values
        else:
            with jax.named_scope("kv_cache_write"):
                start = (0, 0, write_index, 0)
                all_keys = jax.lax.dynamic_update_slice(layer_keys, keys.astype(layer_keys.dtype), start)
                all_values = jax.lax.dynamic_update_slice(layer_values, values.astype(layer_values.dtype), start)
        with jax.named_scope("attend"):
            out = ATTENTION[config.attention](queries, all_keys, all_values, visible)
        return self.o_proj(out.reshape(batch, num_tokens, -1)), all_keys, all_values


@jax.custom_vjp
def gated_silu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, with a hand-written gradient.

    Differentiated by XLA, the gradient's elementwise work fused into the transposes that
    feed the weight-gradient matmuls: on CPU those fusions cost more than the matmuls
    (docs/results.md, "Update throughput"). The barrier keeps the elementwise gradient a
    plain array in its natural layout.
    """
    return jax.nn.silu(gate) * up


def _gated_silu_forward(gate, up):
    return gated_silu(gate, up), (gate, up)


def _gated_silu_backward(residuals, grad):
    gate, up = residuals
    gate32, up32, grad32 = gate.astype(jnp.float32), up.astype(jnp.float32), grad.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate32)
    d_gate = grad32 * up32 * sigmoid * (1 + gate32 * (1 - sigmoid))
    d_up = grad32 * gate32 * sigmoid
    return jax.lax.optimization_barrier((d_gate.astype(gate.dtype), d_up.astype(up.dtype)))


gated_silu.defvjp(_gated_silu_forward, _gated_silu_backward)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(config, rngs, hidden, inner, config.mlp_bias)
        self.up_proj = _linear(config, rngs, hidden, inner, config.mlp_bias)
        self.down_proj = _linear(config, rngs, inner, hidden, config.mlp_bias)

    def __call__(self, x):
        if not self.config.fused_mlp:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = _fused_projection(x, (self.gate_proj, self.up_proj))
        return self.down_proj(gated_silu(gate, up))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        param_dtype = DTYPES[config.param_dtype]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, layer_keys, layer_values, visible, write_index):
        attended, keys, values = self.self_attn(
            self.input_layernorm(x), positions, layer_keys, layer_values, visible, write_index
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), keys, values


@nnx.remat
def _remat_block(block, x, positions, layer_keys, layer_values, visible, write_index):
    """A block whose activations are recomputed in the backward pass (ModelConfig.remat)."""
    return block(x, positions, layer_keys, layer_values, visible, write_index)


class Decoder(nnx.Module):
    """The causal language model. Attribute names follow transformers' checkpoint keys."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=DTYPES[config.compute_dtype],
            param_dtype=DTYPES[config.param_dtype], rngs=rngs, embedding_init=nnx.initializers.normal(0.02),
        )
        self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, DTYPES[config.param_dtype])
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, rngs, config.hidden_size, config.vocab_size, False)

    def hidden_states(self, tokens, positions, cache: KVCache | None = None, groups=None, branches=None):
        """tokens, positions [B, T] (position -1 = padding) -> (final-normed hidden [B, T, hidden], cache).

        ``groups`` / ``branches`` [B, T] pack several prompts and their completions into a row
        (``attention_mask``); only without a cache.
        """
        x = self.embed_tokens(tokens)
        if cache is None:
            slot_positions, write_index = positions, None
            cached_keys = cached_values = (None,) * len(self.layers)
        else:
            slot_positions = jax.lax.dynamic_update_slice(cache.slot_positions, positions, (0, cache.write_index))
            write_index, cached_keys, cached_values = cache.write_index, cache.keys, cache.values
        visible = attention_mask(positions, slot_positions, groups, branches)  # once, for every layer
        new_keys, new_values = [], []
        # Remat pays off only in a backward pass; cached forwards (sampling) have none, and nnx.remat
        # inside the sampler's decode loop fails to merge its Variables.
        apply_block = _remat_block if self.config.remat and cache is None else Block.__call__
        for block, layer_keys, layer_values in zip(self.layers, cached_keys, cached_values, strict=True):
            x, keys, values = apply_block(block, x, positions, layer_keys, layer_values, visible, write_index)
            new_keys.append(keys)
            new_values.append(values)
        if cache is not None:
            cache = KVCache(
                keys=tuple(new_keys), values=tuple(new_values), slot_positions=slot_positions,
                lengths=cache.lengths + jnp.sum(positions >= 0, axis=-1).astype(jnp.int32),
                write_index=cache.write_index + tokens.shape[1],
            )
        return self.norm(x), cache

    def head_kernel(self) -> jax.Array:
        """[hidden, V] output projection (the embedding's transpose when tied), in the compute dtype."""
        kernel = self.embed_tokens.embedding[...].T if self.config.tie_word_embeddings else self.lm_head.kernel[...]
        return kernel.astype(DTYPES[self.config.compute_dtype])

    def __call__(self, tokens, positions, cache: KVCache | None = None, logit_indices=None):
        """tokens, positions [B, T] (position -1 = padding) -> (logits [B, T, V] float32, cache).

        With ``logit_indices`` [B], logits are computed only at that token of each row: [B, 1, V].
        """
        x, cache = self.hidden_states(tokens, positions, cache)
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[:, None, None].astype(jnp.int32), axis=1)
        with jax.named_scope("head"):
            logits = jnp.dot(x, self.head_kernel())  # in the compute dtype, as nnx.Linear / Embed.attend did
        return logits.astype(jnp.float32), cache


def init_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (normal(0.02) weights, unit norms)."""
    return Decoder(config, nnx.Rngs(seed))


@functools.lru_cache(maxsize=16)
def graphdef_for(config: ModelConfig) -> nnx.GraphDef:
    """The static structure of the decoder for ``config``, without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: init_decoder(config)))[0]


def forward(
    config: ModelConfig,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    logit_indices: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Pure forward over a parameter state.

    Args:
      config: architecture (static).
      params: the decoder's ``nnx.State`` (``nnx.split(model)[1]``).
      tokens: [B, T] int32.
      positions: [B, T] int32 position of each token, -1 for padding.
      cache: an explicit KVCache with at least T free slots, or None for a plain
        forward over ``tokens`` alone.
      logit_indices: optional [B] int32 index of the one token per row whose logits are
        needed (a prefill needs only the last prompt token's); saves the [B, T, V] head.

    Returns:
      logits [B, T, V] float32 ([B, 1, V] with ``logit_indices``) and the updated cache
      (None without a cache).
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be [B, T]; got {tokens.shape}, {positions.shape}")
    model = nnx.merge(graphdef_for(config), params)
    return model(tokens, positions, cache, logit_indices)


def padded_positions(valid: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """Positions for a [B, T] mask of real tokens: 0, 1, ... over real tokens, -1 on padding.

    ``start`` [B] offsets the count, e.g. by the tokens already cached.
    """
    positions = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
    if start is not None:
        positions = positions + start[:, None]
    return jnp.where(valid, positions, -1)

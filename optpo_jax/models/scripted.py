"""A scripted policy: every rollout plays back one recorded generation, through the real sampler.

For replaying recorded traces (``../shared/data/vote_samples``: each question's answers and
generation lengths, in sampling order) as if a model produced them. The k-th rollout of
question q (``rollout_index`` k, given by the sampler's driver) generates exactly
``lengths[q, k]`` tokens: filler, then its recorded answer's token, then the stop token.
Its logits put all the mass on that token, so sampling at any temperature follows the
script. The prompt of question q is the single token ``q``.

It keeps its state where a decoder keeps its keys and values: a ``KVCache`` whose slot
at position 0 holds (q, k). The sampler therefore drives it exactly as it drives the
decoder (prefill, one-token decode, slot masks, ring writes), which is the point: the
replay measures the sampler, not a stand-in of it. With ``decoder`` set, every forward
also runs that decoder over the same tokens (its layers in the same cache) and discards
its logits, so a decode step costs what a model's step costs; without it a step costs
almost nothing and a replay measures the sampler's own overhead.

Tokens: 0 padding, 1 stop, 2 filler, 3 + s the answer in slot s (s < ``num_answers``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.models import decoder
from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import KVCache

PAD, STOP, FILLER, FIRST_ANSWER = 0, 1, 2, 3
_NEVER = -1e9  # a logit whose probability is exactly 0 in float32 after the softmax


@dataclasses.dataclass(frozen=True)
class ScriptedConfig:
    """The scripted policy's shape (hashable: static under jit).

    Attributes:
      num_answers: answer slots per question; the vocabulary is 3 + num_answers tokens.
      decoder: a decoder whose forward runs underneath (params["decoder"]), or None.
    """

    num_answers: int
    decoder: ModelConfig | None = None

    def __post_init__(self):
        if self.num_answers < 1:
            raise ValueError(f"ScriptedConfig.num_answers must be >= 1, got {self.num_answers}")

    @property
    def vocab_size(self) -> int:
        return FIRST_ANSWER + self.num_answers


def script_params(lengths, slot_ids, decoder_params=None) -> dict:
    """The scripts as the policy's params: ``lengths`` [Q, K] generated tokens (>= 2: answer and
    stop) and ``slot_ids`` [Q, K] slot of each recorded answer, -1 for none; ``decoder_params``
    the underlying decoder's ``nnx.State`` when the config has one."""
    lengths, slot_ids = np.asarray(lengths), np.asarray(slot_ids)
    if lengths.shape != slot_ids.shape or lengths.ndim != 2:
        raise ValueError(f"lengths and slot_ids must both be [Q, K], got {lengths.shape} and {slot_ids.shape}")
    if lengths.size and lengths.min() < 2:
        raise ValueError(f"every scripted length must be >= 2 (answer and stop token), got {lengths.min()}")
    params = {"lengths": jnp.asarray(lengths, jnp.int32), "slot_ids": jnp.asarray(slot_ids, jnp.int32)}
    return params if decoder_params is None else {**params, "decoder": decoder_params}


def init_cache(config: ScriptedConfig, batch_size: int, num_slots: int) -> KVCache:
    """The decoder's layers (if any), then one layer of one head of width 1 whose keys hold the
    question and values the rollout index."""
    shape = (batch_size, 1, num_slots, 1)
    cache = KVCache(
        keys=(jnp.zeros(shape, jnp.float32),), values=(jnp.zeros(shape, jnp.float32),),
        slot_positions=jnp.full((batch_size, num_slots), -1, jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32), write_index=jnp.zeros((), jnp.int32),
    )
    if config.decoder is None:
        return cache
    below = decoder.init_cache(config.decoder, batch_size, num_slots)
    return cache.replace(keys=below.keys + cache.keys, values=below.values + cache.values)


def forward(config: ScriptedConfig, params: dict, tokens, positions, cache: KVCache, logit_indices=None,
            rollout_index=None):
    """``decoder.forward``'s contract: tokens, positions [B, T] -> (logits [B, T or 1, V], cache).

    ``rollout_index`` [B] (prefill only) picks each row's script; decode steps read it back
    from the cache.
    """
    batch, num_tokens = tokens.shape
    below_keys, below_values = cache.keys[:-1], cache.values[:-1]
    model_logits = jnp.zeros((batch, num_tokens, 1), jnp.float32)
    if config.decoder is not None:  # the model's work; its logits are not what this policy says
        model_logits, below = decoder.forward(config.decoder, params["decoder"], tokens % config.decoder.vocab_size,
                                              positions, cache.replace(keys=below_keys, values=below_values))
        below_keys, below_values = below.keys, below.values
    start = (0, 0, cache.write_index, 0)
    index = jnp.zeros((batch,), jnp.int32) if rollout_index is None else rollout_index
    written = lambda value: jnp.broadcast_to(value.astype(jnp.float32)[:, None, :, None], (batch, 1, num_tokens, 1))
    keys = jax.lax.dynamic_update_slice(cache.keys[-1], written(tokens), start)
    values = jax.lax.dynamic_update_slice(cache.values[-1], written(jnp.broadcast_to(index[:, None], tokens.shape)),
                                          start)
    slot_positions = jax.lax.dynamic_update_slice(cache.slot_positions, positions, (0, cache.write_index))
    first_slot = (slot_positions == 0).astype(jnp.float32)  # [B, S]: the prompt's token
    question = jnp.sum(keys[:, 0, :, 0] * first_slot, axis=-1).astype(jnp.int32)
    rollout = jnp.sum(values[:, 0, :, 0] * first_slot, axis=-1).astype(jnp.int32)
    length = params["lengths"][question, rollout][:, None]
    answer = params["slot_ids"][question, rollout][:, None]
    generated = positions  # the prompt is one token: the query at position p emits completion token p
    target = jnp.where(generated == length - 1, STOP,
                       jnp.where((generated == length - 2) & (answer >= 0), FIRST_ANSWER + answer, FILLER))
    logits = jnp.where(jnp.arange(config.vocab_size) == target[..., None], 0.0, _NEVER)
    # Times zero, but kept: XLA does not fold x * 0 for floats, so the model's forward is not dead code.
    logits = logits + 0.0 * jnp.sum(model_logits, axis=-1, keepdims=True)
    if logit_indices is not None:
        logits = jnp.take_along_axis(logits, logit_indices[:, None, None].astype(jnp.int32), axis=1)
    cache = KVCache(keys=(*below_keys, keys), values=(*below_values, values), slot_positions=slot_positions,
                    lengths=cache.lengths + jnp.sum(positions >= 0, axis=-1).astype(jnp.int32),
                    write_index=cache.write_index + num_tokens)
    return logits, cache

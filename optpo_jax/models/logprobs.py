"""Log-probabilities of target tokens for training, without the [tokens, vocabulary] float32 logits.

The update needs log softmax(logits / temperature) at one target per token. Written out
whole, the float32 logits, their log-softmax and its gradient are the largest activation
of a large-vocabulary model (151,936 x 4 bytes x 3 per token for Qwen2.5). Here the head
runs over chunks of ``logit_chunk_tokens`` tokens under ``jax.checkpoint``: the forward
keeps one chunk's logits at a time and the backward recomputes them chunk by chunk, so
the memory is one chunk's, whatever the number of tokens.

``packed_logprobs`` is the training forward over packed rows (``train.packing``): several
prompts per row, each prompt once, followed by all of its completions, with every target
naming the row position whose hidden state predicts it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import graphdef_for

# Elements of one chunk's logits: 2^26 float32 = 256 MiB (441 tokens of a 151,936 vocabulary).
LOGIT_CHUNK_ELEMENTS = 2**26


def logit_chunk_tokens(vocab_size: int, num_tokens: int) -> int:
    """Tokens per chunk of the head: all of them when their logits fit ``LOGIT_CHUNK_ELEMENTS``."""
    return max(1, min(num_tokens, LOGIT_CHUNK_ELEMENTS // vocab_size))


def _chunk_logprobs(hidden, head_kernel, targets, temperature):
    """[C, hidden] x [hidden, V] -> [C] float32 log-probabilities of ``targets`` [C]."""
    logits = jnp.dot(hidden, head_kernel, preferred_element_type=jnp.float32) / temperature
    target_logits = jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=1)[:, 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def target_logprobs(hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """log softmax(hidden @ head_kernel / temperature) at ``targets``, in float32, chunked over tokens.

    Args:
      hidden: [N, hidden] final-normed hidden states.
      head_kernel: [hidden, V] output projection.
      targets: [N] int32 token ids.
      temperature: the sampling temperature.

    Returns:
      [N] float32. Equal to ``grpo.token_logprobs`` of the full logits (tested).
    """
    num_tokens = hidden.shape[0]
    chunk = logit_chunk_tokens(head_kernel.shape[1], num_tokens)
    if chunk == num_tokens:
        return _chunk_logprobs(hidden, head_kernel, targets, temperature)
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
    targets = jnp.pad(targets, (0, pad)).reshape(num_chunks, chunk)
    one_chunk = jax.checkpoint(lambda h, t: _chunk_logprobs(h, head_kernel, t, temperature))
    return jax.lax.map(lambda args: one_chunk(*args), (hidden, targets)).reshape(-1)[:num_tokens]


def packed_logprobs(config: ModelConfig, params: nnx.State, tokens: jax.Array, positions: jax.Array,
                    groups: jax.Array, branches: jax.Array, target_index: jax.Array, targets: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """Log-probabilities of ``targets`` under the decoder, from packed rows.

    Args:
      config: architecture (static).
      params: the decoder's ``nnx.State``.
      tokens, positions, groups, branches: [P, L] packed rows (``decoder.attention_mask``).
      target_index: [R, T] int32 flat index (row * L + column) of the token whose hidden
        state predicts each target.
      targets: [R, T] int32 target tokens.
      temperature: the sampling temperature.

    Returns:
      [R, T] float32 log-probabilities.
    """
    model = nnx.merge(graphdef_for(config), params)
    hidden, _ = model.hidden_states(tokens, positions, groups=groups, branches=branches)
    predicting = jnp.take(hidden.reshape(-1, hidden.shape[-1]), target_index.reshape(-1), axis=0)
    logprobs = target_logprobs(predicting, model.head_kernel(), targets.reshape(-1), temperature)
    return logprobs.reshape(targets.shape)

"""models/logprobs.py: log-probabilities of targets from the head in chunks, and from packed rows."""

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.grpo import token_logprobs
from optpo_jax.models import logprobs


def test_chunked_target_logprobs_and_their_gradients_equal_the_full_log_softmax(monkeypatch):
    # Reference: grpo.token_logprobs over the whole [N, V] logits (jax.nn.log_softmax).
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, 37), jnp.int32)
    weights = jnp.asarray(rng.normal(size=37), jnp.float32)
    full = lambda h, w: jnp.sum(weights * token_logprobs(h @ w, targets, 0.7))
    chunked = lambda h, w: jnp.sum(weights * logprobs.target_logprobs(h, w, targets, 0.7))
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 8 * 50)  # 8 tokens a chunk: 5 chunks, the last padded
    assert logprobs.logit_chunk_tokens(50, 37) == 8
    np.testing.assert_allclose(np.asarray(logprobs.target_logprobs(hidden, head, targets, 0.7)),
                               np.asarray(token_logprobs(hidden @ head, targets, 0.7)), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(chunked, argnums=(0, 1))(hidden, head), jax.grad(full, argnums=(0, 1))(hidden, head),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    # The chunks' logits are all the forward keeps: no [N, V] array in the compiled program.
    text = jax.jit(jax.grad(chunked)).lower(hidden, head).as_text()
    assert "37x50" not in text and "40x50" not in text

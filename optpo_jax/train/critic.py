"""PPO's critic: a second decoder from the policy's checkpoint with a scalar value head.

The critic is a separate model, not a head on the policy's trunk: its value loss then
moves none of the policy's weights (a shared trunk would mix the two losses in every
weight, with a coefficient to tune), it starts from the same checkpoint (as verl's
critic), and its value head starts at 0, so its first values are 0 and PPO's first
advantages are the returns. Its memory is the price: with full fine-tuning a second copy
of the weights and their optimizer state (``optpo-jax plan`` counts them); with LoRA the
critic is its own adapters over the policy's frozen base, so it adds adapters only.

Critic params: ``{"trunk": decoder params, "value_head": {"kernel": [hidden], "bias": []}}``,
or with LoRA ``{"adapters": ..., "value_head": ...}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from optpo_jax.grpo import GRPOBatch
from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import graphdef_for
from optpo_jax.models.lora import LoRAConfig, init_adapters, merge_adapters
from optpo_jax.train.distributed import mesh_of, replicate_unplaced


def init_critic(params, lora: LoRAConfig | None, seed: int) -> dict:
    """The critic of the initial policy ``params``: a copy of them (or, with ``lora``, fresh adapters
    over them, drawn from ``seed``) and a zero value head as wide as the final norm, placed like the policy."""
    hidden_size = int(params["norm"]["weight"][...].shape[-1])
    head = {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
    mesh = mesh_of(params)
    if lora is None:
        # A copy: the update donates the critic's buffers, and the policy's must survive.
        return {"trunk": jax.tree.map(jnp.copy, params), "value_head": replicate_unplaced(head, mesh)}
    return replicate_unplaced({"adapters": init_adapters(params, lora, seed=seed), "value_head": head}, mesh)


def critic_trunk(critic: dict, base_params, lora: LoRAConfig | None):
    """The critic's decoder params: its own copy, or the frozen base with its adapters merged in."""
    return critic["trunk"] if lora is None else merge_adapters(base_params, critic["adapters"], lora)


def batch_values(model_config: ModelConfig, critic: dict, base_params, lora: LoRAConfig | None,
                 batch: GRPOBatch) -> jax.Array:
    """[R, T] float32 value of the state before each target token of ``batch``, in either layout.

    The value of target t is read from the hidden state that predicts it (the token before
    it), as the policy's log-probability is.
    """
    model = nnx.merge(graphdef_for(model_config), critic_trunk(critic, base_params, lora))
    hidden, _ = model.hidden_states(batch.input_tokens, batch.positions, groups=batch.groups,
                                    branches=batch.branches)
    if batch.target_index is not None:
        hidden = jnp.take(hidden.reshape(-1, hidden.shape[-1]), batch.target_index.reshape(-1), axis=0)
        hidden = hidden.reshape(*batch.target_index.shape, -1)
    head = critic["value_head"]
    return jnp.einsum("rth,h->rt", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]


batch_values_jit = jax.jit(batch_values, static_argnames=("model_config", "lora"))

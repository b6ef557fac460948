"""What XLA allocates for a run on this backend, compiled and not run: the check of ``memory_plan``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.grpo import GRPOBatch
from optpo_jax.sampler import sample_padded
from optpo_jax.train.memory_plan import run_shape
from optpo_jax.train.setup import build_setup


def _tree_bytes(tree) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def _compiled_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def compiled_peak(config) -> dict:
    """What XLA allocates for a run of ``config`` on this backend: {"update", "sampling", "total"} bytes.

    Loads the policy and compiles (without running) one update micro-batch at the plan's
    width and one wave; each phase is its executable's arguments + outputs - aliased +
    temporaries, plus the run's arrays it does not take (a reference copy; while
    sampling, the optimizer state and PPO's critic). The check of ``plan_memory`` on a backend without
    ``memory_stats`` (CPU).
    """
    setup = build_setup(config)
    state = setup.initial_state()
    shape = run_shape(config, setup.policy.config)
    lora = state.lora is not None
    rows = shape.micro_batch_rows // shape.grad_accumulation
    sequence = shape.prompt_tokens + shape.max_new_tokens
    if shape.pack_width:  # the plan's tokens (every rollout at full length) in packed rows
        packed_rows, width, targets = -(-rows * sequence // shape.row_width), shape.row_width, shape.max_new_tokens
        index = jnp.zeros((rows, targets), jnp.int32)
        packed = {"groups": jnp.zeros((packed_rows, width), jnp.int32), "target_index": index,
                  "branches": jnp.zeros((packed_rows, width), jnp.int32)}
    else:
        packed_rows, width, targets, packed = rows, sequence, sequence, {}
    tokens = jnp.zeros((packed_rows, width), jnp.int32)
    batch = GRPOBatch(input_tokens=tokens, target_tokens=jnp.zeros((rows, targets), jnp.int32),
                      loss_mask=jnp.ones((rows, targets), bool), advantages=jnp.zeros((rows,)),
                      old_logprobs=jnp.zeros((rows, targets)), positions=tokens, **packed)
    trained, opt_state = state.params, state.opt_state
    if state.critic is not None:  # PPO: both models, per-token advantages, the critic's values and returns
        trained, opt_state = ({"policy": state.params, "critic": state.critic},
                              {"policy": state.opt_state, "critic": state.critic_opt_state})
        per_token = jnp.zeros((rows, targets))
        batch = batch.replace(advantages=per_token, old_values=per_token, returns=per_token)
    step = setup.learner.update_step
    gradients = _compiled_bytes(step.gradients.lower(trained, batch, state.base_params).compile())
    grads = jax.eval_shape(step.gradients, trained, batch, state.base_params)[0]
    apply = _compiled_bytes(step.apply.lower(trained, opt_state, grads, jnp.zeros(())).compile())
    # Each half holds what the other takes: the optimizer state while the gradients are computed.
    update = max(gradients + _tree_bytes(opt_state), apply)
    update += 0 if lora else _tree_bytes(state.reference_params)  # a reference copy stays on the device meanwhile
    wave_rows = config.rows_per_wave
    prompts = np.zeros((wave_rows, shape.prompt_tokens), np.int32)
    wave = sample_padded.lower(state.policy_params(), prompts, np.ones(wave_rows, np.int32), np.ones(wave_rows, bool),
                               jax.random.key(0), setup.policy.config, setup.learner.config.sampling)
    sampling = _compiled_bytes(wave.compile()) + _tree_bytes(opt_state) + _tree_bytes(state.critic)
    # With LoRA: the frozen base and the adapters, besides the merged params; else any reference copy.
    sampling += _tree_bytes(state.base_params) + _tree_bytes(state.params) if lora else _tree_bytes(state.reference_params)
    return {"update": update, "sampling": sampling, "total": max(update, sampling)}

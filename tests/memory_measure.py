"""Peak bytes of a run's two phases on this backend, from XLA's compiled memory analysis (for the plan's tests)."""

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.grpo import GRPOBatch
from optpo_jax.sampler import sample_padded
from optpo_jax.train.loop import init_train_state
from optpo_jax.train.memory_plan import run_shape
from optpo_jax.train.setup import build_setup


def _bytes(tree) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def _peak(compiled) -> int:
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def measured_peak(config) -> dict:
    """{"update", "sampling", "total"} bytes: each phase's compiled peak plus the run's arrays it does not take."""
    setup = build_setup(config)
    state = init_train_state(setup)
    shape = run_shape(config, setup.policy.config)
    lora = state.lora is not None
    rows = shape.micro_batch_rows // shape.grad_accumulation
    width = shape.prompt_tokens + shape.max_new_tokens
    tokens = jnp.zeros((rows, width), jnp.int32)
    batch = GRPOBatch(input_tokens=tokens, target_tokens=tokens, loss_mask=jnp.ones((rows, width), bool),
                      advantages=jnp.zeros((rows,)), old_logprobs=jnp.zeros((rows, width)), positions=tokens)
    base = state.ref_params if lora else None
    update = _peak(setup.learner.update_step.lower(state.params, state.opt_state, batch, base).compile())
    update += 0 if lora else _bytes(state.ref_params)  # the reference copy stays on the device meanwhile
    wave_rows = config.rows_per_wave
    prompts = np.zeros((wave_rows, shape.prompt_tokens), np.int32)
    sampling = _peak(sample_padded.lower(state.policy_params(), prompts, np.ones(wave_rows, np.int32),
                                         np.ones(wave_rows, bool), jax.random.key(0), setup.policy.config,
                                         setup.learner.config.sampling).compile())
    sampling += _bytes(state.opt_state) + _bytes(state.ref_params) + (_bytes(state.params) if lora else 0)
    return {"update": update, "sampling": sampling, "total": max(update, sampling)}

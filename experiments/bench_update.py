"""GRPO update throughput on the embedded task against this CPU's matmul limit.

One wave of real rollouts of the shipped policy (the demo's 256 rows, 32 new tokens)
becomes one GRPO micro-batch, trained (forward + backward + AdamW, jitted, the same
``make_update_step`` the loop uses) two ways in this one process:

- padded: every micro-batch at the prompt bucket + max_new_tokens (the old update);
- fitted: at its longest sequence rounded up to ``policy_update.width_bucket``.

Tokens are the real (prompt + completion) tokens of the rows; the limit is what those
tokens would cost at 6 x parameters FLOPs each at this machine's matmul rate for a
[tokens, hidden] x [hidden, parameters / hidden] float32 product (the shape of the
model's own matmuls). The last line is the fitted update's fraction of that limit.

    python experiments/bench_update.py [--rows 256] [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import best_time

from optpo_jax.default_config import arithmetic_config
from optpo_jax.grpo import GRPOBatch
from optpo_jax.train.loop import batch_problems, init_train_state
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.step import grpo_arrays, micro_batch_shape


def real_micro_batch(rows: int):
    """(setup, state, arrays [rows, W - 1]) from one step's rollouts of the shipped policy, with random advantages."""
    config = arithmetic_config("optpo")
    config.policy_update.micro_batch_rows = rows
    setup = build_setup(config)
    state = init_train_state(setup)
    problems = batch_problems(setup.train_problems, 0, config.prompts_per_step, config.seed)
    rollouts, _ = collect_rollouts(state.policy_params(), setup.policy.config, setup.task, problems, setup.learner.config,
                                   jax.random.key(0))
    chosen = np.arange(min(rows, len(rollouts.prompt_index)))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    return setup, state, grpo_arrays(rollouts, chosen, advantages)


def matmul_limit(tokens: int, hidden: int, num_params: int, repeats: int) -> float:
    """Tokens/s if each token cost 6 x num_params FLOPs at the matmul rate of [tokens, hidden] x [hidden, P / hidden]."""
    activations = jnp.ones((tokens, hidden), jnp.float32)
    weights = jnp.ones((hidden, num_params // hidden), jnp.float32) * 1e-3
    matmul = jax.jit(lambda a, w: a @ w)
    matmul(activations, weights).block_until_ready()
    return tokens / (3 * best_time(lambda: matmul(activations, weights).block_until_ready(), repeats))


def time_update(setup, state, arrays: dict, width: int, repeats: int) -> tuple[float, float]:
    """(seconds of one update at ``width`` columns, compile seconds), the best of ``repeats`` after compiling."""
    batch = GRPOBatch(**{name: jnp.asarray(values[:, :width] if values.ndim == 2 else values)
                         for name, values in arrays.items()})
    params, opt_state = state.params, state.opt_state
    step = setup.learner.update_step
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates its inputs
    compile_seconds = best_time(lambda: jax.block_until_ready(step(copy(params), copy(opt_state), batch, None)), 1)
    seconds = best_time(lambda: jax.block_until_ready(step(copy(params), copy(opt_state), batch, None)), repeats)
    return seconds, compile_seconds - seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="micro-batch rows (the demo's micro_batch_rows)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup, state, arrays = real_micro_batch(args.rows)
    lengths = (arrays["positions"] >= 0).sum(axis=1)
    real_tokens = int(lengths.sum())
    full_width = arrays["input_tokens"].shape[1]
    update = setup.learner.config.update
    _, fitted_width = micro_batch_shape(len(lengths), int(lengths.max()), args.rows, full_width, update)
    model = setup.policy.config
    limit = matmul_limit(real_tokens, model.hidden_size, model.num_params(), 10 * args.repeats)
    print(f"shipped policy ({model.num_params() / 1e6:.2f}M parameters), {len(lengths)} rows, {real_tokens:,} real "
          f"tokens (prompt + completion; longest {int(lengths.max())}), jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")
    print("| update | width | seconds | compile s | real tokens/s | fraction of matmul limit |")
    print("|---|---|---|---|---|---|")
    rates = {}
    for name, width in (("padded (bucket + max_new_tokens)", full_width), ("fitted (longest, rounded up)",
                                                                             fitted_width)):
        seconds, compile_seconds = time_update(setup, state, arrays, width, args.repeats)
        rates[name] = real_tokens / seconds
        print(f"| {name} | {width} | {seconds:.3f} | {compile_seconds:.1f} | {rates[name]:,.0f} "
              f"| {rates[name] / limit:.0%} |")
    fitted = rates["fitted (longest, rounded up)"]
    print(f"matmul limit {limit:,.0f} tokens/s; fitted / padded {fitted / rates['padded (bucket + max_new_tokens)']:.2f}x")
    print(f"fraction of the matmul limit: {fitted / limit:.2f}")


if __name__ == "__main__":
    main()

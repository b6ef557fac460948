"""GRPO update throughput on the embedded task: the reference path against the packed one, in one process.

One step's real rollouts of the shipped policy (the demo's 256-row micro-batch, 32 new
tokens) are trained (forward + backward + AdamW, jitted, the ``make_update_step`` the
loop uses) two ways:

- reference: the update as it was before issue 27: one rollout per row at its longest
  sequence rounded up to ``policy_update.width_bucket``, full-vocabulary logits
  (``policy_update.pack_width=0``), the MLP as two matmuls with XLA's gradient
  (``ModelConfig.fused_mlp=False``);
- packed: each prompt once with its completions, rows of ``pack_width`` tokens, the head
  in chunks (``train.packing``, ``models.logprobs``), the fused MLP (the defaults).

Both give the same update (tests/train/test_update.py, tests/train/test_packing.py). The limit is what the rollouts'
tokens (the prompt and completion of every rollout as the reference path feeds them,
8,182 here) would cost at 6 x parameters
FLOPs each at this machine's matmul rate for a [tokens, hidden] x [hidden, parameters /
hidden] float32 product (the shape of the model's own matmuls); the fraction is that
limit's share reached. Packed, a prompt is computed once for all of its completions, so
the hardware works on fewer tokens than the rollouts hold: the table also gives the
fraction for the tokens each path computes.

    python experiments/bench_update.py [--rows 256] [--repeats 10] [--pack_width 128]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import best_time, matmul_limit, timed

from optpo_jax.default_config import arithmetic_config
from optpo_jax.grpo import GRPOBatch
from optpo_jax.train.batches import batch_problems
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.setup import build_setup
from optpo_jax.train.update import fit_micro_batch, make_update_step, update_rows


def real_rollouts(rows: int):
    """(setup, state, update_rows of ``rows`` rollouts) from one step of the shipped policy, random advantages."""
    config = arithmetic_config("optpo")
    config.policy_update.micro_batch_rows = rows
    setup = build_setup(config)
    state = setup.initial_state()
    problems = batch_problems(setup.train_problems, 0, config.prompts_per_step, config.seed)
    rollouts, _ = collect_rollouts(state.policy_params(), setup.learner, problems, jax.random.key(0))
    chosen = np.arange(min(rows, len(rollouts.prompt_index)))
    advantages = np.random.default_rng(0).standard_normal(len(rollouts.prompt_index)).astype(np.float32)
    return setup, state, update_rows(rollouts, chosen, advantages)


def time_update(setup, state, batch: GRPOBatch, repeats: int, model_config) -> tuple[float, float]:
    """(seconds of one update of ``batch`` by ``model_config``, compile seconds), the best of ``repeats`` after
    compiling."""
    params, opt_state = state.params, state.opt_state
    step = make_update_step(model_config, setup.optimizer, setup.learner.config.grpo)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates its inputs
    update = lambda: step(copy(params), copy(opt_state), batch, None)
    compile_seconds = timed(update)[1]
    seconds = best_time(update, repeats)
    return seconds, compile_seconds - seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="micro-batch rows (the demo's micro_batch_rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pack_width", type=int, default=None, help="tokens per packed row (default: the config's)")
    args = parser.parse_args()
    setup, state, rows = real_rollouts(args.rows)
    update = setup.learner.config.update
    packed_update = update if args.pack_width is None else dataclasses.replace(update, pack_width=args.pack_width)
    rollout_tokens = int((rows.prompt_lengths + rows.completion_lengths - 1).sum())
    model = setup.policy.config
    # A trained token costs 6 x parameters FLOPs (forward and backward), three times the matmul limit's 2 x.
    limit = matmul_limit(rollout_tokens, model.hidden_size, model.num_params(), 10 * args.repeats) / 3
    print(f"shipped policy ({model.num_params() / 1e6:.2f}M parameters), {len(rows)} rollouts, "
          f"{rollout_tokens:,} rollout tokens (prompt + completion, as fed), jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}; matmul limit {limit:,.0f} tokens/s")
    print("| update | rows x width | tokens computed | seconds | compile s | rollout tokens/s | fraction of the limit "
          "| fraction for the tokens computed |")
    print("|---|---|---|---|---|---|---|---|")
    seconds = {}
    reference_model = dataclasses.replace(model, fused_mlp=False)
    for name, config, model_config in (
            ("reference (one rollout per row)", dataclasses.replace(update, pack_width=0), reference_model),
            (f"packed ({packed_update.pack_width}-token rows)", packed_update, model)):
        host_batch = fit_micro_batch(rows, args.rows, config, None)
        batch = jax.tree.map(jnp.asarray, host_batch)
        computed = int((host_batch.positions >= 0).sum())
        seconds[name], compile_seconds = time_update(setup, state, batch, args.repeats, model_config)
        rate = rollout_tokens / seconds[name]
        print(f"| {name} | {' x '.join(map(str, host_batch.input_tokens.shape))} | {computed:,} | {seconds[name]:.3f} "
              f"| {compile_seconds:.1f} | {rate:,.0f} | {rate / limit:.2f} "
              f"| {computed / seconds[name] / limit:.2f} |")
    reference, packed = seconds.values()
    print(f"update speed-up over the reference path: {reference / packed:.2f}x; "
          f"fraction of the matmul limit: {rollout_tokens / packed / limit:.2f}")


if __name__ == "__main__":
    main()

"""Pretrains the embedded policy on the source distribution of the arithmetic task.

Trains our NNX decoder (Llama-style, ~0.9M parameters) with AdamW on fresh source-
distribution sums every step, and stops as soon as the sampled pass@1 on a shifted
*validation* set (its own seed, disjoint from the test set's) reaches ``--target``:
the shipped model is caught in the few-minute window where it has started to add but
is unsure on 5-term sums, which leaves room for test-time RL. Writes an HF-format
checkpoint (config.json + model.safetensors) and training.json.

    python experiments/pretrain_arith.py --seed 0 --out optpo_jax/tasks/arith_policy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from optpo_jax.grpo import token_logprobs
from optpo_jax.models import HFModel, ModelConfig, forward, init_decoder, save_hf
from optpo_jax.sampler import SamplingConfig, right_padded
from optpo_jax.tasks.arithmetic import SHIFTED, SOURCE, ArithmeticTask, generate_problems
from optpo_jax.train.evaluation import evaluate

MODEL = ModelConfig(
    model_type="llama", vocab_size=16, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
    num_kv_heads=4, head_dim=32, tie_word_embeddings=True, max_position_embeddings=128, rms_norm_eps=1e-5,
)
SEQUENCE_WIDTH = 48
VALIDATION_SEED_OFFSET = 7_000_000  # the test set uses seeds < 1000


def training_batch(task: ArithmeticTask, problems):
    """Inputs, targets, positions and completion mask [B, SEQUENCE_WIDTH - 1] for teacher forcing."""
    sequences, prompt_lengths = [], []
    for problem in problems:
        prompt = task.prompt_tokens(problem)
        sequences.append(prompt + task.tokenizer.encode(problem.solution))
        prompt_lengths.append(len(prompt))
    if max(len(s) for s in sequences) > SEQUENCE_WIDTH:
        raise ValueError(f"a training sequence is longer than SEQUENCE_WIDTH={SEQUENCE_WIDTH}")
    tokens, lengths = right_padded(sequences, task.pad_token_id, SEQUENCE_WIDTH)
    columns = np.arange(SEQUENCE_WIDTH - 1)[None]
    positions = np.where(columns < lengths[:, None] - 1, columns, -1)
    # Loss on every completion token: target index t predicts token t + 1.
    mask = (columns >= np.array(prompt_lengths)[:, None] - 1) & (columns < lengths[:, None] - 1)
    return tokens[:, :-1], tokens[:, 1:], positions.astype(np.int32), mask.astype(np.float32)


def make_train_step(optimizer):
    @jax.jit
    def train_step(params, opt_state, inputs, targets, positions, mask):
        def loss_fn(trained):
            logits, _ = forward(MODEL, trained, inputs, positions)
            return -jnp.sum(token_logprobs(logits, targets) * mask) / jnp.sum(mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/arith_policy"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--target", type=float, default=0.35, help="stop at this shifted validation pass@1")
    parser.add_argument("--check-every", type=int, default=40)
    args = parser.parse_args()

    task = ArithmeticTask()
    params = nnx.split(init_decoder(MODEL, seed=args.seed))[1]
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.max_steps // 2), args.max_steps, end_value=args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)
    validation = generate_problems(128, SHIFTED, seed=VALIDATION_SEED_OFFSET + args.seed)
    sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, stop_token_ids=task.stop_token_ids,
                              pad_token_id=task.pad_token_id)
    policy = HFModel(config=MODEL, params=params)
    start, history = time.perf_counter(), []
    progress = tqdm(range(1, args.max_steps + 1), desc="pretrain")
    for step in progress:
        batch = training_batch(task, generate_problems(args.batch, SOURCE, seed=args.seed * 1_000_003 + step))
        params, opt_state, loss = train_step(params, opt_state, *batch)
        if step % args.check_every:
            continue
        policy.params = params
        result = evaluate(policy, task, validation, 4, jax.random.key(step), sampling, progress=False)
        minutes = (time.perf_counter() - start) / 60
        history.append({"step": step, "loss": float(loss), "validation_pass@1": result.pass_at_1, "minutes": minutes})
        progress.set_postfix(loss=f"{float(loss):.3f}", shifted_pass1=f"{result.pass_at_1:.3f}")
        if result.pass_at_1 >= args.target or minutes >= args.max_minutes:
            break
    save_hf(policy, args.out)
    record = {"seed": args.seed, "steps": step, "batch": args.batch, "lr": args.lr, "target": args.target,
              "minutes": (time.perf_counter() - start) / 60, "history": history}
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"saved {args.out} after {step} steps, {record['minutes']:.1f} min; last check {history[-1]}")


if __name__ == "__main__":
    main()

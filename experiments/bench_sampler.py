"""Rollout throughput: our jitted sampler against transformers' generate, same model, same wave.

A random ~20M-parameter Qwen2-style checkpoint (hidden 512, 4 layers, 8 heads / 2 KV
heads, intermediate 1408, vocab 8192, untied) is written once and loaded by both
sides. Both sample at temperature 1 over the full vocabulary (no top-k / top-p), with
KV caches, R rows of P prompt tokens, N new tokens each (no stop token: every row runs
to N). The CPU's limit is R tokens per the time of one float32 [R, hidden] x [hidden,
params / hidden] matmul, i.e. 2 x parameters FLOPs per token at this machine's matmul
rate for the decode's batch. Everything runs in this one process.

    python experiments/bench_sampler.py [--rows 64] [--prompt 64] [--new 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import best_time, random_twins
from transformers import Qwen2Config

from optpo_jax.sampler import SamplingConfig, sample


def matmul_limit(rows: int, hidden: int, num_params: int, repeats: int) -> float:
    """Tokens/s if every decode token cost one pass of 2 x num_params FLOPs at matmul speed."""
    activations = jnp.ones((rows, hidden), jnp.float32)
    weights = jnp.ones((hidden, num_params // hidden), jnp.float32) * 1e-3
    matmul = jax.jit(lambda a, w: a @ w)
    matmul(activations, weights).block_until_ready()
    seconds = best_time(lambda: matmul(activations, weights).block_until_ready(), repeats)
    return rows / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_config = Qwen2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024,
    )
    torch_model, model = random_twins(hf_config)
    num_params = model.config.num_params()
    generated = args.rows * args.new
    print(f"Qwen2-style model, {num_params / 1e6:.1f}M parameters; {args.rows} rows x {args.prompt} prompt tokens "
          f"-> {args.new} new tokens, temperature 1; torch threads {torch.get_num_threads()}, jax {jax.devices()}")

    prompts = np.random.default_rng(0).integers(3, hf_config.vocab_size, (args.rows, args.prompt))
    lengths = np.full((args.rows,), args.prompt, np.int32)
    valid = np.ones((args.rows,), bool)
    keys = iter(jax.random.split(jax.random.key(0), 4 * args.repeats + 4))

    def ours(new_tokens=args.new):
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
        out = sample(model.params, model.config, prompts, lengths, valid, next(keys), config)
        assert int(out.lengths.min()) == new_tokens
        out.tokens.block_until_ready()

    torch_prompts = torch.as_tensor(prompts)

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=torch_prompts, attention_mask=torch.ones_like(torch_prompts), do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new, min_new_tokens=args.new,
                use_cache=True, pad_token_id=0, eos_token_id=None,
            )
        assert out.shape[1] == args.prompt + args.new

    first_call = best_time(ours, 1)
    ours(1)  # compiles the prefill-only variant
    theirs()  # warm-up
    # Interleaved so that both sides see the same machine load.
    ours_times, theirs_times = [], []
    for _ in range(args.repeats):
        ours_times.append(best_time(ours, 1))
        theirs_times.append(best_time(theirs, 1))
    ours_seconds, theirs_seconds = min(ours_times), min(theirs_times)
    prefill_seconds = best_time(lambda: ours(1), args.repeats)
    limit = matmul_limit(args.rows, hf_config.hidden_size, num_params, 10 * args.repeats)

    ours_rate, theirs_rate = generated / ours_seconds, generated / theirs_seconds
    decode_rate = args.rows * (args.new - 1) / (ours_seconds - prefill_seconds)
    print("| sampler | generated tokens/s | wave time (s) | fraction of matmul limit |")
    print("|---|---|---|---|")
    print(f"| optpo-jax `sample` (jit, while_loop) | {ours_rate:,.0f} | {ours_seconds:.2f} | {ours_rate / limit:.0%} |")
    print(f"| ... its decode alone (wave minus prefill) | {decode_rate:,.0f} | {ours_seconds - prefill_seconds:.2f} "
          f"| {decode_rate / limit:.0%} |")
    print(f"| transformers `generate` (torch) | {theirs_rate:,.0f} | {theirs_seconds:.2f} | {theirs_rate / limit:.0%} |")
    print(f"ratio ours / transformers: {ours_rate / theirs_rate:.2f}x; matmul limit {limit:,.0f} tokens/s; "
          f"first call of ours (compile + run): {first_call:.1f} s; prefill {prefill_seconds:.2f} s")


if __name__ == "__main__":
    main()

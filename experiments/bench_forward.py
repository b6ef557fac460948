"""Forward time of a ~20M-parameter Qwen2-style model: ours (JAX, jitted) vs transformers (PyTorch).

Both load the same random checkpoint and run the same batch on this CPU, float32,
in one process. Prints the best-of-N wall time of each and the ratio.

    python experiments/bench_forward.py [--batch 8] [--length 256]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import best_time, random_twins
from transformers import Qwen2Config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_config = Qwen2Config(
        vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024,
    )
    torch_model, model = random_twins(hf_config)
    print(f"parameters: {model.config.num_params() / 1e6:.1f}M, batch {args.batch} x {args.length} tokens, "
          f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")
    tokens = np.random.default_rng(0).integers(0, hf_config.vocab_size, (args.batch, args.length))
    jax_tokens = jnp.asarray(tokens, jnp.int32)
    torch_tokens = torch.as_tensor(tokens)
    ours = best_time(lambda: model(jax_tokens).block_until_ready(), args.repeats)
    with torch.no_grad():
        theirs = best_time(lambda: torch_model(torch_tokens).logits, args.repeats)
        difference = np.max(np.abs(np.asarray(model(jax_tokens)) - torch_model(torch_tokens).logits.numpy()))
    print(f"optpo-jax forward (jit):       {ours * 1e3:8.1f} ms")
    print(f"transformers forward (torch):  {theirs * 1e3:8.1f} ms  (attention: {torch_model.config._attn_implementation})")
    print(f"ratio torch / ours: {theirs / ours:.2f}x; max |logit difference| {difference:.1e}")


if __name__ == "__main__":
    main()

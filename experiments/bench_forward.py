"""Forward time of a ~20M-parameter Qwen2-style model: ours (JAX, jitted) vs transformers (PyTorch).

The model is the CPU benchmarks' ``bench_common.qwen2_20m_config`` (as in bench_sampler.py).
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
from bench_common import best_time, qwen2_20m_config, random_twins


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_config = qwen2_20m_config()
    torch_model, model = random_twins(hf_config)
    print(f"parameters: {model.config.num_params() / 1e6:.1f}M, batch {args.batch} x {args.length} tokens, "
          f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")
    tokens = np.random.default_rng(0).integers(0, hf_config.vocab_size, (args.batch, args.length))
    jax_tokens = jnp.asarray(tokens, jnp.int32)
    torch_tokens = torch.as_tensor(tokens)
    ours = best_time(lambda: model(jax_tokens), args.repeats)
    with torch.no_grad():
        theirs = best_time(lambda: torch_model(torch_tokens).logits, args.repeats)
        difference = np.max(np.abs(np.asarray(model(jax_tokens)) - torch_model(torch_tokens).logits.numpy()))
    print(f"optpo-jax forward (jit):       {ours * 1e3:8.1f} ms")
    print(f"transformers forward (torch):  {theirs * 1e3:8.1f} ms  (attention: {torch_model.config._attn_implementation})")
    print(f"ratio torch / ours: {theirs / ours:.2f}x; max |logit difference| {difference:.1e}")


if __name__ == "__main__":
    main()

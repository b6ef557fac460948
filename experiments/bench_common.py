"""Helpers shared by the benchmarks: the timers, the matmul limit, the CPU benchmarks' model and one random
checkpoint loaded by both frameworks.

torch and transformers are imported only where a checkpoint is built, so that the benchmarks of our code alone
(bench_accelerator.py among them) run without them.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp

from optpo_jax.models import load_hf


def timed(fn, *args):
    """(fn(*args), seconds), the seconds including the device work that the call started."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()`` (seconds, device work included)."""
    return min(timed(fn)[1] for _ in range(repeats))


def matmul_limit(rows: int, hidden: int, num_params: int, repeats: int) -> float:
    """Tokens/s if each of ``rows`` tokens cost 2 x ``num_params`` FLOPs (one forward) at this machine's rate for
    a float32 [rows, hidden] x [hidden, num_params / hidden] matmul, the shape of the model's own matmuls."""
    activations = jnp.ones((rows, hidden), jnp.float32)
    weights = jnp.ones((hidden, num_params // hidden), jnp.float32) * 1e-3
    matmul = jax.jit(lambda a, w: a @ w)
    timed(matmul, activations, weights)  # compiles
    return rows / best_time(lambda: matmul(activations, weights), repeats)


def qwen2_20m_config():
    """The CPU benchmarks' model: a random 19.7M-parameter Qwen2-style architecture (hidden 512, 4 layers,
    8 heads / 2 KV heads, intermediate 1408, vocab 8192, untied)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024,
    )


def random_twins(hf_config):
    """(transformers model, our HFModel) holding the same random float32 weights (seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        return torch_model, load_hf(folder, load_tokenizer=False)

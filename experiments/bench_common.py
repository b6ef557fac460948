"""Helpers shared by the benchmarks: one random checkpoint loaded by both frameworks, and a timer."""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from optpo_jax.models import load_hf


def random_twins(hf_config):
    """(transformers model, our HFModel) holding the same random float32 weights (seed 0)."""
    torch.manual_seed(0)
    torch_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        return torch_model, load_hf(folder, load_tokenizer=False)


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

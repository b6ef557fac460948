"""Qwen2.5-Math-1.5B on math500, LoRA test-time RL that fits one 16 GB device
(`optpo-jax plan --config configs/qwen2p5_math_1p5b_math500_lora.py --device_memory 16GB`).
`--config configs/qwen2p5_math_1p5b_math500_lora.py:ttrl` runs the TTRL baseline with the same LoRA settings."""

from optpo_jax.default_config import math_lora_config


def get_config(method="optpo"):
    return math_lora_config("math500", method or "optpo")

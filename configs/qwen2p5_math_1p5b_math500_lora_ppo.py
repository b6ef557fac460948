"""Qwen2.5-Math-1.5B on math500 with PPO: LoRA test-time RL whose critic is its own LoRA adapters over the same
frozen base, planned under 16 GB (`optpo-jax plan --config configs/qwen2p5_math_1p5b_math500_lora_ppo.py
--device_memory 16GB`). `--config configs/qwen2p5_math_1p5b_math500_lora_ppo.py:ttrl` runs PPO-TTRL."""

from optpo_jax.default_config import math_lora_config, ppo_section


def get_config(method="optpo"):
    config = math_lora_config("math500", method or "optpo")
    config.algorithm = "ppo"
    # The critic's adapters start with a zero value head: a larger step than the policy's adapters (1e-5).
    config.ppo = ppo_section(critic_learning_rate=1e-4)
    return config

"""Qwen2.5-Math-1.5B on math500, TTRL's recipe. `--config configs/qwen2p5_math_1p5b_math500.py` runs OptPO;
`--config configs/qwen2p5_math_1p5b_math500.py:ttrl` runs the fixed 64/32 TTRL baseline."""

from optpo_jax.default_config import math_config


def get_config(method="optpo"):
    return math_config("math500", method or "optpo")

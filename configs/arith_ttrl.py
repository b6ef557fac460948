"""The TTRL baseline (fixed 64 votes, GRPO on 32) on the embedded arithmetic task."""

from optpo_jax.default_config import arithmetic_config


def get_config():
    return arithmetic_config("ttrl")

"""Faithful TTRL (64 votes, GRPO on the first 32) under the comparison protocol (`study_config`).

`optpo-jax compare --seeds 10 --config configs/arith_study_optpo.py --baseline_config configs/arith_study_ttrl.py`.
"""

from optpo_jax.default_config import study_config


def get_config():
    return study_config("ttrl")

"""OptPO on the embedded arithmetic task: `optpo-jax train --config configs/arith_optpo.py`."""

from optpo_jax.default_config import arithmetic_config


def get_config():
    return arithmetic_config("optpo")

"""OptPO with PPO (a critic and GAE advantages) on the embedded task: `optpo-jax train --config configs/arith_ppo_optpo.py`."""

from optpo_jax.default_config import arithmetic_config


def get_config():
    config = arithmetic_config("optpo")
    config.algorithm = "ppo"
    return config

"""optpo_jax/train/config_checks.py: the bounds check_experiment_fields puts on config values."""

import pytest

from optpo_jax.train.config_checks import ConfigError, check_experiment_fields
from optpo_jax.train.setup import check_config
from tests.run_configs import tiny_config


def test_data_num_prompts_has_an_upper_bound():
    for check in (check_experiment_fields, check_config):
        with pytest.raises(ConfigError, match=r"config\.data\.num_prompts must be an integer in \[1, 1000000\].*"
                                              r"got 100000000"):
            check(tiny_config(**{"data.num_prompts": 100_000_000}))
        check(tiny_config(**{"data.num_prompts": 10**6}))

"""optpo_jax/train/state.py: the initial TrainState (what is trained, the LoRA base, the KL reference)."""

import dataclasses

import jax
import numpy as np
import pytest

from optpo_jax.models.lora import LoRAConfig
from optpo_jax.train.state import init_train_state


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_full_fine_tuning_copies_the_params_as_the_reference_only_when_the_loss_has_a_kl_term(setup, kl_coef):
    step_config = dataclasses.replace(setup.learner.config,
                                      grpo=dataclasses.replace(setup.learner.config.grpo, kl_coef=kl_coef))
    state = init_train_state(setup.policy.params, setup.optimizer, step_config, None, seed=0)
    assert state.params is setup.policy.params and state.base_params is None and state.lora is None
    if kl_coef == 0:
        assert state.reference_params is None  # no copy of the weights for nothing
        return
    params, reference = jax.tree.leaves(state.params), jax.tree.leaves(state.reference_params)
    assert all(a is not b for a, b in zip(params, reference, strict=True))  # a copy: the update donates params
    jax.tree.map(np.testing.assert_array_equal, state.params, state.reference_params)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_lora_trains_adapters_over_the_frozen_base_which_is_also_the_reference(setup, kl_coef):
    step_config = dataclasses.replace(setup.learner.config,
                                      grpo=dataclasses.replace(setup.learner.config.grpo, kl_coef=kl_coef))
    lora = LoRAConfig(rank=2)
    state = init_train_state(setup.policy.params, setup.optimizer, step_config, lora, seed=0)
    assert state.base_params is setup.policy.params and state.lora == lora
    assert state.reference_params is (setup.policy.params if kl_coef else None)
    # B = 0: the adapters start as the identity, so the policy is the base exactly.
    jax.tree.map(np.testing.assert_array_equal, state.policy_params(), setup.policy.params)
    assert state.checkpointed().keys() == {"params", "opt_state"}

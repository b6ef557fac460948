"""The shape of the package: the pure core does not reach into the host side, and the registries extend."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from optpo_jax import sprt
from optpo_jax.grpo import ADVANTAGE_ESTIMATORS, group_advantages


def _modules_after(import_line: str) -> set:
    code = f"import sys; {import_line}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_core_imports_neither_the_host_side_nor_matplotlib():
    core = _modules_after("import optpo_jax, optpo_jax.sampler, optpo_jax.models")
    assert not any(name.startswith("optpo_jax.train") for name in core)
    host = _modules_after("import optpo_jax.train, optpo_jax.cli")
    assert "optpo_jax.train.loop" in host and "matplotlib" not in host


def test_a_new_stopping_rule_is_one_function_and_one_registry_line(monkeypatch):
    def two_votes(counts, run_length, config):  # confident once the leader has two votes
        return (counts.max(axis=-1) >= 2).astype(jnp.float32)

    monkeypatch.setitem(sprt.RULES, "two_votes", sprt.Rule(two_votes))
    config = sprt.SPRTConfig(rule="two_votes", threshold=0.5, min_samples=1, max_samples=8)
    state = sprt.init_vote_state(2, 8)
    state = sprt.sprt_update(state, jnp.array([0, 0, 1, 1]), jnp.array([3, 3, 1, 2]), jnp.ones(4, bool), config)
    assert np.asarray(state.done).tolist() == [True, False]


def test_a_new_advantage_estimator_is_one_function_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(ADVANTAGE_ESTIMATORS, "sign", lambda centered, variance, eps: jnp.sign(centered))
    advantages = group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0, 1.0]), jnp.array([0, 0, 0, 1, 1]),
                                  jnp.ones(5, bool), 2, mode="sign")
    np.testing.assert_array_equal(np.asarray(advantages), [1.0, -1.0, -1.0, 0.0, 0.0])

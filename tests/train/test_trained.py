"""optpo_jax/train/trained.py: a finished run read back from its workdir (config, setup, checkpoint)."""

import jax
import numpy as np
import pytest

from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.state import restore_state
from optpo_jax.train.trained import load_run_config, load_trained
from optpo_jax.train.workdir import WorkdirError


def test_load_trained_gives_the_latest_or_a_chosen_checkpoint_under_the_runs_config(run_copy):
    config = load_run_config(run_copy)
    latest, first = load_trained(config, run_copy), load_trained(config, run_copy, step=1)
    assert (latest.step, first.step) == (2, 1)
    # Reference: the checkpoint restored by hand into the setup's initial state.
    expected, _, _ = restore_state(Checkpointer(run_copy / "checkpoints"), latest.setup.initial_state(), 2)
    jax.tree.map(np.testing.assert_array_equal, latest.policy_params(), expected.policy_params())
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.policy_params()),
                                                         jax.tree.leaves(latest.policy_params()), strict=True))


def test_load_trained_refuses_a_workdir_without_a_run_or_a_checkpoint(run_copy, tmp_path):
    with pytest.raises(WorkdirError, match="holds no run"):
        load_run_config(tmp_path / "nothing")
    config = load_run_config(run_copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkdirError, match="holds no checkpoint"):
        load_trained(config, empty)
    assert not (empty / "checkpoints").exists()  # checked before a Checkpointer would create the folder


def test_load_trained_refuses_a_run_whose_prompts_changed(run_copy):
    config = load_run_config(run_copy)
    config.data.seed = config.data.seed + 1  # other generated prompts than the run trained on
    with pytest.raises(WorkdirError, match=r"eval: the run's task, data or model differ.*train_prompts"):
        load_trained(config, run_copy, doing="eval")

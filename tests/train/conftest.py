"""Fixtures of the train tests: the tiny setup and a finished tiny run that tests copy."""

import pytest

from optpo_jax.train.setup import build_setup
from tests.run_configs import copy_run, shared_run, tiny_config


@pytest.fixture(scope="session")
def setup():
    return build_setup(tiny_config())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at every step, trained once per session (the workdir is copied by each test)."""
    return shared_run(tmp_path_factory, "finished", tiny_config(steps=2))


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path)

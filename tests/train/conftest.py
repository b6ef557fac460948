"""Fixtures of the train tests: the tiny setup and a finished tiny run that tests copy."""

import pytest

from optpo_jax.train.loop import train
from optpo_jax.train.setup import build_setup
from tests.run_configs import copy_run, tiny_config


@pytest.fixture(scope="session")
def setup():
    return build_setup(tiny_config())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at every step (the workdir is copied by each test)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(steps=2), workdir, progress=False)
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path)

"""Fixtures of the model tests: a tiny random checkpoint of each family, written by transformers."""

import pytest

from tests.hf_checkpoints import FAMILIES, write_checkpoint


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, checkpoint folder, the transformers model that wrote it)."""
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = write_checkpoint(request.param, folder)
    return request.param, folder, torch_model

"""optpo_jax/models/sharding.py: partition specs leave the model's results unchanged on a mesh."""

import jax
import numpy as np

from optpo_jax.models import (
    load_hf,
    partition_specs,
)
from tests.hf_checkpoints import VOCAB


def test_partition_specs_leave_results_unchanged_on_a_mesh(checkpoint):
    _, folder, _ = checkpoint
    model = load_hf(folder, load_tokenizer=False)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (4, 8))
    want = np.asarray(model(tokens))
    shape = (2, 2, 2) if jax.device_count() >= 8 else (1, 1, 1)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    specs = partition_specs(model.params)
    sharded = jax.tree.map(
        lambda value, spec: jax.device_put(value, jax.sharding.NamedSharding(mesh, spec)), model.params, specs
    )
    model.params = sharded
    np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-5)

"""PartitionSpecs of the decoder's parameters on a mesh with axes (data, fsdp, tensor).

Megatron layout: projections into the attention heads and the MLP are split over
``tensor`` on their output dimension, projections out of them on their input
dimension; the other matrix dimension is split over ``fsdp``. Norms and output
biases are replicated. On a one-device mesh every spec is a no-op.
"""

from __future__ import annotations

from flax import nnx
from jax.sharding import PartitionSpec

# The mesh's axes, in order: batch rows over data, weights over fsdp and tensor (train.distributed builds it).
MESH_AXES = ("data", "fsdp", "tensor")

_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW_PARALLEL = ("o_proj", "down_proj")


def _spec(path: tuple) -> PartitionSpec:
    module, leaf = path[-2], path[-1]
    if leaf == "embedding":
        return PartitionSpec("tensor", "fsdp")
    if module in _COLUMN_PARALLEL:
        return PartitionSpec("fsdp", "tensor") if leaf == "kernel" else PartitionSpec("tensor")
    if module in _ROW_PARALLEL and leaf == "kernel":
        return PartitionSpec("tensor", "fsdp")
    return PartitionSpec()


def partition_specs(params: nnx.State) -> nnx.State:
    """A state of the same structure as ``params`` (same Variable types) holding PartitionSpecs.

    Use it leaf by leaf with ``jax.tree.map(fn, params, partition_specs(params))``.
    """
    flat = [(path, variable.replace(_spec(path))) for path, variable in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)

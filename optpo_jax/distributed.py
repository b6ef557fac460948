"""Meshes and shardings: params by the model's PartitionSpecs, rollout rows over (data, fsdp).

Everything else stays the same code: the jitted sampler and GRPO step take sharded
inputs and XLA's SPMD partitioner propagates the shardings.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optpo_jax.models.sharding import partition_specs

AXES = ("data", "fsdp", "tensor")
ROW_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); one size may be -1 for the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not a multiple of {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, {len(devices)} are available")
    shape = tuple(sizes[name] for name in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _fitting(spec: PartitionSpec, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """``spec`` without the axes that do not divide their dimension (tiny models, odd vocabularies)."""
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        size = math.prod(mesh.shape[name] for name in names)
        entries.append(entry if names and dim % size == 0 else None)
    return PartitionSpec(*entries)


def shard_params(params, mesh: Mesh):
    """``params`` placed on ``mesh`` by the Megatron PartitionSpecs of models.sharding."""
    return jax.tree.map(
        lambda value, spec: jax.device_put(value, NamedSharding(mesh, _fitting(spec, value.shape, mesh))),
        params, partition_specs(params),
    )


def mesh_of(tree) -> Mesh | None:
    """The mesh the first leaf of ``tree`` is sharded over, or None (single device / unsharded)."""
    leaf = jax.tree.leaves(tree)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def shard_rows(tree, mesh: Mesh | None):
    """Places every array of ``tree`` on ``mesh`` split along its first (row) axis over (data, fsdp).

    Rows that do not divide evenly stay replicated; without a mesh the tree is unchanged.
    """
    if mesh is None:
        return tree
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def place(array):
        array = np.asarray(array) if not isinstance(array, jax.Array) else array
        spec = PartitionSpec(ROW_AXES) if array.ndim and array.shape[0] % shards == 0 else PartitionSpec()
        return jax.device_put(array, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def to_host(array) -> np.ndarray:
    """A device array as numpy on every process (gathered from all hosts when it spans several)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def is_lead_process() -> bool:
    """True on the one process that writes metrics and summaries (Orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def initialize_distributed(enabled: bool) -> None:
    """``jax.distributed.initialize()`` (coordinator and process ids from the TPU / SLURM / env) when enabled."""
    if enabled:
        jax.distributed.initialize()

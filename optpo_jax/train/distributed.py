"""Meshes and shardings: params by the model's PartitionSpecs, rollout rows over (data, fsdp).

Everything else stays the same code: the jitted sampler and GRPO step take sharded
inputs and XLA's SPMD partitioner propagates the shardings.

Several processes (one per host of a pod or cluster): each process owns a share of the
prompts (``process_share``), fills its share of every wave's rows, reads back only its
rows (``local_rows``) and grades only its own answers; the small per-step totals are
combined with ``process_sum`` / ``allgather_objects``. On one process all of these are
the identity, so the loop is the same code on one device, one host and many hosts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optpo_jax.models.sharding import MESH_AXES, partition_specs

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
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


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


def replicate_unplaced(tree, mesh: Mesh | None):
    """Leaves of ``tree`` not yet on ``mesh`` replicated over it (e.g. an optimizer's step count,
    which ``init`` puts on one device); without a mesh the tree is unchanged."""
    if mesh is None:
        return tree

    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        on_mesh = isinstance(sharding, NamedSharding) and sharding.mesh == mesh
        return leaf if on_mesh else jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, tree)


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


def _multihost_utils():
    from jax.experimental import multihost_utils

    return multihost_utils


def check_row_layout(mesh: Mesh | None, rows_per_process: dict[str, int] | None = None) -> None:
    """Raises unless every process can place its own rows on ``mesh`` (a no-op on one process).

    Each process must own whole (data, fsdp) slices of the mesh: a tensor axis that spans
    processes would make two processes claim the same global rows. ``rows_per_process``
    (name -> rows each process fills) must split evenly over its local (data, fsdp) devices.
    """
    processes = jax.process_count()
    if processes == 1:
        return
    if mesh is None:
        raise ValueError(f"config.mesh must span the devices of all {processes} processes, got one device")
    local = mesh.local_mesh.shape["data"] * mesh.local_mesh.shape["fsdp"]
    if mesh.shape["data"] * mesh.shape["fsdp"] != local * processes:
        raise ValueError(f"config.mesh {dict(mesh.shape)}: each of the {processes} processes must hold its own "
                         f"(data, fsdp) slices; keep the tensor axis within a host")
    for name, rows in (rows_per_process or {}).items():
        if rows % local:
            raise ValueError(f"{name}: {rows} rows per process do not split over the {local} local "
                             "(data, fsdp) devices")


def rows_to_global(tree, mesh: Mesh | None):
    """This process's rows (numpy, first axis) -> global arrays on ``mesh`` split over (data, fsdp).

    The global row axis holds each process's rows as its own blocks (``local_rows`` reads
    them back); on one process this is ``shard_rows``. Without a mesh the tree is unchanged.
    """
    if mesh is None or jax.process_count() == 1:
        return shard_rows(tree, mesh)
    check_row_layout(mesh, {"rows_to_global": min(np.shape(array)[0] for array in jax.tree.leaves(tree))})
    return _multihost_utils().host_local_array_to_global_array(tree, mesh, PartitionSpec(ROW_AXES))


def local_rows(array, mesh: Mesh | None) -> np.ndarray:
    """This process's rows of a row-sharded global array, as numpy (every row on one process)."""
    if mesh is None or jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(_multihost_utils().global_array_to_host_local_array(array, mesh, PartitionSpec(ROW_AXES)))


def local_row_count(global_rows: int, name: str) -> int:
    """Rows of a ``global_rows``-row batch that each process fills; ``name`` is the config field, for the error."""
    processes = jax.process_count()
    if global_rows % processes:
        raise ValueError(f"{name}={global_rows} must be a multiple of the {processes} processes")
    return global_rows // processes


def process_share(items: Sequence) -> list:
    """This process's share of ``items``: every process_count-th item from its process index."""
    return list(items[jax.process_index() :: jax.process_count()])


def merge_shares(shares: Sequence[Sequence]) -> list:
    """The inverse of ``process_share``: every process's share (in process order) back in item order."""
    merged = [None] * sum(len(share) for share in shares)
    for process, share in enumerate(shares):
        merged[process :: len(shares)] = share
    return merged


def process_sum(values) -> np.ndarray:
    """Elementwise sum of a same-shaped array over all processes (exact: int64 / float64 on the host)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    return np.sum([np.asarray(share, values.dtype) for share in allgather_objects(values.tolist())], axis=0)


def process_max(value: int) -> int:
    """The largest ``value`` over all processes (shapes every process must agree on)."""
    return max(int(share) for share in allgather_objects(int(value)))


def allgather_objects(value) -> list:
    """Every process's JSON-serialisable ``value``, in process order (``[value]`` on one process).

    Sent as JSON bytes through ``process_allgather``, so numbers keep full precision.
    """
    if jax.process_count() == 1:
        return [value]
    gather = _multihost_utils().process_allgather
    payload = np.frombuffer(json.dumps([jax.process_index(), value]).encode(), np.uint8)
    sizes = np.asarray(gather(np.array([payload.size], np.int32)))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(gather(padded))
    shares = sorted((json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes, strict=True)),
                    key=lambda share: share[0])
    return [share for _, share in shares]


def is_lead_process() -> bool:
    """True on the one process that writes metrics and summaries (Orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def initialize_distributed(enabled: bool) -> None:
    """``jax.distributed.initialize()`` (coordinator and process ids from the TPU / SLURM / env) when enabled.

    A failure (one host with no cluster to join: "coordinator_address should be defined") is a
    ConfigError naming ``config.distributed``.
    """
    if not enabled:
        return
    try:
        jax.distributed.initialize()
    except (ValueError, TypeError, RuntimeError) as error:
        from optpo_jax.train.config_checks import ConfigError

        reason = str(error).rstrip(".")
        raise ConfigError(f"config.distributed=True: jax.distributed.initialize() failed ({reason}); it joins the "
                          "processes of a TPU pod slice or of a SLURM / Open MPI job, one per host. On one host, leave "
                          "config.distributed=False"
                          ) from error

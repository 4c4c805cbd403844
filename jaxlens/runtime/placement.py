"""Host <-> mesh, in one place: batches go onto the mesh split over its data axes, results come
back to the host as numpy. Nothing outside the runtime calls `jax.device_put` or reads device
arrays with `np.asarray`.

With several processes (`jaxlens.distributed`) every process holds the same host batch (each builds
it from the same data, the same way), puts only the rows its own devices hold onto the global
mesh, and reads results back with one all-gather; a single process places and reads as before."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlens.core.sharding import batch_sharding, data_size

_RECORDERS: list[list] = []


def batch_rows(mesh: Mesh, rows: int) -> int:
    """`rows` rounded up to a multiple of the mesh's data axes, so every batch splits over them."""
    n = data_size(mesh)
    return -(-max(1, rows) // n) * n


def put(mesh: Mesh, *arrays, batch_axis: int = 0):
    """Arrays with a batch axis (default the first) onto `mesh`, split over its data axes
    (replicated when the batch does not divide them). Returns one array or a tuple, as given."""
    def sharding(a):
        spec = batch_sharding(mesh, np.shape(a)[batch_axis]).spec
        return NamedSharding(mesh, P(*([None] * batch_axis), *spec))

    placed = tuple(_place(a, sharding(a), batch_axis) for a in arrays)
    for log in _RECORDERS:
        log.extend((a.sharding, batch_axis) for a in placed)
    return placed[0] if len(placed) == 1 else placed


def _place(a, sharding: NamedSharding, batch_axis: int):
    if isinstance(a, jax.Array) or jax.process_count() == 1:
        return jax.device_put(a if isinstance(a, jax.Array) else np.asarray(a), sharding)
    a = np.asarray(a)
    rows = _process_rows(sharding, a.shape, batch_axis)
    local = a[(slice(None),) * batch_axis + (rows,)]
    return jax.make_array_from_process_local_data(sharding, local, a.shape)


def _process_rows(sharding: NamedSharding, shape, axis: int) -> slice:
    """The block of rows this process's devices hold (contiguous: meshes list devices process by
    process), the whole batch when it is replicated."""
    spans = {(s.start or 0, shape[axis] if s.stop is None else s.stop)
             for s in (index[axis] for index in sharding.addressable_devices_indices_map(shape).values())}
    start, stop = min(b for b, _ in spans), max(e for _, e in spans)
    if sum(e - b for b, e in spans) != stop - start and len(spans) > 1:
        raise ValueError(f"this process's devices hold non-contiguous rows of the batch ({sorted(spans)}); "
                         "build the mesh from jax.devices() in order (jaxlens.make_mesh does)")
    return slice(start, stop)


def put_replicated(mesh: Mesh, tree):
    """A pytree copied whole to every device of `mesh` (tables every row reads)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_sharded(tree, shardings):
    """A pytree (host or device arrays) placed on `shardings` (a matching tree of NamedShardings):
    state split over the mesh like the weights (tuned-lens translators). With several processes
    every process holds the same host values and places only its own devices' shards."""
    def place(a, sharding):
        if isinstance(a, jax.Array) or jax.process_count() == 1:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(place, tree, shardings)


def onto_mesh(mesh: Mesh, tree):
    """A pytree on `mesh`: leaves already placed on it keep their shardings (sharded state stays
    sharded), every other leaf is replicated (`put_replicated`)."""
    def place(a):
        placed = isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
        return a if placed else put_replicated(mesh, a)

    return jax.tree.map(place, tree)


def to_host(tree):
    """Device results -> numpy (waits for them). Arrays spread over several processes are
    all-gathered (once per call), so every process gets the same numpy."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if spread:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, g in zip(spread, gathered):
            leaves[i] = g
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in jax.device_get(leaves)])


def wait(tree):
    """Block until `tree` is computed (the loop's one-batch-behind pacing, and honest timings).
    Leaves a later step was donated (deleted) are skipped: that step consumed them."""
    return jax.block_until_ready([a for a in jax.tree.leaves(tree) if not (isinstance(a, jax.Array) and a.is_deleted())])


@contextlib.contextmanager
def record_placements() -> Iterator[list]:
    """Collect the sharding of every batch array `put` places (the placement tests read it)."""
    log: list = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)

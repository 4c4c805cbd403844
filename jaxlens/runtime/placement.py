"""Host <-> mesh, in one place: batches go onto the mesh split over its data axes, results come
back to the host as numpy. Nothing outside the runtime calls `jax.device_put` or reads device
arrays with `np.asarray` (issue 8's per-host input plugs in here)."""

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

    placed = tuple(jax.device_put(np.asarray(a) if not isinstance(a, jax.Array) else a, sharding(a)) for a in arrays)
    for log in _RECORDERS:
        log.extend((a.sharding, batch_axis) for a in placed)
    return placed[0] if len(placed) == 1 else placed


def put_replicated(mesh: Mesh, tree):
    """A pytree copied whole to every device of `mesh` (tables every row reads)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(tree):
    """Device results -> numpy (waits for them)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def wait(tree):
    """Block until `tree` is computed (the loop's one-batch-behind pacing, and honest timings)."""
    return jax.block_until_ready(tree)


@contextlib.contextmanager
def record_placements() -> Iterator[list]:
    """Collect the sharding of every batch array `put` places (the placement tests read it)."""
    log: list = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)

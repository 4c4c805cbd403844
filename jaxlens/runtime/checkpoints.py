"""Orbax saves and restores of array trees (trained translators, trained layers), the same in one
process and in several.

    with report.io.output_dir(out) as tmp:      # every process
        save_tree(tmp / "translators", tree)
    distributed.barrier("saved")                # OUT is in place before anyone reads it
    tree = restore_tree(out / "translators", target)   # target: ShapeDtypeStructs with shardings

The rule with several processes: a save is gathered, then written by process 0 alone. Arrays
spread over the processes are all-gathered first (`placement.to_host`, a collective every process
takes part in), then process 0 saves them with orbax told it is the only active process
(`MultiprocessingOptions(primary_host=0, active_processes={0})`: no barrier waits on the others)
into its `OUT.partial`, which `report.io.output_dir` renames into place when whole. The other
processes write nothing (their `output_dir` is a scratch directory), so `--out` needs no shared
storage. A restore is every process's: each reads the same directory (at the same path on every
host, like any input) and orbax places only the shards its devices hold, in the target's shardings.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxlens.runtime.distributed import is_primary
from jaxlens.runtime.placement import to_host


def save_tree(directory, tree) -> None:
    """Orbax checkpoint of an array tree at `directory` (which must not exist yet). Call it on every
    process, with the directory `report.io.output_dir` gave each one."""
    import orbax.checkpoint as ocp

    options = ocp.options.MultiprocessingOptions()
    if jax.process_count() > 1:
        tree = to_host(tree)  # every process gathers; only process 0 writes
        if not is_primary():
            return
        options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
    with ocp.StandardCheckpointer(multiprocessing_options=options) as ckpt:
        ckpt.save(Path(directory).absolute(), tree)


def restore_tree(directory, target):
    """The tree saved at `directory`, restored on every process into `target`'s shapes, dtypes and
    shardings (a tree of `jax.ShapeDtypeStruct`; with several processes, shardings on the global mesh)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint at {directory}: with several hosts it must be at the same path on "
                                "every host (shared storage, or a copy on each)")
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory, target)


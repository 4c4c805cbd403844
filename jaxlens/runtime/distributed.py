"""Several hosts, one program: start-up of JAX's multi-controller runtime (`jax.distributed`).

    jaxlens.distributed.initialize("host0:1234", num_processes=2, process_id=0)   # on every host
    jaxlens.distributed.initialize()        # TPU pods, SLURM, Open MPI: JAX reads the cluster

Every process runs the same command; the global mesh spans all processes' devices, each process
feeds only its own rows (`runtime.placement.put`), results are gathered once (`to_host`), and only
process 0 writes (`report.io`) and shows progress bars. Without `initialize` nothing changes: one
process, its local devices.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import jax


EXIT_CODE = 2  # a start-up that timed out exits with this, like any other refused command


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: float = 300, local_device_ids=None) -> None:
    """`jax.distributed.initialize`, before any JAX computation, with a start-up `timeout` in
    seconds. Calling it again once initialised does nothing.

    A peer that never arrives makes JAX's C++ client abort the process (a fatal DEADLINE_EXCEEDED,
    which Python cannot catch), so a watchdog fires first: it prints which coordinator was waited
    for, how many processes were expected, and whether the coordinator answered at all, then exits
    with status 2. JAX's own deadline is set a little later than ours."""
    if jax.distributed.is_initialized():
        return
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be at least 1; got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}); got {process_id}")
    watchdog = threading.Timer(timeout, _timed_out, (coordinator_address, num_processes, process_id, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=int(timeout) + 10)
    finally:
        watchdog.cancel()


def _timed_out(coordinator, num_processes, process_id, timeout) -> None:
    where = coordinator or "the coordinator JAX detected from the cluster environment"
    expected = f"{num_processes} processes" if num_processes else "the cluster's processes"
    me = f"process {process_id}" if process_id is not None else "this process"
    if process_id == 0:
        seen = "it runs the coordinator, so at least one other process never connected"
    elif coordinator and not _answers(coordinator):
        seen = "the coordinator does not answer: process 0 never started, or the address is wrong"
    else:
        seen = "the coordinator answers, but not every process connected"
    sys.stderr.write(f"jaxlens: error: {me} gave up after {timeout:g}s waiting for {expected} at coordinator "
                     f"{where}: {seen}. Start the same command on every host with the same --coordinator and "
                     f"--num-processes, and --process-id 0..N-1 (or raise --init-timeout).\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)  # the main thread is blocked inside JAX's C++ client; nothing else ends it cleanly


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def process_index() -> int:
    """This process's index (0 when not distributed)."""
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing in one process): after process 0 renamed an
    output into place, before another process reads it back."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Process 0: the one that writes results and shows progress."""
    return jax.process_index() == 0

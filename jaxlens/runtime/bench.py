"""The device side of `jaxlens bench` (jaxlens.methods.bench): make arrays on the devices, time a
program, read its peak memory, time a matmul. It lives in the runtime because it places arrays
and waits for results, which nothing above the runtime does.

    params = random_params(config, mesh, "bfloat16")      # on the devices, in their shardings
    seconds, peak = run_steps(lambda: compiled(params, tokens, mask), devices, warmup=2, steps=10)
    peak.bytes, peak.how, peak.parts
    matmul_peak(devices, "bfloat16")                       # FLOP/s of the devices together
"""

from __future__ import annotations

import ctypes
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlens.core.config import ModelConfig, resolve_dtype
from jaxlens.core.forward import init_params, param_shapes
from jaxlens.core.sharding import params_shardings


def random_params(config: ModelConfig, mesh: Mesh, dtype="float32", seed: int = 0):
    """Random params of `config` (the model's own initialisers) made on the mesh's devices directly
    in their shardings: one jitted init with those out_shardings, so no host copy and no device
    ever holds more than its shards."""
    dtype = resolve_dtype(dtype)
    shardings = params_shardings(param_shapes(config, dtype), mesh, warn=False)
    init = jax.jit(lambda key: init_params(config, key, dtype), out_shardings=shardings)
    return init(jax.random.key(seed))


def placeholders(specs):
    """Arrays of the shapes, dtypes and shardings of `specs` (ShapeDtypeStructs) made on their
    devices: integers 1 (token id 1, a full mask), floats 0 (empty accumulators). What the values
    are does not change the work of a dense program."""
    def make():
        return jax.tree.map(lambda s: jnp.full(s.shape, 0 if jnp.issubdtype(s.dtype, jnp.floating) else 1, s.dtype), specs)

    return jax.jit(make, out_shardings=jax.tree.map(lambda s: s.sharding, specs))()


def time_steps(step, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `step()`, after `warmup` untimed ones. Each call is
    waited for and its result dropped before the next starts, so one step's outputs are live at a
    time (as in the plan's count)."""
    for _ in range(warmup):
        jax.block_until_ready(step())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclasses.dataclass
class Peak:
    bytes: int | None = None  # per device (the largest over this process's devices)
    how: str = ""
    parts: dict = dataclasses.field(default_factory=dict)  # CPU: live arrays, RSS rise (bytes, per device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _give_back_free_heap() -> None:
    """glibc's malloc_trim(0): hand the heap's free pages back to the kernel, so that memory a step
    reuses from earlier frees (the last step's, the compile's) is faulted in again and shows in the
    RSS. Best effort: a no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_rise(step) -> tuple[float, int]:
    """(seconds, bytes): one timed call of `step()`, and how far the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs after the free heap is handed back) rose above its RSS
    before the call. Raises OSError where /proc/self/clear_refs cannot be written."""
    _give_back_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    jax.block_until_ready(step())
    seconds = time.perf_counter() - start
    return seconds, max(0, _status_kib("VmHWM") - base) * 1024


def run_steps(step, devices, warmup: int, steps: int) -> tuple[list[float], Peak]:
    """(seconds of each timed step, the peak memory per device of a step); `step()` runs `warmup`
    untimed times first (the first call of a program also pays one-off set-up: threads, buffers).

    GPU/TPU: the allocator's own peak_bytes_in_use (since the process started: it also covers the
    load and compile, which on a well-sized run stay below the steps' peak).

    CPU (memory_stats() is None there): every device is this process's host memory, so the peak
    is (a) the bytes of the live arrays on these devices (the params and the inputs: buffers that
    are resident, counted exactly) plus (b) the largest rise of the process's peak RSS over one
    timed step (each measured on its own, `_rss_rise`): what a step allocates and touches, its
    outputs and XLA's temporaries and anything else (the runtime's threads, matmul scratch),
    measured, not predicted. Divided by the number of devices (they share the one process)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    peak = Peak()
    stats = local[0].memory_stats() is not None
    seconds = time_steps(step, warmup, steps if stats else 0)
    if stats:
        peak.bytes = max(int(d.memory_stats().get("peak_bytes_in_use", 0)) for d in local)
        peak.how = "the allocator's peak_bytes_in_use"
        return seconds, peak
    ids = {d.id for d in local}
    live = sum(s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards if s.device.id in ids)
    try:
        timed = [_rss_rise(step) for _ in range(steps)]
    except OSError as e:
        peak.how = f"not measured (CPU, and /proc/self/clear_refs is not writable: {e})"
        return time_steps(step, 0, steps), peak
    rise = max(r for _, r in timed)
    peak.bytes = (live + rise) // len(local)
    peak.parts = {"live_arrays": live // len(local), "rss_rise": rise // len(local)}
    peak.how = "CPU: live arrays + the largest rise of the process's peak RSS over one step"
    return [t for t, _ in timed], peak


def matmul_peak(devices, dtype, n: int | None = None) -> tuple[float, int]:
    """(FLOP/s of all `devices` together, n): one [n, n] @ [n, n] matmul per device at once in
    `dtype`, the best of at least 5 timed runs (1 s) after a warm-up. n: 2048 on CPU, 8192 elsewhere."""
    n = n or (2048 if devices[0].platform == "cpu" else 8192)
    mesh = Mesh(np.array(devices), ("d",))
    split = NamedSharding(mesh, P("d"))
    dtype = resolve_dtype(dtype)
    make = jax.jit(lambda key: tuple(jax.random.normal(k, (len(devices), n, n), dtype) for k in jax.random.split(key)),
                   out_shardings=(split, split))
    a, b = make(jax.random.key(0))
    matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=split)
    seconds = time_steps(lambda: matmul(a, b), warmup=1, steps=1)
    while sum(seconds) < 1 or len(seconds) < 5:  # the best of several: other work on the host only slows it
        seconds += time_steps(lambda: matmul(a, b), warmup=0, steps=1)
    return 2 * n**3 * len(devices) / min(seconds), n

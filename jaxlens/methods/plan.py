"""Size a probe before paying for it: compile the real program ahead of time against abstract
params on a mesh (no weight is read or allocated) and read XLA's own memory and cost analyses.

    p = plan(config, mesh, probe="lens", dtype="bfloat16", batch=16, seq_len=2048)
    p.per_device["total"], p.flops_per_token, p.fits(16 * 2**30)

The mesh may be of simulated devices (`jaxlens plan` runs itself under
`--xla_force_host_platform_device_count`): the SPMD-partitioned program, and so its per-device
memory, is the one the real slice would run.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlens.core.config import ModelConfig, resolve_dtype
from jaxlens.core.forward import _forward, param_shapes
from jaxlens.core.sharding import abstract, batch_spec, data_size, params_shardings, path_str, undivided
from jaxlens.core.sites import check_sites

PROBES = ("forward", "lens", "neurons", "steer", "transplant", "tuned-lens")

# HBM per chip, GiB (vendors' figures): `--device-memory` accepts these names.
DEVICE_MEMORY_GIB = {"v5e": 16, "v5p": 95, "v6e": 32, "a100-40": 40, "a100-80": 80, "h100": 80, "h200": 141}


def parse_memory(text: str) -> int:
    """'16GB' (10^9), '16GiB' (2^30), '512MB', a plain byte count, or a device name -> bytes."""
    key = str(text).strip().lower()
    if key in DEVICE_MEMORY_GIB:
        return DEVICE_MEMORY_GIB[key] * 2**30
    units = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6, "tb": 10**12, "b": 1}
    for unit, scale in units.items():
        if key.endswith(unit):
            number = key[: -len(unit)]
            break
    else:
        number, scale = key, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--device-memory {text!r}: give a size (16GB, 16GiB) or a device: "
                         f"{', '.join(DEVICE_MEMORY_GIB)}") from None
    if value <= 0:
        raise ValueError(f"--device-memory {text!r} must be positive")
    return int(value * scale)


@dataclasses.dataclass
class Plan:
    probe: str
    mesh: dict  # axis -> size
    dtype: str
    batch: int
    seq_len: int
    per_device: dict  # bytes: params (this device's shards), inputs, arguments (XLA's), outputs, temps, total
    flops_per_token: float
    warnings: list
    compile_s: float = 0.0

    def fits(self, device_bytes: int) -> bool:
        return self.per_device["total"] <= device_bytes


def abstract_params(config: ModelConfig, mesh, dtype="float32"):
    """The params pytree as ShapeDtypeStructs carrying their NamedShardings on `mesh`."""
    shapes = param_shapes(config, resolve_dtype(dtype))
    shardings = params_shardings(shapes, mesh, warn=False)
    return abstract(shapes, shardings)


def params_bytes_per_device(params) -> int:
    """Bytes of one device's shard of every leaf of a pytree of sharded ShapeDtypeStructs (exact)."""
    return int(sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(params)))


def mesh_warnings(config: ModelConfig, mesh, batch: int, probe: str = "forward") -> list[str]:
    """Each dimension that does not divide its mesh axis (replicated over it), the tuned lens's
    translators' too, and a batch that does not divide the data axes."""
    lines = []
    shapes = param_shapes(config)
    if probe == "tuned-lens":
        from jaxlens.methods.tuned_lens import translator_shapes

        shapes = {**shapes, "tuned_lens": translator_shapes(config.n_layers, config.d_model)}
    jax.tree_util.tree_map_with_path(lambda kp, leaf: lines.extend(undivided(path_str(kp), leaf.shape, mesh)), shapes)
    if batch % data_size(mesh):
        lines.append(f"batch {batch} does not divide data x fsdp = {data_size(mesh)}: replicated, "
                     "every device computes every row")
    return lines


def _lower(probe: str, config: ModelConfig, params, mesh, batch: int, seq_len: int, capture: tuple[str, ...],
           n_groups: int, points: int = 64):
    rows = NamedSharding(mesh, batch_spec(mesh, batch, warn=False))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows)
    if probe == "forward":
        return _forward.lower(params, tokens, tokens, config, capture, mesh=mesh), (tokens, tokens)
    if probe == "lens":
        from jaxlens.kernels.lens import _lens_from_tokens

        return _lens_from_tokens.lower(params, tokens, tokens, None, None, None, None, config=config,
                                       layers=tuple(range(config.n_layers)), mode="last", embedding=False, k=5, chunk=4096,
                                       tile_rows=256, mesh=mesh), (tokens, tokens)
    if probe == "neurons":
        from jaxlens.kernels.neurons import empty_state
        from jaxlens.methods.neurons import _stats_step

        replicated = NamedSharding(mesh, P())
        state = abstract(jax.eval_shape(lambda: empty_state(config.n_layers, n_groups, config.d_ff)), replicated)
        groups = jax.ShapeDtypeStruct((batch, n_groups), jnp.float32, sharding=rows)
        return _stats_step(config, False, mesh).lower(params, state, tokens, tokens, tokens, groups), \
            (state, tokens, tokens, tokens, groups)
    if probe in ("steer", "transplant"):
        return _lower_sweep(probe, config, params, mesh, tokens, points)
    if probe == "tuned-lens":  # one training step: translators and optimiser state as `fit` places them
        from jaxlens.methods import tuned_lens as tl

        opt = tl.optimizer(1)
        shapes = tl.translator_shapes(config.n_layers, config.d_model)
        translators = abstract(shapes, tl.translator_shardings(shapes, mesh, warn=False))
        state = abstract(jax.eval_shape(opt.init, shapes), tl.opt_shardings(opt, shapes, mesh))
        return tl._step.lower(params, translators, state, tokens, tokens, config=config, opt=opt, mesh=mesh), \
            (translators, state, tokens, tokens)
    raise ValueError(f"probe={probe!r}: choose one of {', '.join(PROBES)}")


def _lower_sweep(probe: str, config: ModelConfig, params, mesh, tokens, points: int):
    """One batch of a sweep as `sweep_scores` runs it, letters scored: "steer", a steering grid of
    `points` (layer, alpha) points at every prompt position (full passes, `jaxlens steer`'s default);
    "transplant", `points` (source, target) layer pairs on the shared prefix cache (a one-token tail).
    The stack is built by the method's own constructor, abstractly, so it weighs what the real one does."""
    import numpy as np

    from jaxlens.methods.steer import steering_stack
    from jaxlens.methods.sweep import run_stack, score_letters
    from jaxlens.methods.transplant import pair_stack

    if points < 1:
        raise ValueError(f"points={points}: a sweep needs at least one point")
    replicated = NamedSharding(mesh, P())
    R, T = tokens.shape
    L = config.n_layers
    rows = jax.ShapeDtypeStruct((R, L, config.d_model), jnp.float32)  # each row's vectors / source states
    if probe == "steer":
        grid = np.stack([np.arange(points) % L, np.ones(points)], -1)  # (layer, alpha)
        stack = jax.eval_shape(lambda v, at: steering_stack(v, grid, at), rows, jax.ShapeDtypeStruct((R, T), jnp.bool_))
        tail_only = False
    else:
        pairs = np.stack([np.arange(points) % L, np.arange(points) // L % L], -1).astype(np.int32)
        stack = jax.eval_shape(lambda s: pair_stack(s, pairs, jnp.ones((R, 1), bool)), rows)
        tail_only = True
    args = abstract((jax.ShapeDtypeStruct((4, 2), jnp.int32), jax.ShapeDtypeStruct((R,), jnp.int32)), replicated)  # 4 letters
    stack = abstract(stack, replicated)
    lowered = run_stack.lower(params, tokens, tokens, stack, args, config=config, tail=1, score=score_letters,
                              tail_only=tail_only)
    return lowered, (tokens, tokens, stack, args)


def plan(config: ModelConfig, mesh, *, probe: str = "forward", dtype="bfloat16", batch: int = 1, seq_len: int = 2048,
         capture=("resid_post",), n_groups: int = 8, points: int = 64) -> Plan:
    """Compile `probe` for [batch, seq_len] tokens on `mesh` and read its per-device memory
    (params: this device's shards; arguments, outputs, temps: XLA's memory analysis) and FLOPs."""
    return compile_probe(config, mesh, probe=probe, dtype=dtype, batch=batch, seq_len=seq_len, capture=capture,
                         n_groups=n_groups, points=points)[0]


def compile_probe(config: ModelConfig, mesh, *, probe: str = "forward", dtype="bfloat16", batch: int = 1,
                  seq_len: int = 2048, capture=("resid_post",), n_groups: int = 8, points: int = 64, params=None):
    """(Plan, the compiled program): what `plan` reads, and what `jaxlens bench` runs. `params`:
    the pytree to compile for (arrays or ShapeDtypeStructs with their shardings; default the
    abstract params of `config` in `dtype` on `mesh`)."""
    import time

    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1; got batch={batch}, seq_len={seq_len}")
    if seq_len > config.max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_positions={config.max_positions}")
    capture = check_sites(capture) if probe == "forward" else ()
    if params is None:
        params = abstract_params(config, mesh, dtype)
    else:  # their shapes, dtypes and shardings only
        params = abstract(params, jax.tree.map(lambda a: a.sharding, params))
        dtype = jax.tree.leaves(params)[0].dtype
    start = time.perf_counter()
    lowered, inputs = _lower(probe, config, params, mesh, batch, seq_len, capture, n_groups, points)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_device = {
        "params": params_bytes_per_device(params),
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "temps": int(mem.temp_size_in_bytes),
    }
    # Every param shard stays resident, used by this program or not (XLA's argument count leaves
    # out the unused ones, e.g. the unembedding of a probe that never makes logits).
    per_device["inputs"] = params_bytes_per_device(inputs)
    if probe == "tuned-lens":  # of the inputs: the translators, then the optimiser state (momentum)
        per_device["translators"] = params_bytes_per_device(inputs[0])
        per_device["optimizer"] = params_bytes_per_device(inputs[1])
    per_device["total"] = (per_device["params"] + per_device["inputs"] + per_device["outputs"] + per_device["temps"]
                           - int(mem.alias_size_in_bytes))
    p = Plan(probe, dict(mesh.shape), str(jnp.dtype(resolve_dtype(dtype))), batch, seq_len, per_device,
             flops_per_token(config, seq_len, probe, points), mesh_warnings(config, mesh, batch, probe), seconds)
    return p, compiled


def flops_per_token(config: ModelConfig, seq_len: int, probe: str = "forward", points: int = 1) -> float:
    """Matmul FLOPs per token as the program computes them (XLA's cost analysis counts a loop body
    once, not once per layer, so it cannot give this): 2 x every layer's kernels, q.k and p.v over
    all seq_len keys (masks skip no work), and the unembedding (forward) or the lens's one per
    layer at the last position (lens). The tuned lens's step: the forward, then per layer the
    translator and the full unembedding forward, again in the backward's recompute, and their
    backward (A's gradient, the unembedding's input gradient): 3 x (2 D^2 + 2 D V). Sweeps, per prompt token of the batch: a steering grid runs
    `points` full passes, unembedded at the last position; a transplant sweep one clean pass and
    per point one re-run token (attending to all seq_len keys), unembedded."""
    kernels = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        path = path_str(kp)
        if path.startswith("layers/") and path.endswith("/kernel"):
            kernels += math.prod(leaf.shape)
    attention = 4 * seq_len * config.n_heads * config.head_dim * config.n_layers
    head = config.d_model * config.vocab_size
    if probe == "steer":
        return float(points * (2 * kernels + attention + 2 * head / seq_len))
    if probe == "transplant":
        return float(2 * kernels + attention + points * (2 * kernels + attention + 2 * head) / seq_len)
    if probe == "tuned-lens":
        return float(2 * kernels + attention + 2 * head + config.n_layers * 3 * (2 * config.d_model ** 2 + 2 * head))
    head = {"forward": 2 * head, "lens": 2 * head * config.n_layers / seq_len, "neurons": 0}[probe]
    return float(2 * kernels + attention + head)


def largest_batch(config: ModelConfig, mesh, device_bytes: int, *, first: Plan, max_compiles: int = 4,
                  max_factor: int = 64, **kw) -> int:
    """The largest batch (a multiple of data x fsdp, at most `max_factor` x the first) whose
    program fits `device_bytes`, from at most `max_compiles` more compiles: per-device memory is
    affine in the batch, so two plans give the line, and the predicted batch is checked (and
    stepped down while it does not fit; a batch the probe refuses, e.g. too many tokens for exact
    neuron counts, counts as not fitting)."""
    step = data_size(mesh)

    def fits(batch: int) -> bool:
        try:
            return plan(config, mesh, batch=batch, **kw).fits(device_bytes)
        except ValueError:
            return False

    b0 = first.batch
    b1 = 2 * b0 if first.fits(device_bytes) else max(step, (b0 // 2) // step * step)
    if b1 == b0:  # one row per data shard already: it fits or nothing does
        return b0 if first.fits(device_bytes) else 0
    try:
        second = plan(config, mesh, batch=b1, **kw)
    except ValueError:  # the probe refuses a larger batch
        return b0 if first.fits(device_bytes) else 0
    compiles = 1
    per_row = (second.per_device["total"] - first.per_device["total"]) / (b1 - b0)
    fixed = first.per_device["total"] - per_row * b0
    cap = max_factor * b0 // step * step
    guess = min(cap, int((device_bytes - fixed) // per_row) // step * step) if per_row > 0 else cap
    best = max([b for b, p in ((b0, first), (b1, second)) if p.fits(device_bytes)], default=0)
    while guess > best and compiles < max_compiles:
        compiles += 1
        if fits(guess):
            return guess
        guess -= step * max(1, (guess - best) // (2 * step))  # halve the distance to a known fit
    return best


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def total_params_bytes(config: ModelConfig, dtype) -> int:
    return int(sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(param_shapes(config, resolve_dtype(dtype)))))


"""Meshes and partition rules: the batch over `data` x `fsdp`, weights over `fsdp` (ZeRO-3 style:
the d_model dim of every matrix) and `model` (heads / d_ff / vocab).

Inside the layer scan each layer's weights are gathered over `fsdp` where they are used
(`gathered`, called by the modules' Linear), so a device holds about params / (fsdp x model)
plus one layer, and the compiled program all-gathers one layer at a time, never the whole stack.

The mesh uses Auto axis types on purpose (jax.make_mesh now defaults to Explicit, under which
`with_sharding_constraint` refuses plain specs): we place params and inputs with NamedSharding and
let GSPMD propagate through the forward pass.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")  # the named axes a mesh may have (`--mesh data=2,fsdp=2,model=2`)
DATA_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# (regex on the '/'-joined params path, spec). First match wins; unmatched leaves are replicated.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embedding$", ("model", "fsdp")),  # [V, D]
    (r"^unembed$", ("fsdp", "model")),  # [D, V]
    (r"^layers/attn/(q|k|v)/kernel$", (None, "fsdp", "model", None)),  # [L, D, N, H]
    (r"^layers/attn/(q|k|v)/bias$", (None, "model", None)),  # [L, N, H]
    (r"^layers/attn/o/kernel$", (None, "model", None, "fsdp")),  # [L, N, H, D]
    (r"^layers/mlp/gate_up/kernel$", (None, "fsdp", None, "model")),  # [L, D, 2, F]
    (r"^layers/mlp/gate_up/bias$", (None, None, "model")),  # [L, 2, F]
    (r"^layers/mlp/up/kernel$", (None, "fsdp", "model")),  # [L, D, F] (ungated MLPs)
    (r"^layers/mlp/up/bias$", (None, "model")),  # [L, F]
    (r"^layers/mlp/down/kernel$", (None, "model", "fsdp")),  # [L, F, D]
    # Tuned-lens translators (methods/tuned_lens.py), not model params: A [L, D_out, D_in], the D_in
    # it contracts over `fsdp` as every matrix's d_model dim, D_out over `model`, so A (and its
    # momentum) take 1/(fsdp x model) of a device like the weights (80 x 8192^2 f32 = 20 GiB at 70B).
    (r"^tuned_lens/A$", (None, "model", "fsdp")),
    # Replicated on purpose (small, or [D]-wide): norm scales and biases (incl. OLMo 2's [L, N*H]
    # q/k norms, BLOOM's embed_norm), the o / down biases [L, D], GPT-2's positions [P, D], the
    # translators' b [L, D] (2.5 MiB at 70B).
)


class ReplicatedWarning(UserWarning):
    """A dimension does not divide its mesh axis and is replicated over it (correct, but each
    device then holds that axis's whole share: more memory than the mesh promises)."""


def make_mesh(data: int | None = None, model: int = 1, devices=None, *, fsdp: int = 1) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all); `data` defaults to the rest.
    The device order follows the hardware topology (`mesh_utils.create_device_mesh`: `model`, the
    chattiest axis, on the nearest devices)."""
    devices = list(devices if devices is not None else jax.devices())
    for name, n in (("data", data), ("fsdp", fsdp), ("model", model)):
        if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"mesh {name}={n!r} must be a positive integer")
    if data is None:
        data = len(devices) // (fsdp * model)
    if data * fsdp * model != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model} does not use the {len(devices)} devices")
    shape = (data, fsdp, model)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a subset of a slice has no topology to follow
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def default_mesh() -> Mesh:
    return make_mesh(data=1, model=1, devices=jax.devices()[:1])


def _rule(path: str):
    for pattern, spec in PARTITION_RULES:
        if re.match(pattern, path):
            return spec
    return ()


def _axis_size(mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


def undivided(path: str, shape: tuple[int, ...], mesh) -> list[str]:
    """Why `path`'s rule cannot shard some dimension on `mesh` (one line each; [] when it can)."""
    return [f"{path} dim {i} (size {shape[i]}) does not divide {a}={_axis_size(mesh, a)}: replicated over {a}"
            for i, a in enumerate(_rule(path)) if a is not None and shape[i] % _axis_size(mesh, a)]


def param_spec(path: str, shape: tuple[int, ...], mesh, warn: bool = False) -> P:
    """The rule's spec for `path`, with any axis that does not divide its dimension dropped
    (replicated: correct, and reported by `undivided`, a ReplicatedWarning with `warn`)."""
    if warn:
        for line in undivided(path, shape, mesh):
            warnings.warn(line, ReplicatedWarning, stacklevel=3)
    spec = _rule(path)
    return P(*(a if a is None or shape[i] % _axis_size(mesh, a) == 0 else None for i, a in enumerate(spec)))


def param_sharding(path: str, shape, mesh: Mesh, warn: bool = True) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, tuple(shape), mesh, warn=warn))


def params_shardings(shapes, mesh: Mesh, warn: bool = True):
    """A pytree of NamedShardings matching a params pytree (of arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: param_sharding(path_str(kp), leaf.shape, mesh, warn), shapes
    )


def abstract(tree, shardings):
    """`tree`'s leaves (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying `shardings`: one
    sharding for every leaf, or a matching tree of them (what a compile ahead of time, or an orbax
    restore into place, takes)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def gathered(path: str, kernel):
    """Inside the layer scan: one layer's slice of `path` ([L, ...] stacked; the slice lacks L)
    gathered over `fsdp` (still split over `model`), when traced under `weights_mesh` with
    fsdp > 1. The constraint sits in the scanned body, so each layer is gathered as it is used."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or _axis_size(mesh, "fsdp") == 1:
        return kernel
    stacked = path.startswith("layers/")
    spec = param_spec(path, ((0,) if stacked else ()) + tuple(kernel.shape), mesh)
    spec = tuple(None if a == "fsdp" else a for a in spec)[1 if stacked else 0 :]
    return jax.lax.with_sharding_constraint(kernel, P(*spec))


def weights_mesh(mesh: Mesh | None):
    """Context for tracing a forward on `mesh`: lets `gathered` see it (a no-op without fsdp)."""
    if mesh is None or _axis_size(mesh, "fsdp") == 1:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def data_size(mesh: Mesh) -> int:
    """How many ways a batch splits on `mesh` (the product of its data axes)."""
    return int(np.prod([_axis_size(mesh, a) for a in DATA_AXES]))


def batch_spec(mesh: Mesh, batch: int, warn: bool = True) -> P:
    """[B, ...] split over the data axes (those of size > 1). A batch they do not divide is
    replicated (correct, but every device computes every row): a ReplicatedWarning says so."""
    axes = tuple(a for a in DATA_AXES if _axis_size(mesh, a) > 1)
    if not axes:
        return P()
    if batch % data_size(mesh):
        if warn:
            warnings.warn(f"batch of {batch} does not divide the data axes ({' x '.join(f'{a}={_axis_size(mesh, a)}' for a in axes)}): "
                          "replicated, every device computes every row", ReplicatedWarning, stacklevel=3)
        return P()
    return P(axes if len(axes) > 1 else axes[0])


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, batch))


def params_mesh(params) -> Mesh | None:
    """The mesh a params pytree was placed on, or None (one device, host arrays, or traced)."""
    leaves = jax.tree.leaves(params)  # every leaf was placed on the same mesh: the first tells
    leaf = leaves[0] if leaves else None
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
        return None
    sharding = leaf.sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def constrain_batch(mesh: Mesh | None, *arrays):
    """Inside jit: [B, ...] arrays split over `mesh`'s data axes, so a caller who passes host arrays
    gets the batch split too (the compiler places the inputs accordingly)."""
    if mesh is None or data_size(mesh) == 1:
        return arrays
    return tuple(jax.lax.with_sharding_constraint(a, batch_sharding(mesh, a.shape[0])) for a in arrays)


def path_str(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)

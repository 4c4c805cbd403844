"""Meshes and partition rules: batch over `data`, heads / d_ff / vocab over `model`.

The mesh uses Auto axis types on purpose (jax.make_mesh now defaults to Explicit, under which
`with_sharding_constraint` refuses plain specs): we place params and inputs with NamedSharding and
let GSPMD propagate through the forward pass.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")  # the named axes a mesh may have (`--mesh data=4,model=2`)

# (regex on the '/'-joined params path, spec). First match wins; unmatched leaves are replicated.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embedding$", ("model", None)),  # [V, D]
    (r"^unembed$", (None, "model")),  # [D, V]
    (r"^layers/attn/(q|k|v)/kernel$", (None, None, "model", None)),  # [L, D, N, H]
    (r"^layers/attn/(q|k|v)/bias$", (None, "model", None)),  # [L, N, H]
    (r"^layers/attn/o/kernel$", (None, "model", None, None)),  # [L, N, H, D]
    (r"^layers/mlp/gate_up/kernel$", (None, None, None, "model")),  # [L, D, 2, F]
    (r"^layers/mlp/gate_up/bias$", (None, None, "model")),  # [L, 2, F]
    (r"^layers/mlp/up/kernel$", (None, None, "model")),  # [L, D, F] (ungated MLPs)
    (r"^layers/mlp/up/bias$", (None, "model")),  # [L, F]
    (r"^layers/mlp/down/kernel$", (None, "model", None)),  # [L, F, D]
    # Replicated on purpose (small, or [D]-wide): norm scales and biases (incl. OLMo 2's [L, N*H]
    # q/k norms, BLOOM's embed_norm), the o / down biases [L, D], GPT-2's positions [P, D].
)


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all); `data` defaults to the rest."""
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} does not use the {len(devices)} devices")
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def default_mesh() -> Mesh:
    return make_mesh(data=1, model=1, devices=jax.devices()[:1])


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The rule's spec for `path`, with any axis that does not divide its dimension dropped."""
    for pattern, spec in PARTITION_RULES:
        if re.match(pattern, path):
            return P(*(a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)))
    return P()


def param_sharding(path: str, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, tuple(shape), mesh))


def params_shardings(shapes, mesh: Mesh):
    """A pytree of NamedShardings matching a params pytree (of arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: param_sharding(path_str(kp), leaf.shape, mesh), shapes
    )


DATA_AXES = ("data",)  # the mesh axes a batch is split over


def data_size(mesh: Mesh) -> int:
    """How many ways a batch splits on `mesh` (the product of its data axes)."""
    return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def batch_spec(mesh: Mesh, batch: int) -> P:
    """[B, ...] split over the data axes when they divide the batch, else replicated."""
    axes = tuple(a for a in DATA_AXES if a in mesh.shape)
    return P(axes if len(axes) > 1 else axes[0]) if axes and batch % data_size(mesh) == 0 else P()


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

"""Trained layers saved apart from their base model (`jaxlens subspace train`), and putting them back:
`jaxlens.load(base, delta=DIR)` gives the base with those layers' rows of the stacked params
replaced, every other array unchanged, so every command runs on the trained model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

META_FILE = "subspace_delta.json"


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    layers = sorted({int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"trained layer(s) {bad or '[]'} outside the model's layers 0..{n_layers - 1}; "
                         "name layers in that range")
    return layers


def split(params, layers) -> dict:
    """The trained rows of the stacked layer params: {"layers": tree with a leading [n] axis}."""
    idx = jnp.asarray(layers, jnp.int32)
    return {"layers": jax.tree.map(lambda a: a[idx], params["layers"])}


def merge(params, trained, layers):
    """params with the trained rows put back; every other array and row is the original."""
    idx = jnp.asarray(layers, jnp.int32)
    new_layers = jax.tree.map(lambda a, t: a.at[idx].set(t.astype(a.dtype)), params["layers"], trained["layers"])
    return {**params, "layers": new_layers}


def read_meta(directory) -> dict:
    directory = Path(directory).absolute()
    if not (directory / META_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a subspace delta (no {META_FILE}); make one with `jaxlens subspace train`")
    return json.loads((directory / META_FILE).read_text())


def apply_delta(model, directory):
    """The model with the saved trained layers put in place of its own (same shapes and dtypes),
    restored straight into the shardings of the model's stacked layer params (on every process)."""
    from jaxlens.runtime.checkpoints import restore_tree

    directory = Path(directory).absolute()
    meta = read_meta(directory)
    L = model.config.n_layers
    if meta.get("n_layers") not in (None, L) or meta.get("d_model") not in (None, model.config.d_model):
        raise ValueError(f"delta {directory} was trained on {meta['n_layers']} layers of width {meta['d_model']}; "
                         f"this model has {L} of width {model.config.d_model}")
    layers = check_layers(meta["layers"], L)
    # [n, ...] rows of each stacked [L, ...] leaf, sharded as it is (the layer axis is never split).
    target = {"layers": jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(layers), *a.shape[1:]), a.dtype,
                                                                    sharding=getattr(a, "sharding", None)),
                                     model.params["layers"])}
    trained = restore_tree(directory / "layers", target)
    return dataclasses.replace(model, params=merge(model.params, trained, layers))

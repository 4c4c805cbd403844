"""Checkpoints -> (ModelConfig, params pytree), streamed one tensor at a time onto a mesh.

    config, params = load_checkpoint("path/to/hf_dir" | "file.gguf" | "org/name", dtype="bfloat16")

Sources: an HF directory (safetensors, single or sharded), an HF hub id (resolved through
huggingface_hub's cache; nothing is downloaded when HF_HUB_OFFLINE=1), a GGUF file (dequantized),
or a directory written by `jaxlens convert` (orbax; restored sharded). `.bin` pickles are refused
unless `allow_pickle=True`: unpickling runs code from the file.

Memory: each checkpoint tensor is read (memory-mapped), transformed, cast and `device_put` onto
its NamedSharding, then dropped; per-layer tensors are written into their stacked [L, ...] device
array in place (a donated dynamic_update_slice), so host memory stays near one tensor. With several
processes (jaxlens.distributed) each reads only the slices its own devices hold: the transforms
are views of the memory-mapped file where they can be, and `make_array_from_callback` asks each
process for its devices' slices alone.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.core.config import ConfigError, ModelConfig, resolve_dtype
from jaxlens.converters.families import Family, family_for
from jaxlens.converters.orbax_io import CONFIG_FILE, restore
from jaxlens.converters.safetensors_io import CheckpointError, SafetensorsSource
from jaxlens.core.forward import param_shapes
from jaxlens.core.sharding import default_mesh, param_sharding

__all__ = ["CheckpointError", "ConfigError", "load_checkpoint", "load_params", "open_source"]



def open_source(src: str | os.PathLike, allow_pickle: bool = False):
    """(tensor source, HF config dict) for a directory, a GGUF file or a hub id."""
    path = Path(src)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from jaxlens.converters.gguf_io import GGUFSource

        source = GGUFSource(path)
        return source, source.hf_config()
    if not path.exists():
        path = _from_hub(str(src))
    if not path.is_dir():
        raise FileNotFoundError(f"{src} is neither a checkpoint directory, a .gguf file, nor a cached hub id")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json; an HF checkpoint directory needs one")
    hf_config = json.loads(config_file.read_text())
    hf_config = hf_config.get("text_config", hf_config) | {"model_type": _text_model_type(hf_config)}
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return SafetensorsSource(path), hf_config
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle checkpoints (.bin/.pt); loading them can run arbitrary code. "
                "Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file"
            )
        from jaxlens.converters.pickle_io import PickleSource

        return PickleSource(path), hf_config
    raise CheckpointError(f"{path}: no *.safetensors, .gguf or (opt-in) .bin weights found")


def _text_model_type(hf_config: dict) -> str | None:
    if "text_config" in hf_config:  # multimodal wrappers (e.g. gemma3): the language model only
        return hf_config["text_config"].get("model_type")
    return hf_config.get("model_type")


def _from_hub(repo_id: str) -> Path:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise FileNotFoundError(f"{repo_id} does not exist and is not a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


@lru_cache(maxsize=None)
def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@lru_cache(maxsize=None)
def _set_layer_fn(sharding):
    return jax.jit(
        lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0),
        donate_argnums=0,
        out_shardings=sharding,
    )


def load_params(source, family: Family, config: ModelConfig, dtype="float32", mesh=None):
    """Read every tensor the family's table names from `source` into a sharded params pytree."""
    dtype = resolve_dtype(dtype)
    mesh = mesh or default_mesh()
    shapes = param_shapes(config)
    if family.prefix and not any(name.startswith(family.prefix) for name in source.names()):
        source = _Prefixed(source, family.prefix)
    available = set(source.names())
    rules = family.tensors(config)
    wanted = [
        rule.hf.format(i=i) for rule in rules for i in (range(config.n_layers) if rule.per_layer else [None])
    ]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s) the {family.name} model needs, e.g. "
            f"{missing[:3]}; is the config.json from the same model?"
        )
    ignored = family.ignored + ((r"lm_head\.weight",) if config.tie_embeddings else ())
    unexpected = sorted(
        n for n in available - set(wanted) if not any(re.fullmatch(p, n) for p in ignored)
    )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) the {family.name} model does not use, e.g. "
            f"{unexpected[:3]}; the config does not describe these weights (wrong model_type or options?)"
        )

    groups: dict[tuple[str, ...], list] = {}  # params path -> the rules that fill it (2 when fused)
    for rule in rules:
        groups.setdefault(rule.path, []).append(rule)
    params: dict = {}
    for path, group in groups.items():
        target = _get_path(shapes, path)
        sharding = param_sharding("/".join(path), target.shape, mesh)
        if group[0].per_layer:
            # One layer has the stacked spec minus its leading [L] axis.
            layer_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
            array = _zeros(tuple(target.shape), dtype, sharding)()
            for i in range(config.n_layers):
                host = _assemble(source, group, config, i, target.shape[1:], dtype)
                array = _set_layer_fn(sharding)(array, _place(host, layer_sharding, dtype), i)
                _release(source)
        else:
            array = _place(_assemble(source, group, config, None, target.shape, dtype), sharding, dtype)
            _release(source)
        _set_path(params, path, array)
    _check_complete(params, shapes)
    return params


def _place(host: np.ndarray, sharding, dtype) -> jax.Array:
    """`host` (often a lazy view of the memory-mapped file) cast to `dtype` on `sharding`. With
    several processes each one touches only the slices of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(np.asarray(host, dtype), sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.ascontiguousarray(host[index], dtype))


def _release(source) -> None:
    """Drop the file pages read so far from this process's memory (they stay in the OS page cache):
    without it every page of the checkpoint counts in the RSS until the load ends."""
    release = getattr(source, "release", None)
    if release is not None:
        release()


class _Slots:
    """A fused param [..., n slots, ...] read lazily from its slots' tensors: indexing reads only
    that slice of each (what `_place` asks for, per device)."""

    def __init__(self, parts: list[np.ndarray], axis: int, dtype):
        self.parts, self.axis, self.dtype = parts, axis, np.dtype(dtype)
        inner = parts[0].shape
        self.shape = inner[:axis] + (len(parts),) + inner[axis:]
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        rest = index[: self.axis] + index[self.axis + 1 :]
        return np.stack([np.asarray(self.parts[k][rest], self.dtype) for k in range(len(self.parts))[index[self.axis]]],
                        axis=self.axis)

    def __array__(self, dtype=None, copy=None):
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class _Prefixed:
    """A source saved from the bare base model (GPT2Model, BloomModel), read with the causal-LM
    names the family tables use: `prefix` + its own names."""

    def __init__(self, source, prefix: str):
        self.source, self.prefix = source, prefix

    def names(self) -> list[str]:
        return [self.prefix + name for name in self.source.names()]

    def shape(self, name: str):
        return self.source.shape(name.removeprefix(self.prefix))

    def get(self, name: str):
        return self.source.get(name.removeprefix(self.prefix))

    def release(self) -> None:
        _release(self.source)


def _assemble(source, group, config, i, shape, dtype):
    """One param (one layer of it) from its rule (uncast, a view where the transform allows), or
    from the rules filling its fused slots (`_Slots`, read lazily)."""
    if len(group) == 1 and group[0].slot is None:
        return _read(source, group[0], config, i, shape)
    axis = group[0].slot[0]
    assert sorted(rule.slot[1] for rule in group) == list(range(shape[axis])), f"fused param {group[0].path} has unfilled slots"
    parts = {rule.slot[1]: _read(source, rule, config, i, shape[:axis] + shape[axis + 1 :]) for rule in group}
    return _Slots([parts[k] for k in range(shape[axis])], axis, dtype)


def _read(source, rule, config, i, shape) -> np.ndarray:
    name = rule.hf.format(i=i)
    try:
        host = rule.transform(np.asarray(source.get(name)), config)
    except ValueError:  # a reshape that cannot fit: the same mismatch as below
        host = None
    if host is None or tuple(host.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(source.shape(name))}, which does not fit the config "
            f"(expected {tuple(shape)} after conversion); is the config.json from the same model?"
        )
    return host  # cast where it is placed, slice by slice


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_complete(params, shapes):
    got = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)}
    need = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(shapes)}
    if got != need:  # a family table that forgot a param is our bug, not the user's
        raise AssertionError(f"family table does not cover params {sorted(need - got)} / extra {sorted(got - need)}")


def load_checkpoint(src, dtype="float32", mesh=None, allow_pickle: bool = False):
    """(ModelConfig, params) from any supported source; see the module docstring."""
    resolve_dtype(dtype)  # fail on a bad dtype before reading anything
    path = Path(src)
    if (path / CONFIG_FILE).exists():
        return restore(path, dtype=dtype, mesh=mesh)
    source, hf_config = open_source(src, allow_pickle=allow_pickle)
    family = family_for(hf_config)
    config = family.config(hf_config)
    return config, load_params(source, family, config, dtype=dtype, mesh=mesh)

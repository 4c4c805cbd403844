"""Save converted params with orbax and restore them, sharded, without converting again.

Layout of a `jaxlens convert` output directory:
  jaxlens_config.json   the ModelConfig (and the source it came from)
  params/               orbax checkpoint of the params pytree
  tokenizer/            the tokenizer, when the source had one
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxlens.core.config import ModelConfig, resolve_dtype
from jaxlens.core.forward import param_shapes
from jaxlens.core.sharding import default_mesh, params_shardings

CONFIG_FILE = "jaxlens_config.json"


def save(out, config: ModelConfig, params, tokenizer=None, source: str | None = None) -> Path:
    """Write to a temporary sibling and rename at the end: a failed save leaves no half output."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory or remove it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", params)
        (tmp / CONFIG_FILE).write_text(json.dumps({"config": json.loads(config.to_json()), "source": source}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def restore(directory, dtype="float32", mesh=None):
    """(ModelConfig, params) restored straight onto `mesh` with the family's partition rules."""
    directory = Path(directory).absolute()
    meta = json.loads((directory / CONFIG_FILE).read_text())
    config = ModelConfig.from_json(json.dumps(meta["config"]))
    mesh = mesh or default_mesh()
    shapes = param_shapes(config, resolve_dtype(dtype))
    shardings = params_shardings(shapes, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(directory / "params", target)
    return config, params

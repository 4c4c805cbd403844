"""`jaxlens.load`: checkpoint + tokenizer -> `Model`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlens.core import validate
from jaxlens.core.config import ACTIVATION_DTYPES
from jaxlens.runtime.model import Model
from jaxlens.core.sharding import default_mesh
from jaxlens.runtime.zoo import resolve_model


def load(src, dtype="float32", mesh=None, tokenizer=None, allow_pickle: bool = False, delta=None,
         activation_dtype: str = "float32") -> Model:
    """Load a checkpoint (alias, HF dir, hub id, .gguf, or a `jaxlens convert` output) as a `Model`.

    dtype: the params'. activation_dtype: "float32" (default: float32 activations whatever the
    params, bf16 matmuls reading them rounded) or "params" (the params' dtype throughout, as
    transformers runs); `ModelConfig.activation_dtype` says what each keeps.
    tokenizer: a transformers tokenizer, a path/hub id to load one from, or None to take the
    checkpoint's own (HF files next to the weights, or the GGUF metadata).
    delta: a directory of trained layers (`jaxlens subspace train`) put in place of the base's own.
    """
    from jaxlens.converters import load_checkpoint

    if activation_dtype not in ACTIVATION_DTYPES:  # before anything is read
        raise ValueError(f"activation_dtype={activation_dtype!r}: choose one of {', '.join(ACTIVATION_DTYPES)}")
    src = resolve_model(src) if isinstance(src, str) else src
    mesh = mesh or default_mesh()
    config, params = load_checkpoint(src, dtype=dtype, mesh=mesh, allow_pickle=allow_pickle)
    config = dataclasses.replace(config, activation_dtype=activation_dtype)
    tok = load_tokenizer(src, tokenizer)
    validate.tokenizer_vocab(config, tok)
    model = Model(config, params, tok, mesh)
    if delta is not None:
        from jaxlens.runtime.deltas import apply_delta

        model = apply_delta(model, delta)
    return model


def load_tokenizer(src, tokenizer=None):
    """A tokenizer object, a path/hub id to load one from, or None for the checkpoint's own."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    path = Path(src)
    if path.suffix == ".gguf":
        from jaxlens.converters.gguf_io import GGUFSource

        return GGUFSource(path).tokenizer()
    for candidate in (path / "tokenizer", path):
        if (candidate / "tokenizer_config.json").exists() or (candidate / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(candidate))
    return None

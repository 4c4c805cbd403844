"""Checks of user input at the public boundary, one function per kind of input.

Each raises `InputError` (a ValueError) naming the argument, what was wrong and how to fix it,
before anything is compiled. Nothing here runs inside jit, and nothing waits on the device:
values are checked only on host data (numpy arrays, lists, and the small intervention arrays
built from them); a jax array already on the device is checked by shape and dtype alone.
"""

from __future__ import annotations

import jax
import numpy as np

D_MODEL_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
D_FF_SITES = ("mlp_act", "mlp_hidden")


class InputError(ValueError):
    """A wrong argument to a public function; the message names it and says how to fix it."""


def _on_host(x) -> bool:
    # Reading a device array's values would sync with the device on every call.
    return not isinstance(x, jax.Array)


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def tokens(config, tokens) -> None:
    """tokens: integer ids [B, T] in [0, vocab_size)."""
    dtype = np.asarray(tokens).dtype if _on_host(tokens) else tokens.dtype
    if not (np.issubdtype(dtype, np.integer) or (np.issubdtype(dtype, np.floating) and _on_host(tokens))):
        raise InputError(f"tokens must be integer ids; got dtype {dtype}. Encode text with model.encode")
    if not _on_host(tokens) or isinstance(tokens, jax.core.Tracer):
        return
    host = np.asarray(tokens)
    if np.issubdtype(host.dtype, np.floating) and host.size and not np.all(host == np.round(host)):
        raise InputError("tokens must be integer ids; got non-integral floats. Encode text with model.encode")
    if host.size and (host.min() < 0 or host.max() >= config.vocab_size):
        bad = host[(host < 0) | (host >= config.vocab_size)]
        raise InputError(
            f"tokens contains id {int(bad.flat[0])} outside the vocabulary [0, {config.vocab_size}); "
            f"{bad.size} id(s) out of range. Encode with this model's tokenizer"
        )


def mask(attention_mask, tokens_shape, empty_rows: bool = False) -> None:
    """attention_mask: [B, T] like tokens, of 0/1 (bool or integer); no all-zero row unless
    empty_rows (forward allows them: a KV-cache continuation and batches padded with filler rows)."""
    if attention_mask is None:
        return
    shape = tuple(np.shape(attention_mask))
    if shape != tuple(tokens_shape):
        raise InputError(f"attention_mask shape {shape} != tokens shape {tuple(tokens_shape)}; give one 0/1 per token")
    dtype = np.asarray(attention_mask).dtype if _on_host(attention_mask) else attention_mask.dtype
    if not (dtype == bool or np.issubdtype(dtype, np.integer)):
        raise InputError(f"attention_mask must be bool or integer 0/1; got dtype {dtype}")
    if not _on_host(attention_mask) or isinstance(attention_mask, jax.core.Tracer):
        return
    host = np.asarray(attention_mask)
    if host.size == 0:
        return  # an empty prompt: check_tokens names it
    if not np.isin(host, (0, 1)).all():
        raise InputError(f"attention_mask must hold only 0 and 1; got values {sorted(set(np.unique(host).tolist()) - {0, 1})[:5]}")
    if empty_rows:
        return
    empty = np.flatnonzero(~host.astype(bool).any(axis=-1))
    if empty.size:
        raise InputError(f"attention_mask row(s) {empty[:5].tolist()} are all zero (no token to attend to); drop those rows")


def site_width(config, site: str) -> int | None:
    if site in D_MODEL_SITES:
        return config.d_model
    if site in D_FF_SITES:
        return config.d_ff
    return None


def interventions(config, interventions, tokens_shape) -> None:
    """Each intervention's layers inside the model, its arrays as wide as its site, its positions
    and batch matching tokens."""
    from jaxlens.core.interventions import items

    batch, length = tokens_shape
    for item in items(interventions):
        where = f"intervention {item.op!r} at {item.site!r}"
        lead = 1 if item.per_layer else 0
        if item.per_layer and np.ndim(item.value) and np.shape(item.value)[0] != config.n_layers:
            raise InputError(f"{where}: per_layer value has {np.shape(item.value)[0]} layers, the model has {config.n_layers}")
        if _concrete(item.layers):
            # A few ints built from the caller's list: ready at once, so fetching them waits on nothing.
            layers = np.asarray(jax.device_get(item.layers))
            bad = layers[(layers < 0) | (layers >= config.n_layers)]
            if bad.size:
                raise InputError(
                    f"{where}: layers {bad.tolist()} are outside the model's layers 0..{config.n_layers - 1}; "
                    f"pick layers in that range"
                )
        width = site_width(config, item.site)
        # The constructor argument the array came from: add(vector), scale(factor), set_to(value),
        # patch(cache), ablate(mean), project_*(basis).
        value_name = {"add": "vector", "scale": "factor", "set": "value (or patch's cache)"}.get(item.op, "basis")
        arrays = {value_name: item.value, "mean": item.mean}
        for name, array in arrays.items():
            if array is None or np.ndim(array) - lead == 0:
                continue
            if width is not None and np.shape(array)[-1] != width:
                raise InputError(
                    f"{where}: {name} has width {np.shape(array)[-1]} but site {item.site!r} has width {width}; "
                    f"give a vector of {width}"
                )
            if name == value_name and np.ndim(array) - lead == 3:
                b, t = np.shape(array)[lead:lead + 2]
                if b not in (1, batch) or t not in (1, length):
                    raise InputError(f"{where}: {name} [B, T, F] has B, T = {b}, {t}; tokens have {batch}, {length}")
        if item.features is not None and width is not None and np.shape(item.features)[-1] != width:
            raise InputError(
                f"{where}: features/neurons mask has width {np.shape(item.features)[-1]} but site {item.site!r} has width {width}"
            )
        if item.features is not None and np.ndim(item.features) == 2 and np.shape(item.features)[0] != config.n_layers:
            raise InputError(f"{where}: neurons mask [L, F] has {np.shape(item.features)[0]} layers, the model has {config.n_layers}")
        if item.positions is not None:
            shape = np.shape(item.positions)
            ok = shape == (length,) or shape == (batch, length) or (len(shape) == 2 and shape[0] == 1 and shape[1] == length)
            if not ok:
                raise InputError(
                    f"{where}: positions has shape {shape}; tokens are {tokens_shape}: give [T] or [B, T] "
                    f"(iv.last_token(mask), iv.at_positions(...))"
                )


def reducers(config, reducers, tokens_shape) -> None:
    """A reducer's positions inside the prompt, its neurons / direction arrays as wide as its site."""
    if not isinstance(reducers, dict):
        return  # check_reducers says what a reducer argument must be
    for name, reducer in reducers.items():
        index = getattr(reducer, "index", None)
        if index is not None and np.ndim(index) == 2:
            if np.shape(index)[0] not in (1, tokens_shape[0]):
                raise InputError(f"reducer {name!r}: index has batch {np.shape(index)[0]}, tokens have {tokens_shape[0]}")
            # Not a global array spread over several processes: no process can read it alone.
            if _concrete(index) and getattr(index, "is_fully_addressable", True):
                host = np.asarray(jax.device_get(index))
                if host.size and (host.min() < 0 or host.max() >= tokens_shape[1]):
                    raise InputError(
                        f"reducer {name!r}: index holds positions outside 0..{tokens_shape[1] - 1} (the prompt length); "
                        f"use iv.last_index(mask) or positions inside the prompt"
                    )
        width = site_width(config, getattr(reducer, "site", None))
        for field in ("basis", "directions", "vector", "neurons", "features"):
            array = getattr(reducer, field, None)
            if array is not None and width is not None and np.ndim(array) and np.shape(array)[-1] != width:
                raise InputError(
                    f"reducer {name!r}: {field} has width {np.shape(array)[-1]} but site {reducer.site!r} has width {width}"
                )


def texts(texts) -> list[str]:
    """model.encode's texts: a non-empty list of strings."""
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(f"texts must be a string or a list of strings; got {type(texts).__name__}") from None
    if not texts:
        raise InputError("texts is empty; give at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] is {type(text).__name__}, not a string; give strings (token ids go to model(...))")
    return texts


def padding_side(side: str) -> None:
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right'; got {side!r}")


def tokenizer_vocab(config, tokenizer) -> None:
    """At load: a tokenizer whose ids the model's embedding cannot hold is the wrong tokenizer."""
    if tokenizer is None:
        return
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    if size is not None and size > config.vocab_size:
        raise InputError(
            f"tokenizer has {size} tokens but the model's vocabulary is {config.vocab_size}; "
            f"pass the tokenizer of this checkpoint (tokenizer=)"
        )


def out_dir(out, overwrite: bool = False) -> None:
    """--out, checked before a model loads: a new or empty directory (any with --overwrite) whose
    nearest existing parent is a writable directory. A `.json` path (lens) is checked as a file."""
    import os
    from pathlib import Path

    if out is None:
        return
    path = Path(out).absolute()
    is_file_target = path.suffix == ".json"
    if path.exists():
        if is_file_target:
            if path.is_dir():
                raise InputError(f"--out {out}: is a directory; give a .json file path")
        elif not path.is_dir():
            raise InputError(f"--out {out}: is a file, not a directory; choose a directory path")
        elif any(path.iterdir()) and not overwrite:
            raise InputError(f"--out {out}: already exists and is not empty; choose a new output directory or pass --overwrite")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, so nothing can be written under it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {parent} is not writable; choose a directory you can write to")


# Counts that only make sense positive; a zero or negative one would run and report on nothing.
POSITIVE_OPTIONS = ("limit", "max_items", "batch_rows", "batch_size", "budget", "seq_len", "batch", "save_every")


def cli_options(args) -> None:
    """The numeric options every command shares, checked before a model loads."""
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")

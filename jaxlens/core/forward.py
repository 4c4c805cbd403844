"""`forward`: the pure function every probe builds on.

    logits, sites = forward(params, tokens, attention_mask, config=cfg, capture=("resid_post",),
                            interventions=None, reducers=None)

`params` is the pytree a converter produced, `tokens` [B, T] int32, `attention_mask` [B, T]
(1 = real token, 0 = padding; left or right padding). Positions are counted from the mask, so
each sequence of a padded batch gives what it gives alone. `sites` maps each captured site name to
its array (shapes in `jaxlens.core.sites`). `config` and `capture` are static: a new capture set
compiles once, new params or tokens of the same shape do not recompile.

`interventions` (`jaxlens.core.interventions`) change site values inside the scanned layers; `reducers`
(`jaxlens.core.reducers`, {name: reducer}) summarise a site inside each layer, so `sites[name]` holds
the per-layer summaries stacked [L, ...] and the full [L, B, T, ...] value is never stored. Both
are pytrees of arrays: new values reuse the compiled program, and both can be `jax.vmap`ped.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from jaxlens.core import validate
from jaxlens.core.config import ModelConfig
from jaxlens.core.rope import rope_tables
from jaxlens.core.sharding import constrain_batch, params_mesh, weights_mesh
from jaxlens.core.modules import REDUCED, REDUCED_PREFIX, Transformer, unembed
from jaxlens.core.sites import LAYER_SITES, SITES, check_sites

__all__ = ["KVCache", "forward", "forward_cached", "init_params", "param_shapes", "Transformer", "unembed"]


def _shared_inputs(cfg: ModelConfig, attention_mask, interventions=None, reducers=None, past_mask=None):
    """Rope tables and boolean masks for global and sliding layers, computed once per call, and
    what every layer site reads (the mask, the interventions, the reducers).

    past_mask [B, S0]: the attention mask of earlier tokens whose keys/values are given (a KV
    prefix); the T new tokens then sit at positions after them and attend to them too.
    """
    new = attention_mask.astype(bool)  # [B,T]
    full = new if past_mask is None else jnp.concatenate([past_mask.astype(bool), new], axis=-1)  # [B,S]
    T, S = new.shape[-1], full.shape[-1]
    key_positions = jnp.maximum(jnp.cumsum(full, axis=-1) - 1, 0)  # [B,S]
    positions = key_positions[:, S - T :]  # [B,T] of the new tokens
    cos, sin = rope_tables(cfg.rope, cfg.rope_dim, positions)
    if cfg.rope_local is not None:
        cos_local, sin_local = rope_tables(cfg.rope_local, cfg.rope_dim, positions)
    else:
        cos_local, sin_local = cos, sin
    q_idx = jnp.arange(S - T, S)[:, None]
    k_idx = jnp.arange(S)[None, :]
    causal = (k_idx <= q_idx)[None] & full[:, None, :]  # [B,T,S]
    window = cfg.sliding_window if cfg.sliding_window is not None else S + 1
    # Windows by position, not column: a generation cache has empty slots between its tokens.
    local = causal & (positions[:, :, None] - key_positions[:, None, :] < window)
    expand = lambda m: m[:, None, None]  # [B,1,1,T,S] broadcast over kv heads and groups  # noqa: E731
    return {
        "positions": positions,  # [B,T] (learned position embeddings)
        "key_positions": key_positions,  # [B,S] (ALiBi, sliding windows)
        "key_mask": full,  # [B,S] bool: real keys (the blocked attention builds its masks from these)
        "cos": cos,
        "sin": sin,
        "cos_local": cos_local,
        "sin_local": sin_local,
        "mask": expand(causal),
        "mask_local": expand(local),
        "attention_mask": attention_mask,
        "interventions": interventions,
        "reducers": reducers or {},
    }


def check_tokens(cfg: ModelConfig, tokens) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length]; got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError("empty prompt: tokens has length 0; give at least one token")
    if tokens.shape[1] > cfg.max_positions:
        raise ValueError(
            f"prompt of {tokens.shape[1]} tokens is longer than the model's "
            f"max_positions={cfg.max_positions}; truncate it"
        )


@partial(jax.jit, static_argnames=("config", "capture", "return_kv", "new_only", "mesh"))
def _forward(params, tokens, attention_mask, config: ModelConfig, capture: tuple[str, ...], interventions=None,
             reducers=None, past: tuple[KVCache, ...] = (), return_kv: bool = False, new_only: bool = False, mesh=None):
    tokens, attention_mask = constrain_batch(mesh, tokens, attention_mask)
    past_mask = jnp.concatenate([p.mask for p in past], axis=-1) if past else None
    shared = _shared_inputs(config, attention_mask, interventions, reducers, past_mask)
    mutable = [s for s in capture if s != "logits"] + ([REDUCED] if reducers else [])
    model = Transformer(config, return_kv=return_kv)
    with weights_mesh(mesh):  # each layer's weights gathered over fsdp as the scan reaches it
        out, state = model.apply({"params": params}, tokens, shared, tuple((p.k, p.v) for p in past) or None,
                                 mutable=mutable)
    logits, kv = out if return_kv else (out, None)
    sites = {name: logits if name == "logits" else _find(state[name], name) for name in capture}
    for name in reducers or {}:
        sites[name] = _find_key(state[REDUCED], REDUCED_PREFIX + name)
    if not return_kv:
        return logits, sites
    if past and not new_only:  # the cache covers the earlier tokens and these
        kv = tuple(jnp.concatenate([*(getattr(p, a).astype(n.dtype) for p in past), n], axis=2) for a, n in zip("kv", kv))
        attention_mask = jnp.concatenate([past_mask, attention_mask.astype(past_mask.dtype)], axis=-1)
    return logits, sites, KVCache(kv[0], kv[1], attention_mask)


def _find(tree, name):
    """The single sown array under a site's collection (its module path varies by site)."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if leaf is not None]
    if len(leaves) != 1:
        raise AssertionError(f"expected one sown value for site {name!r}, found {len(leaves)}")
    return leaves[0]


def _find_key(tree: dict, key: str):
    """The subtree sown under `key`, wherever in the module tree the reducer's site lives."""
    if key in tree:
        return tree[key]
    for value in tree.values():
        if isinstance(value, dict) and (found := _find_key(value, key)) is not None:
            return found
    return None


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S tokens (after rope), and their attention mask."""

    k: jnp.ndarray  # [L, B, S, K, H]
    v: jnp.ndarray  # [L, B, S, K, H]
    mask: jnp.ndarray  # [B, S]


def check_reducers(reducers) -> dict:
    if not reducers:
        return {}
    if not isinstance(reducers, dict):
        raise TypeError("reducers must be a dict {name: reducer}")
    for name, reducer in reducers.items():
        if name in SITES:
            raise ValueError(f"reducer name {name!r} is a site name; name it something else")
        if getattr(reducer, "site", None) not in LAYER_SITES:
            raise ValueError(
                f"reducer {name!r} reads site {getattr(reducer, 'site', None)!r}; reducers read a layer site: {', '.join(LAYER_SITES)}"
            )
    return dict(reducers)


def _check_inputs(config, tokens, attention_mask, interventions=None, reducers=None):
    validate.tokens(config, tokens)  # on the host copy, before it moves to the device
    tokens = jnp.asarray(tokens, dtype=jnp.int32)
    check_tokens(config, tokens)
    validate.mask(attention_mask, tokens.shape, empty_rows=True)
    validate.interventions(config, interventions, tokens.shape)
    validate.reducers(config, reducers, tokens.shape)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, dtype=jnp.int32)
    return tokens, jnp.asarray(attention_mask)


def forward(params, tokens, attention_mask=None, *, config: ModelConfig, capture=(), interventions=None, reducers=None):
    """Run the model; returns (logits [B,T,V] float32, {site or reducer name: array}).

    On a mesh (params placed by `jaxlens.load(..., mesh=)`) the batch is split over its data axes
    inside the program, whether tokens arrive as host arrays or already placed."""
    tokens, attention_mask = _check_inputs(config, tokens, attention_mask, interventions, reducers)
    return _forward(params, tokens, attention_mask, config, check_sites(capture), interventions, check_reducers(reducers),
                    mesh=params_mesh(params))


def forward_cached(params, tokens, attention_mask=None, *, config: ModelConfig,
                   past: KVCache | tuple[KVCache, ...] | None = None, capture=(), interventions=None, reducers=None,
                   new_only: bool = False):
    """`forward` that also returns the keys/values, and can continue from earlier ones:
    (logits, sites, KVCache of past + these tokens). Sites, interventions and reducers cover the
    new tokens only. Continuing a prefix gives the logits of running everything in one pass, at a
    fraction of the cost when few tokens are new (generation, or re-running one position).

    `past` may be several caches, read in order as one (a prefix shared by many programs, then each
    one's own tokens): they are never joined, so a shared prefix is never copied. `new_only`: the
    returned cache holds only these tokens (no copy of `past` at all)."""
    tokens, attention_mask = _check_inputs(config, tokens, attention_mask, interventions, reducers)
    past = () if past is None else tuple(past) if isinstance(past, (tuple, list)) else (past,)
    for i, part in enumerate(past):
        if part.mask.shape[0] != tokens.shape[0]:
            name = "past cache" if len(past) == 1 else f"past cache part {i}"
            raise ValueError(f"{name} has batch {part.mask.shape[0]}, tokens have batch {tokens.shape[0]}")
    earlier = sum(part.mask.shape[1] for part in past)
    if earlier + tokens.shape[1] > config.max_positions:
        raise ValueError(f"past ({earlier}) + new ({tokens.shape[1]}) tokens exceed max_positions={config.max_positions}")
    return _forward(params, tokens, attention_mask, config, check_sites(capture), interventions,
                    check_reducers(reducers), past, return_kv=True, new_only=new_only, mesh=params_mesh(params))


def init_params(config: ModelConfig, key, dtype=jnp.float32):
    """Random params (tests and shape checks); real params come from `jaxlens.converters`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shared = _shared_inputs(config, jnp.ones((1, 1), jnp.int32))
    params = Transformer(config).init(key, tokens, shared)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """The params pytree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda k: init_params(config, k, dtype), jax.random.key(0))

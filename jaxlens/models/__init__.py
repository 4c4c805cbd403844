"""`forward`: the pure function every probe builds on.

    logits, sites = forward(params, tokens, attention_mask, config=cfg, capture=("resid_post",),
                            interventions=None, reducers=None)

`params` is the pytree a converter produced, `tokens` [B, T] int32, `attention_mask` [B, T]
(1 = real token, 0 = padding; left or right padding). Positions are counted from the mask, so
each sequence of a padded batch gives what it gives alone. `sites` maps each captured site name to
its array (shapes in `jaxlens.sites`). `config` and `capture` are static: a new capture set
compiles once, new params or tokens of the same shape do not recompile.

`interventions` (`jaxlens.interventions`) change site values inside the scanned layers; `reducers`
(`jaxlens.reducers`, {name: reducer}) summarise a site inside each layer, so `sites[name]` holds
the per-layer summaries stacked [L, ...] and the full [L, B, T, ...] value is never stored. Both
are pytrees of arrays: new values reuse the compiled program, and both can be `jax.vmap`ped.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.models.rope import rope_tables
from jaxlens.models.transformer import REDUCED, REDUCED_PREFIX, Transformer
from jaxlens.sites import LAYER_SITES, SITES, check_sites

__all__ = ["forward", "init_params", "param_shapes", "Transformer"]


def _shared_inputs(cfg: ModelConfig, attention_mask, interventions=None, reducers=None):
    """Rope tables and boolean masks for global and sliding layers, computed once per call, and
    what every layer site reads (the mask, the interventions, the reducers)."""
    mask = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # [B,T]
    cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
    if cfg.rope_local is not None:
        cos_local, sin_local = rope_tables(cfg.rope_local, cfg.head_dim, positions)
    else:
        cos_local, sin_local = cos, sin
    T = mask.shape[-1]
    q_idx = jnp.arange(T)[:, None]
    k_idx = jnp.arange(T)[None, :]
    causal = (k_idx <= q_idx)[None] & mask[:, None, :]  # [B,T,S]
    window = cfg.sliding_window if cfg.sliding_window is not None else T + 1
    local = causal & (q_idx - k_idx < window)[None]
    expand = lambda m: m[:, None, None]  # [B,1,1,T,S] broadcast over kv heads and groups  # noqa: E731
    return {
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


@partial(jax.jit, static_argnames=("config", "capture"))
def _forward(params, tokens, attention_mask, config: ModelConfig, capture: tuple[str, ...], interventions=None, reducers=None):
    shared = _shared_inputs(config, attention_mask, interventions, reducers)
    mutable = [s for s in capture if s != "logits"] + ([REDUCED] if reducers else [])
    logits, state = Transformer(config).apply({"params": params}, tokens, shared, mutable=mutable)
    sites = {name: logits if name == "logits" else _find(state[name], name) for name in capture}
    for name in reducers or {}:
        sites[name] = _find_key(state[REDUCED], REDUCED_PREFIX + name)
    return logits, sites


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


def forward(params, tokens, attention_mask=None, *, config: ModelConfig, capture=(), interventions=None, reducers=None):
    """Run the model; returns (logits [B,T,V] float32, {site or reducer name: array})."""
    tokens = jnp.asarray(tokens, dtype=jnp.int32)
    check_tokens(config, tokens)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, dtype=jnp.int32)
    elif attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(tokens.shape)}")
    return _forward(
        params, tokens, jnp.asarray(attention_mask), config, check_sites(capture), interventions, check_reducers(reducers)
    )


def init_params(config: ModelConfig, key, dtype=jnp.float32):
    """Random params (tests and shape checks); real params come from `jaxlens.converters`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shared = _shared_inputs(config, jnp.ones((1, 1), jnp.int32))
    params = Transformer(config).init(key, tokens, shared)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """The params pytree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda k: init_params(config, k, dtype), jax.random.key(0))

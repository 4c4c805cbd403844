"""Reducers: summarise a site inside each scanned layer, so only the summary leaves the layer.

A reducer is a pytree (a `flax.struct.dataclass`) with a static `site` and a
`__call__(self, x, ctx) -> pytree`, called in every layer with that site's value x [B, T, ...]
and a `SiteContext` (`ctx.layer` the layer index, `ctx.mask` [B, T] the attention mask).
`forward(..., reducers={"name": r})` returns `sites["name"]`: its outputs stacked [L, ...].

    take = Take("resid_post", index=last_index(mask)[:, None])    # [L, B, 1, D], never [L, B, T, D]
    _, sites = forward(params, tokens, mask, config=cfg, reducers={"last": take})
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Take:
    """The site's value at given positions: index [B, P] int32 -> [B, P, ...] per layer."""

    site: str = struct.field(pytree_node=False)
    index: jnp.ndarray  # [B, P]

    def __call__(self, x, ctx):
        index = self.index.reshape(self.index.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)


@struct.dataclass
class TakePacked:
    """The site's value at (row, position) pairs packed per group: the batch's B rows are G equal
    groups of consecutive rows (one per data shard, so each gather stays on its device), and
    rows, cols [G, M] int32 index a group's rows and positions (col < 0: a padding entry, reads
    position 0) -> [G, M, ...] per layer. Reads only the real tokens of a left-padded batch."""

    site: str = struct.field(pytree_node=False)
    rows: jnp.ndarray  # [G, M], row within the group
    cols: jnp.ndarray  # [G, M]

    def __call__(self, x, ctx):
        G = self.rows.shape[0]
        grouped = x.reshape(G, x.shape[0] // G, *x.shape[1:])
        return jax.vmap(lambda xs, r, c: xs[r, c])(grouped, self.rows, jnp.maximum(self.cols, 0))


@struct.dataclass
class WeightedMean:
    """The site's mean over positions, weighted per row: weights [B, T] (e.g. the attention mask,
    less the BOS token) -> [B, ...] per layer, in float32. Mean-pooled prompt states without
    storing [L, B, T, D]; a row whose weights are all 0 gives 0."""

    site: str = struct.field(pytree_node=False)
    weights: jnp.ndarray  # [B, T]

    def __call__(self, x, ctx):
        w = self.weights.astype(jnp.float32).reshape(self.weights.shape + (1,) * (x.ndim - 2))
        total = (x.astype(jnp.float32) * w).sum(1)
        return total / jnp.maximum(w.sum(1), 1e-30)

"""Streaming neuron statistics: per (group, neuron) counts and moments, reduced inside the forward.

`NeuronStats` is a reducer for `jaxlens.core.forward.forward(..., reducers={"neurons": r})`: the
decoder calls it inside each scanned layer with that layer's `mlp_act` x [B, T, F], and stacks
what it returns over layers, so only [L, K, F] per batch ever leaves the program, never
[L, B, T, F]. A group is usually a language: `groups` [B, K] says which group each sequence
belongs to (one batch may mix languages), `weights` [B, T] which tokens count (0 on padding is
implied by the attention mask; 0 on instruction tokens gives the finer method's response-only
counts).

    r = NeuronStats(groups=onehot, weights=w)                 # [B, K], [B, T]
    _, sites = forward(params, tokens, mask, config=cfg, reducers={"neurons": r})
    state = update(state, sites["neurons"])                   # [L, K, F] accumulators, on device

Counts are int32 and exact: each batch's count is a float32 matmul of 0/1 values (exact below
2**24 = 16.7M tokens per batch, checked), then cast; across batches they add as integers. With the
batch sharded over `data`, XLA sums the per-device partial counts, so 1 and 8 devices agree
exactly. Sums and sums of squares are float32 (mean and variance, not bit-stable across meshes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Largest token count per batch whose float32 sum of ones is exact.
_EXACT_F32 = 2**24


@struct.dataclass
class NeuronStats:
    """Reducer: one layer's activations -> this batch's statistics per (group, neuron)."""

    groups: jax.Array  # [B, K] one-hot (or 0/1) group of each sequence
    weights: jax.Array  # [B, T] 1 = count this token (ANDed with the attention mask)
    site: str = struct.field(pytree_node=False, default="mlp_act")
    with_max: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, x, ctx):
        return batch_stats(x, self.groups, self.weights * ctx.mask, with_max=self.with_max)


def batch_stats(x, groups, weights, with_max: bool = False) -> dict:
    """x [B, T, F], groups [B, K], weights [B, T] (0/1) -> {active, tokens, sum, sumsq[, max]}.

    active [K, F] int32: counted tokens with x > 0; tokens [K] int32: counted tokens;
    sum, sumsq [K, F] float32; max [K, F] float32 (-inf for a group with no token).
    """
    B, T, F = x.shape
    if B * T >= _EXACT_F32:
        raise ValueError(f"batch of {B}x{T} tokens is too large for exact counts; use fewer than {_EXACT_F32} per batch")
    w = (weights > 0).astype(jnp.float32)  # [B, T]
    g = groups.astype(jnp.float32)  # [B, K]
    gw = g[:, None, :] * w[:, :, None]  # [B, T, K] weight of each token in each group
    x32 = x.astype(jnp.float32)
    dot = lambda a: jnp.einsum("btk,btf->kf", gw, a, preferred_element_type=jnp.float32)  # noqa: E731
    stats = {
        "active": jnp.round(dot((x32 > 0).astype(jnp.float32))).astype(jnp.int32),
        "tokens": jnp.round(gw.sum(axis=(0, 1))).astype(jnp.int32),
        "sum": dot(x32),
        "sumsq": dot(x32 * x32),
    }
    if with_max:
        # Each sequence has one group, so reduce tokens first ([B, F]), then sequences per group.
        seq_max = jnp.max(jnp.where(w[:, :, None] > 0, x32, -jnp.inf), axis=1)  # [B, F]
        stats["max"] = jnp.max(jnp.where(g[:, :, None] > 0, seq_max[:, None, :], -jnp.inf), axis=0)  # [K, F]
    return stats


def empty_state(n_layers: int, n_groups: int, d_ff: int, with_max: bool = False) -> dict:
    """Zero accumulators: active/sum/sumsq[/max] [L, K, F], tokens [L, K]."""
    L, K, F = n_layers, n_groups, d_ff
    state = {
        "active": jnp.zeros((L, K, F), jnp.int32),
        "tokens": jnp.zeros((L, K), jnp.int32),
        "sum": jnp.zeros((L, K, F), jnp.float32),
        "sumsq": jnp.zeros((L, K, F), jnp.float32),
    }
    if with_max:
        state["max"] = jnp.full((L, K, F), -jnp.inf, jnp.float32)
    return state


@jax.jit
def update(state: dict, stats: dict) -> dict:
    """Add one batch's stacked statistics ([L, ...]) to the accumulators (max: elementwise max)."""
    return {k: jnp.maximum(v, stats[k]) if k == "max" else v + stats[k] for k, v in state.items()}


def moments(state: dict):
    """(probability active, mean, variance) per [L, K, F], float64 numpy; NaN where no tokens."""
    import numpy as np

    n = np.asarray(state["tokens"], np.float64)[..., None]  # [L, K, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.asarray(state["active"], np.float64) / n
        mean = np.asarray(state["sum"], np.float64) / n
        var = np.asarray(state["sumsq"], np.float64) / n - mean**2
    return p, mean, var

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

Counts are exact: each batch's count is a float32 matmul of 0/1 values (exact below 2**24 =
16.7M tokens per batch, checked), then cast to int32; the accumulators carry them in two int32
words (`active` / `tokens` the low 30 bits, `active_hi` / `tokens_hi` the rest: exact to 2**61
tokens per language, where one int32 would overflow at 2**31); read them with `counts`. With the
batch sharded over `data`, XLA sums the per-device partial counts, so 1 and 8 devices agree
exactly. Sums are float32; the spread is kept as m2, the sum of squared deviations from the
group's mean (two passes within a batch, Chan et al.'s pairwise merge across batches), never as
E[x^2] - E[x]^2, which cancels catastrophically for a neuron whose mean is large against its
spread (mean and variance are not bit-stable across meshes).
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
    """x [B, T, F], groups [B, K] (each row in at most one group), weights [B, T] (0/1) ->
    {active, tokens, sum, m2[, max]}.

    active [K, F] int32: counted tokens with x > 0; tokens [K] int32: counted tokens;
    sum [K, F] float32; m2 [K, F] float32: sum over counted tokens of (x - group mean)^2;
    max [K, F] float32 (-inf for a group with no token).
    """
    B, T, F = x.shape
    if B * T >= _EXACT_F32:
        raise ValueError(f"batch of {B}x{T} tokens is too large for exact counts; use fewer than {_EXACT_F32} per batch")
    w = (weights > 0).astype(jnp.float32)  # [B, T]
    g = groups.astype(jnp.float32)  # [B, K]
    gw = g[:, None, :] * w[:, :, None]  # [B, T, K] weight of each token in each group
    x32 = x.astype(jnp.float32)
    dot = lambda a: jnp.einsum("btk,btf->kf", gw, a, preferred_element_type=jnp.float32)  # noqa: E731
    count = gw.sum(axis=(0, 1))  # [K]
    total = dot(x32)
    mean = total / jnp.maximum(count, 1.0)[:, None]  # [K, F]
    centred = x32 - (g @ mean)[:, None, :]  # each row less its group's mean (second pass)
    stats = {
        "active": jnp.round(dot((x32 > 0).astype(jnp.float32))).astype(jnp.int32),
        "tokens": jnp.round(count).astype(jnp.int32),
        "sum": total,
        "m2": dot(centred * centred),
    }
    if with_max:
        # Each sequence has one group, so reduce tokens first ([B, F]), then sequences per group.
        seq_max = jnp.max(jnp.where(w[:, :, None] > 0, x32, -jnp.inf), axis=1)  # [B, F]
        stats["max"] = jnp.max(jnp.where(g[:, :, None] > 0, seq_max[:, None, :], -jnp.inf), axis=0)  # [K, F]
    return stats


def empty_state(n_layers: int, n_groups: int, d_ff: int, with_max: bool = False) -> dict:
    """Zero accumulators: active/active_hi/sum/m2[/max] [L, K, F], tokens/tokens_hi [L, K]."""
    L, K, F = n_layers, n_groups, d_ff
    state = {
        "active": jnp.zeros((L, K, F), jnp.int32),
        "tokens": jnp.zeros((L, K), jnp.int32),
        "sum": jnp.zeros((L, K, F), jnp.float32),
        "m2": jnp.zeros((L, K, F), jnp.float32),
        "active_hi": jnp.zeros((L, K, F), jnp.int32),
        "tokens_hi": jnp.zeros((L, K), jnp.int32),
    }
    if with_max:
        state["max"] = jnp.full((L, K, F), -jnp.inf, jnp.float32)
    return state


_LOW_BITS = 30  # the low word of a count; a batch adds < 2**24, so the low word never overflows
COUNTS = ("active", "tokens")


@jax.jit
def update(state: dict, stats: dict) -> dict:
    """Merge one batch's stacked statistics ([L, ...]) into the accumulators: counts and sums add,
    max is elementwise, m2 merges pairwise (Chan et al.): m2_a + m2_b + d^2 n_a n_b / (n_a + n_b),
    d the difference of the two means."""
    out = {k: jnp.maximum(v, stats[k]) if k == "max" else v + stats[k] for k, v in state.items()
           if k in stats and k != "m2" and k not in COUNTS}
    for k in COUNTS:  # carry the low word's overflow into the high one
        low = state[k] + stats[k]
        out[k] = low & (2**_LOW_BITS - 1)
        out[k + "_hi"] = state[k + "_hi"] + (low >> _LOW_BITS)
    n_a = (state["tokens"].astype(jnp.float32) + state["tokens_hi"].astype(jnp.float32) * 2.0**_LOW_BITS)[..., None]
    n_b = stats["tokens"].astype(jnp.float32)[..., None]
    d = stats["sum"] / jnp.maximum(n_b, 1.0) - state["sum"] / jnp.maximum(n_a, 1.0)
    out["m2"] = state["m2"] + stats["m2"] + d * d * (n_a * n_b / jnp.maximum(n_a + n_b, 1.0))
    return out


def counts(state: dict, key: str):
    """The exact count `key` ("active" or "tokens") of an accumulated state, int64 numpy."""
    import numpy as np

    low = np.asarray(state[key], np.int64)
    high = np.asarray(state[key + "_hi"], np.int64) if key + "_hi" in state else 0  # older files: one word
    return low + (high << _LOW_BITS)


def moments(state: dict):
    """(probability active, mean, variance) per [L, K, F], float64 numpy; NaN where no tokens."""
    import numpy as np

    n = counts(state, "tokens").astype(np.float64)[..., None]  # [L, K, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts(state, "active").astype(np.float64) / n
        mean = np.asarray(state["sum"], np.float64) / n
        if "m2" in state:
            var = np.asarray(state["m2"], np.float64) / n
        else:  # statistics saved before m2 existed: sums of squares
            var = np.asarray(state["sumsq"], np.float64) / n - mean**2
    return p, mean, var

"""XTransplant (METHODS.md §4): the MLP output of source layer i at the source prompt's last token,
put in place of the target pass's MLP output at layer j at its last prompt token, for every (i, j).

The sweep is one program per batch, and it costs far less than N² passes. The transplant changes
one position, and attention is causal: every earlier position is the same as in the clean pass.
So the clean pass runs once over the earlier tokens (`forward_cached`), and each (i, j) pair
re-runs only the last K positions (the last prompt token and what is scored after it) on top of
that cache, as a `jax.vmap` over pairs, `lax.map`ped over chunks of pairs to bound memory. Each
pair's logits are reduced to scores inside the program, so [pairs, rows, K, vocab] never exists.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens import interventions as iv
from jaxlens.config import ModelConfig
from jaxlens.models import forward, forward_cached
from jaxlens.reducers import Take

SITE = "mlp_out"  # the MLP's output before the residual add


def all_pairs(n_layers: int) -> np.ndarray:
    """[(i, j)] for every source layer i and target layer j: [N*N, 2] int32, i major."""
    i, j = np.meshgrid(np.arange(n_layers), np.arange(n_layers), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=-1).astype(np.int32)


def source_states(params, tokens, mask, *, config: ModelConfig, site: str = SITE) -> jnp.ndarray:
    """The site's value at each row's last real token, every layer: [B, L, D] (rows of the source
    language pass; left or right padding)."""
    take = Take(site, iv.last_index(mask)[:, None])
    _, sites = forward(params, tokens, mask, config=config, reducers={"source": take})
    return jnp.swapaxes(sites["source"][:, :, 0], 0, 1)  # [L, B, 1, D] -> [B, L, D]


@partial(jax.jit, static_argnames=("config", "tail", "score", "chunk", "site"))
def sweep(params, tokens, mask, source, prompt_last, pairs, score_args=None, *, config: ModelConfig, tail: int,
          score: Callable, chunk: int = 32, site: str = SITE):
    """Scores of the target rows under every transplant pair.

    tokens, mask [R, T]: target rows, right-aligned (left padding), so the positions that matter sit
      in the last `tail` columns; prompt_last [R]: each row's last prompt token (>= T - tail);
    source [R, L, D]: each row's source states (`source_states` of its parallel source prompt);
    pairs [P, 2] int32: (source layer, target layer);
    score(logits [R, tail, V], score_args) -> arrays: reduces one pair's logits (letter or option
      scores); a module-level function (it is static: a new one compiles anew), its data in score_args.
    Returns score's output with a leading [P] axis.
    """
    T = tokens.shape[1]
    _, _, cache = forward_cached(params, tokens[:, : T - tail], mask[:, : T - tail], config=config)
    at = (jnp.arange(T - tail, T)[None, :] == prompt_last[:, None])  # [R, tail] where the transplant lands
    rows = jnp.arange(tokens.shape[0])

    def one(pair):  # pair [2]: (i, j)
        graft = iv.transplant(site, source[rows, pair[0]], pair[1], at)
        logits, _, _ = forward_cached(params, tokens[:, T - tail :], mask[:, T - tail :], config=config, past=cache,
                                      interventions=graft)
        return score(logits, score_args)

    P = pairs.shape[0]
    padded = -(-P // chunk) * chunk
    grid = jnp.concatenate([pairs, jnp.broadcast_to(pairs[:1], (padded - P, 2))]).reshape(-1, chunk, 2)
    out = jax.lax.map(jax.vmap(one), grid)  # [P/chunk, chunk, ...]
    return jax.tree.map(lambda a: a.reshape((padded,) + a.shape[2:])[:P], out)


def sweep_loop(params, tokens, mask, source, prompt_last, pairs, score_args=None, *, config: ModelConfig, tail: int,
               score: Callable, site: str = SITE):
    """The same as `sweep`, one jitted pass per pair from Python (the baseline the sweep replaces;
    used by the benchmark and as a test reference)."""
    T = tokens.shape[1]
    _, _, cache = forward_cached(params, tokens[:, : T - tail], mask[:, : T - tail], config=config)
    at = (jnp.arange(T - tail, T)[None, :] == jnp.asarray(prompt_last)[:, None])
    rows = jnp.arange(tokens.shape[0])
    out = []
    for i, j in np.asarray(pairs):
        graft = iv.transplant(site, source[rows, i], int(j), at)
        logits, _, _ = forward_cached(params, tokens[:, T - tail :], mask[:, T - tail :], config=config, past=cache,
                                      interventions=graft)
        out.append(score(logits, score_args))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)

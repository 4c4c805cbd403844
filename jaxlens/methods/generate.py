"""Greedy generation on the KV cache, with interventions in the prefill.

XTransplant (METHODS.md §4) changes the prompt's pass only: "in the prefill only (later tokens
see it through the cache)". So `generate` runs the prompt once with the interventions
(`forward_cached`), then decodes one token per step on the cache with none. The whole loop is one
jitted program (`lax.scan` over steps): a prefix cache (`past`) is read in place, the new tokens'
cache is allocated once at its final length, each step writes its token's keys/values into the
next slot, and empty slots are masked. Positions
count real tokens, so left- or right-padded prompt batches both work. `jax.vmap` over a stacked
intervention (`interventions.stack`) generates under every point of a sweep in one program.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.core import interventions as iv
from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import KVCache, forward_cached, unembed
from jaxlens.core.sharding import constrain_batch, params_mesh


def generate(params, tokens, mask=None, *, config: ModelConfig, max_new_tokens: int, interventions=None,
             eos_ids: Sequence[int] = (), past: KVCache | None = None):
    """Greedy continuation of each prompt row: (new tokens [B, N] int32, lengths [B]).

    tokens, mask [B, T]: prompts, left or right padded; with `past` (a `forward_cached` cache), the
    rest of prompts whose beginning it holds. A row stops at its first token in `eos_ids` (counted in
    its length); its later entries are that eos token again. Interventions act on the pass over
    `tokens` only."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
    check_lengths(config, (0 if past is None else past.mask.shape[1]) + tokens.shape[1], max_new_tokens)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    return decode(params, tokens, mask, interventions, eos, past, config=config, max_new_tokens=max_new_tokens,
                  mesh=params_mesh(params))


def check_lengths(config: ModelConfig, prompt_length: int, max_new_tokens: int) -> None:
    """What every entry point into `decode` checks: at least one new token, and room for them."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_length + max_new_tokens > config.max_positions:
        raise ValueError(f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_positions={config.max_positions}; shorten the prompt or generate fewer tokens")


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "mesh"))
def decode(params, tokens, mask, interventions, eos, past, *, config: ModelConfig, max_new_tokens: int, mesh=None):
    """`generate` without the checks, for use inside other programs (eos: [E] int32 ids, -1 for none;
    mesh: split the batch over its data axes, for callers that pass host arrays)."""
    tokens, mask = constrain_batch(mesh, tokens, mask)
    B = tokens.shape[0]
    # `past` is read in place, never copied or grown: the new tokens' keys/values go to a tail cache
    # of their own (these T tokens + the steps). Under a vmapped sweep on one shared prefix, each
    # point then holds only its tail, not a copy of the prefix.
    prefix = () if past is None else (past,)
    # Only each row's last position is unembedded ([B, V], not [B, T, V]): XLA drops the unused logits.
    _, sites, new = forward_cached(params, tokens, mask, config=config, interventions=interventions, past=prefix,
                                   capture=("final_norm",), new_only=True)
    T = tokens.shape[1]  # the tail's first free slot
    last = sites["final_norm"][jnp.arange(B), iv.last_index(mask)]  # [B, D]
    first = jnp.argmax(unembed(params, last, config), axis=-1).astype(jnp.int32)
    steps = max_new_tokens - 1  # the last new token is never fed back
    grow = lambda a: jnp.pad(a, [(0, 0)] * 2 + [(0, steps)] + [(0, 0)] * (a.ndim - 3))  # noqa: E731
    tail = KVCache(grow(new.k), grow(new.v), jnp.pad(new.mask, ((0, 0), (0, steps))))
    one = jnp.ones((B, 1), jnp.int32)

    def step(carry, slot):
        tail, token, done = carry
        logits, _, new = forward_cached(params, token[:, None], one, config=config, past=(*prefix, tail), new_only=True)
        put = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=2)  # noqa: E731
        tail = KVCache(put(tail.k, new.k), put(tail.v, new.v), tail.mask.at[:, slot].set(1))
        done = done | jnp.isin(token, eos)
        nxt = jnp.where(done, token, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        return (tail, nxt, done), nxt

    start = (tail, first, jnp.zeros((B,), bool))
    _, rest = jax.lax.scan(step, start, T + jnp.arange(steps))
    new_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, N]
    is_eos = jnp.isin(new_tokens, eos)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return new_tokens, lengths


def eos_ids(tokenizer) -> list[int]:
    """The tokenizer's end-of-sequence id(s): an int, a list of them, or none (0 is a valid id)."""
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(t) for t in np.atleast_1d(eos)]


def generate_text(model, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_rows: int = 8,
                  interventions=None, progress: bool = False) -> list[str]:
    """Greedy continuations of the prompts (text), in fixed-size batches over the mesh. `interventions`
    is None or a function (tokens, mask, rows) -> interventions for that batch (rows: the prompts' indices)."""
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    eos = eos_ids(model.tokenizer)
    batches = text_batches(model, prompts, rows_for(model.mesh, batch_rows), room=max_new_tokens)

    def step(b, tokens, mask):
        made = None if interventions is None else interventions(b.tokens, b.mask, b.index[: b.n_real])
        return generate(model.params, tokens, mask, config=model.config, max_new_tokens=max_new_tokens,
                        interventions=made, eos_ids=eos)

    out = []
    for b, (new, lengths) in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask),
                                    desc="generate", progress=progress):
        out += [model.tokenizer.decode(new[r, : lengths[r]], skip_special_tokens=True) for r in range(b.n_real)]
    return out

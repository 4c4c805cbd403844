"""Score multiple-choice items under many interventions at once (steering grids, transplant pairs).

A *stack* is P interventions of one kind with a leading [P] axis (`interventions.stack`, or a
constructor under `jax.vmap`), or a `Points`: the arrays all points share given once, and per
point only what differs (a steering point's layer and alpha), so nothing is copied P times. Per batch of rows (`jaxlens.runtime.batching.make_batches`), one jitted
program runs all P, `jax.vmap`ped over chunks of the stack and `lax.map`ped over the chunks, and
reduces each one's logits to scores right away: the [P, rows, positions, vocab] logits never
exist, so a 262k vocabulary and hundreds of points fit in memory.

`tail_only=True` is for interventions that touch only the last `tail` positions of the rows (the
last prompt token and what is scored after it): attention is causal, so every earlier position
is the same as in the clean pass. The clean pass then runs once over the earlier tokens
(`forward_cached`) and each point re-runs only the last `tail` positions on that KV cache:
P x tail tokens instead of P x T. The stack's positions are then relative to those last `tail`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlens.core.config import ModelConfig
from jaxlens.data.items import Item
from jaxlens.data.templates import Template
from jaxlens.methods.scoring import continuation_logprob, letter_logprobs, letter_rows, letter_table, option_rows, Scores, set_letter_scores, set_option_scores
from jaxlens.runtime.batching import Batch, make_batches
from jaxlens.core.forward import forward, forward_cached, unembed


@struct.dataclass
class Points:
    """A stack of P points that share most of their arrays: point p's intervention is
    make(shared, each[p]). Only `each` (leading [P] axis) is split over points; `shared` reaches
    every point's program unbatched, so e.g. steering vectors [L, R, 1, D] exist once, not P times.
    `make` is a module-level function (it is part of the compiled program's cache key)."""

    make: Callable = struct.field(pytree_node=False)
    shared: Any
    each: Any


def layer_alpha_points(shared, points) -> Points:
    """A (layer, alpha) grid over one intervention: `shared` is built once (at any layer and alpha),
    points [G, 2] (layer, alpha value of its `alpha` field); each point only sets those two."""
    points = np.asarray(points)
    return Points(_at_layer_alpha, shared, (jnp.asarray(points[:, 0], jnp.int32), jnp.asarray(points[:, 1], jnp.float32)))


def _at_layer_alpha(shared, point):
    layer, alpha = point
    return shared.replace(layers=layer[None], alpha=alpha)


def score_letters(logits, args):
    """logits [R, tail, V] -> (restricted letter log-probs [R, n], their full-softmax mass [R])."""
    table, n_options = args
    return letter_logprobs(logits[:, -1], table, n_options)


def score_options(logits, args):
    """logits [R, tail, V] -> summed log-prob of each row's continuation [R]."""
    tokens, target = args
    return continuation_logprob(logits, tokens, target)


@partial(jax.jit, static_argnames=("config", "tail"))
def prefix_cache(params, tokens, mask, *, config: ModelConfig, tail: int):
    """The clean pass's keys/values of all but the last `tail` columns (what `tail_only` reuses)."""
    T = tokens.shape[1]
    return forward_cached(params, tokens[:, : T - tail], mask[:, : T - tail], config=config)[2]


def auto_chunk(rows: int, tail: int, vocab: int, tail_only: bool, budget_bytes: int = 256 * 2**20, *,
               live: int = 0) -> int:
    """Points per vmapped chunk: a one-token tail is cheap per point and re-reads every weight per
    chunk, so more points per chunk run faster (SmolLM2, 8 rows: 8 -> 30 points is 1.4x); a chunk's
    points together stay under `budget_bytes`, each holding its [rows, tail, vocab] float32 logits
    and `live` bytes more (`point_bytes`: activations, its own KV cache, its stack arrays).
    Full passes: at most 8."""
    fit = budget_bytes // (rows * tail * vocab * 4 + live)
    return int(max(1, min(fit, 32 if tail_only else 8)))


def point_bytes(config: ModelConfig, rows: int, run: int, keys: int, *, cache: int = 0, stack=None, itemsize: int = 4) -> int:
    """What one vmapped point holds live besides its logits, in bytes (global shapes: an upper bound
    per device). `run` positions re-run per point (T for a full pass, the tail on a KV cache), each
    attending to `keys` keys; `cache` columns of KV the point carries itself (a generation's cache);
    `stack`: the point's share of the stack's per-point arrays (a `Points`' `each`, else all):
      activations of one layer step   rows x run x (6 D + 4 F) x itemsize  (residual, norm, q, attention
                                      out, MLP out, the captured final norm; gate/up, activation, hidden)
      attention scores and probs      2 x rows x heads x run x min(keys, attn_block) x 4
      its KV cache                    2 x L x rows x cache x kv_heads x head_dim x itemsize
      its stack arrays                bytes of the stack / P"""
    c = config
    block = min(keys, c.attn_block) if c.attn_block else keys
    activations = rows * run * (6 * c.d_model + 4 * c.d_ff) * itemsize + 2 * rows * c.n_heads * run * block * 4
    kv = 2 * c.n_layers * rows * cache * c.n_kv_heads * c.head_dim * itemsize
    per_point = stack.each if isinstance(stack, Points) else stack
    leaves = jax.tree.leaves(per_point)
    own = sum(a.size * a.dtype.itemsize for a in leaves) // leaves[0].shape[0] if leaves else 0
    return int(activations + kv + own)


@partial(jax.jit, static_argnames=("config", "tail", "score", "tail_only", "chunk"))
def run_stack(params, tokens, mask, stack, score_args, cache=None, *, config: ModelConfig, tail: int, score: Callable,
              tail_only: bool, chunk: int | None = None):
    """score(logits of the last `tail` positions, score_args) for each of the stack's P points:
    its outputs with a leading [P] axis. tokens, mask [R, T], right-aligned (left padding).
    With tail_only, `cache` (`prefix_cache`) may be given, else it is computed here."""
    T = tokens.shape[1]
    if tail_only:
        if cache is None:
            cache = prefix_cache(params, tokens, mask, config=config, tail=tail)

        def one(intervention):
            logits, _, _ = forward_cached(params, tokens[:, T - tail :], mask[:, T - tail :], config=config, past=cache,
                                          interventions=intervention)
            return score(logits, score_args)
    else:

        def one(intervention):
            _, sites = forward(params, tokens, mask, config=config, capture=("final_norm",), interventions=intervention)
            return score(unembed(params, sites["final_norm"][:, T - tail :], config), score_args)

    R, run = tokens.shape[0], (tail if tail_only else T)
    live = point_bytes(config, R, run, T, stack=stack, itemsize=activation_itemsize(params, config))
    return map_stack(one, stack, chunk or auto_chunk(R, tail, config.vocab_size, tail_only, live=live))


def activation_itemsize(params, config: ModelConfig) -> int:
    """Bytes per activation: 4 with float32 activations (the default, `ModelConfig.activation_dtype`),
    else the params' float dtype's; the KV cache's too."""
    if config.activation_dtype == "float32":
        return 4
    return max(jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def map_stack(fn: Callable, stack, limit: int):
    """fn over every point of a stack (leading [P] axis, or a `Points`), inside a program:
    `jax.vmap` over chunks of at most `limit` points, evenly filled (120 at 32: 4 x 30), `lax.map`
    over the chunks. Returns fn's outputs with a leading [P] axis."""
    if isinstance(stack, Points):
        make, shared, stack = stack.make, stack.shared, stack.each
        point = lambda each: fn(make(shared, each))  # noqa: E731  shared: closed over, unbatched
    else:
        point = fn
    P = jax.tree.leaves(stack)[0].shape[0]
    chunk = -(-P // -(-P // limit))
    padded = -(-P // chunk) * chunk
    chunks = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], padded - P, 0)]).reshape((-1, chunk) + a.shape[1:]), stack)
    out = jax.lax.map(jax.vmap(point), chunks)  # [P/chunk, chunk, ...]
    return jax.tree.map(lambda a: a.reshape((padded,) + a.shape[2:])[:P], out)


def sweep_scores(model, items: Sequence[Item], template: Template, build: Callable[[Batch, int], object], *,
                 methods: Sequence[str] = ("letters",), tail_only: bool, batch_rows: int = 8, chunk: int | None = None,
                 progress: bool = True) -> Scores:
    """Scores [P, N, O] of every item under each of P interventions.

    build(batch, tail) -> the stack for this batch (it may depend on the rows: batch.item maps rows
    to items, batch.prompt_last gives each row's last prompt token); positions in it cover the last
    `tail` columns when tail_only, else all T. methods: "letters" and/or "options" (as in
    `evaluation.score_items`).
    """
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    tokenizer, config = model.tokenizer, model.config
    n_opts = max(len(item.options) for item in items)
    pad_id = config.pad_token_id or 0
    batch_rows = rows_for(model.mesh, batch_rows)
    scores = Scores()
    for method in methods:
        if method == "letters":
            table = letter_table(tokenizer, template, n_opts)
            n_options = np.array([len(item.options) for item in items])
            rows = letter_rows(items, tokenizer, template)
        elif method == "options":
            rows = option_rows(items, tokenizer, template)
        else:
            raise ValueError(f"unknown scoring method {method!r}; use letters, options")

        def step(batch, tokens, mask, target):
            tail = batch.tail
            if method == "letters":
                args, score = (table, np.where(batch.item >= 0, n_options[np.maximum(batch.item, 0)], 1)), score_letters
            else:
                args, score = (tokens, target), score_options
            return run_stack(model.params, tokens, mask, build(batch, tail), args, config=config, tail=tail,
                             score=score, tail_only=tail_only, chunk=chunk)

        values = list(stream(make_batches(rows, batch_rows, pad_id, config.max_positions), step, mesh=model.mesh,
                             inputs=lambda b: (b.tokens, b.mask, b.target), desc=f"sweep ({method})", progress=progress))
        if method == "letters":
            set_letter_scores(scores, values, items)
        else:
            set_option_scores(scores, values, items)
    return scores

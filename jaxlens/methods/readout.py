"""Read many prompts' last token through the fused logit lens, in fixed-shape batches.

The analyses (latent language, multiple-choice reading) all ask the same thing of each prompt:
at its last token and every layer, the probability of a few token sets (per prompt: its own
words or option labels), the entropy, the top-1 id, and optionally the residual itself. Batches
are left-padded to a bucketed length and a fixed batch size, so a run compiles a handful of
programs however many prompts it reads.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import forward
from jaxlens.core.reducers import Take
from jaxlens.data.tokensets import padded_ids


@partial(jax.jit, static_argnames=("config", "keep_resid", "mesh"))
def _last_token_lens(params, tokens, mask, targets, *, config: ModelConfig, keep_resid: bool, mesh):
    """tokens, mask [B, T] (left-padded); targets [B, 1, n] -> lens outputs at the last position.

    Like `lens_from_tokens(positions="last")`, but the residual read comes back too (the shared-
    space cosine needs it); the model's own logits are dropped by XLA as unused."""
    from jaxlens.kernels.lens import logit_lens

    # Left padding puts every last token at T - 1; each layer keeps only that row ([L, B, 1, D]).
    last = Take("resid_post", jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32))
    _, sites = forward(params, tokens, mask, config=config, reducers={"last": last})
    resid = sites["last"]  # [L, B, 1, D]
    out = logit_lens(params, resid, config=config, k=1, targets=targets, mesh=mesh)
    read = {
        "target_probs": out["target_probs"][:, :, 0],  # [L, B, n]
        "entropy": out["entropy"][:, :, 0],  # [L, B]
        "top1": out["top_ids"][:, :, 0, 0],  # [L, B]
    }
    if keep_resid:
        read["resid"] = resid[:, :, 0].astype(jnp.float32)  # [L, B, D]
    return read


@dataclasses.dataclass
class Readout:
    """Per prompt and layer: set_probs [N, L, S], entropy [N, L] (nats), top1 [N, L] ids,
    resid [N, L, D] (only when asked for)."""

    set_probs: np.ndarray
    entropy: np.ndarray
    top1: np.ndarray
    resid: np.ndarray | None = None


def read_last_token(
    model,
    prompts: Sequence[str],
    sets: Sequence[Sequence[frozenset[int]]],
    batch_size: int = 16,
    keep_resid: bool = False,
    progress: bool = True,
    desc: str = "lens",
) -> Readout:
    """prompts[i] and its token sets sets[i] (S of them, the same S for every prompt) -> Readout."""
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    if len(prompts) != len(sets) or not prompts:
        raise ValueError(f"need one list of token sets per prompt and at least one prompt; got {len(prompts)} prompts, {len(sets)} set lists")
    n_sets = {len(s) for s in sets}
    if len(n_sets) != 1:
        raise ValueError(f"every prompt needs the same number of token sets, got {sorted(n_sets)}")
    S = n_sets.pop()
    flat_ids, flat_w = padded_ids([s for row in sets for s in row])  # [N*S, n]
    n = flat_ids.shape[1]
    ids = flat_ids.reshape(len(prompts), S * n)  # each prompt's sets side by side
    weights = flat_w.reshape(len(prompts), S, n)
    batches = text_batches(model, prompts, rows_for(model.mesh, min(batch_size, len(prompts))))
    targets = lambda b: ids[np.maximum(b.index, 0)][:, None, :]  # [B, 1, S*n]; padding rows: any, dropped  # noqa: E731
    step = lambda b, tokens, mask, tg: _last_token_lens(  # noqa: E731
        model.params, tokens, mask, tg, config=model.config, keep_resid=keep_resid, mesh=model.mesh)
    parts: dict[str, list] = {}
    for b, out in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask, targets(b)), desc=desc,
                         progress=progress):
        for key, value in out.items():
            parts.setdefault(key, []).append(np.moveaxis(value, 1, 0)[: b.n_real])  # [real, L, ...]
    got = {k: np.concatenate(v) for k, v in parts.items()}
    probs = got["target_probs"].reshape(len(prompts), -1, S, n)  # [N, L, S, n]
    set_probs = np.einsum("nlsk,nsk->nls", probs, weights)
    return Readout(set_probs, got["entropy"], got["top1"], got.get("resid"))


def lens_grid(model, prompts: Sequence[str], k: int, batch_size: int = 8, progress: bool = True, translators=None,
              embedding: bool = False) -> list[dict]:
    """Per prompt: input_ids [T], top_ids / top_probs [L, T, k], entropy [L, T] at every position
    (the fused kernel; with `translators`, the tuned lens), in bucketed batches over the mesh.
    embedding: the embedding output first, then the L blocks ([1 + L, T, ...]).

    The lens reads only the real tokens (packed per data shard, `pack_positions`): its work, L x V
    per token, is most of the run, and padding would cost as much as a real token."""
    from jaxlens.core.sharding import data_size
    from jaxlens.kernels.lens import lens_from_tokens
    from jaxlens.runtime.batching import pack_positions, text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    rows = rows_for(model.mesh, min(batch_size, len(prompts)))  # a multiple of the data shards
    batches = text_batches(model, prompts, rows)
    groups = data_size(model.mesh)
    packed = {id(b): pack_positions(b.mask, groups) for b in batches}
    keep = ("top_ids", "top_probs", "entropy")

    def step(b, tokens, mask, pack_rows, pack_cols):
        out = lens_from_tokens(model.params, tokens, mask, config=model.config, positions=(pack_rows, pack_cols), k=k,
                               translators=translators, embedding=embedding)
        return {name: out[name] for name in keep}  # [L, G, M, ...]

    results = []
    for b, out in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask, *packed[id(b)][:2]), desc="lens",
                         progress=progress):
        start = packed[id(b)][2]
        per = rows // groups
        for row in range(b.n_real):
            real = b.mask[row].astype(bool)  # [T]
            cols = slice(start[row], start[row] + real.sum())
            results.append({"input_ids": b.tokens[row, real], **{name: out[name][:, row // per, cols] for name in keep}})
    return results
